"""A small decoder-only transformer, held as K stacked models.

Every parameter has a leading ensemble dimension K (K = 1 for a single run), so one forward pass
trains K independent models: members never mix, and member k with seed s is initialised exactly as
a single run with seed s. Parameter names follow TransformerLens (``embed.W_E``,
``blocks.0.attn.W_Q``, ``blocks.0.mlp.W_in``, ``unembed.W_U`` …), so that ``state_dict`` sliced at
member k is a HookedTransformer-style state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from addrepro.model.config import ModelConfig
from addrepro.task.spec import TaskSpec


def _stacked(k: int, *shape: int, fill: float | None = None) -> nn.Parameter:
    t = torch.empty(k, *shape)
    if fill is not None:
        t.fill_(fill)
    return nn.Parameter(t)


LN_EPS = 1e-5


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """``(x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b`` over the last dimension (TransformerLens' LN)."""
    x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return x / scale * w + b


class LayerNorm(nn.Module):
    def __init__(self, k: int, d_model: int):
        super().__init__()
        self.w = _stacked(k, d_model, fill=1.0)
        self.b = _stacked(k, d_model, fill=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (K, B, T, d_model)
        return layer_norm(x, self.w[:, None, None], self.b[:, None, None])


class Attention(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q, self.W_K, self.W_V = (_stacked(k, h, d, dh) for _ in range(3))
        self.W_O = _stacked(k, h, dh, d)
        self.scale = 1.0 / math.sqrt(dh)
        mask = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Attention output ``(K, B, T', d_model)`` at every position, or only at the last ``queries``.

        Keys and values always come from all T positions; when only the answer positions matter (the
        last layer in training) the queries, the output projection and all that follows shrink to them.
        """
        k, bsz, t, d = x.shape
        t_q = t if queries is None else min(queries, t)
        k_ = self._heads(x, self.W_K)  # (K*B, H, T, d_head)
        v = self._heads(x, self.W_V)  # (K*B, H, T, d_head)
        q = self._heads(x[:, :, t - t_q :], self.W_Q)  # (K*B, H, T', d_head)
        if t_q == t:
            z = F.scaled_dot_product_attention(q, k_, v, is_causal=True, scale=self.scale)
        else:  # query i sits at position t - T' + i: the causal mask is aligned bottom-right
            z = F.scaled_dot_product_attention(q, k_, v, attn_mask=self.mask[t - t_q : t, :t], scale=self.scale)
        h, dh = self.W_O.shape[1], self.W_O.shape[2]
        z = z.transpose(1, 2).reshape(k, bsz * t_q, h * dh)  # (K, B*T', H*d_head)
        out = torch.bmm(z, self.W_O.reshape(k, h * dh, d))  # (K, B*T', d_model)
        return out.view(k, bsz, t_q, d)

    @staticmethod
    def _heads(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x (K, B, T, d_model)`` through ``w (K, H, d_model, d_head)``: all heads in one matmul."""
        k, bsz, t, d = x.shape
        h, dh = w.shape[1], w.shape[3]
        out = torch.bmm(x.reshape(k, bsz * t, d), w.permute(0, 2, 1, 3).reshape(k, d, h * dh))  # (K, B*T, H*d_head)
        return out.view(k * bsz, t, h, dh).transpose(1, 2)

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Attention pattern ``(K, B, H, T, T)``, for analysis (training never materialises it)."""
        t = x.shape[2]
        q = torch.einsum("kbtd,khde->kbhte", x, self.W_Q)
        k_ = torch.einsum("kbtd,khde->kbhte", x, self.W_K)
        scores = (q @ k_.transpose(-1, -2) * self.scale).masked_fill(~self.mask[:t, :t], float("-inf"))
        return scores.softmax(-1)


class MLP(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        self.W_in = _stacked(k, cfg.d_model, cfg.d_mlp)
        self.b_in = _stacked(k, cfg.d_mlp, fill=0.0)
        self.W_out = _stacked(k, cfg.d_mlp, cfg.d_model)
        self.b_out = _stacked(k, cfg.d_model, fill=0.0)
        # ReLU in place: its backward needs only its output, and the pre-activation is not kept.
        self.act = F.relu_ if cfg.act_fn == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (K, B, T, d_model)
        k, bsz, t, d = x.shape
        pre = torch.baddbmm(self.b_in[:, None], x.reshape(k, bsz * t, d), self.W_in)  # (K, B*T, d_mlp)
        out = torch.baddbmm(self.b_out[:, None], self.act(pre), self.W_out)  # (K, B*T, d_model)
        return out.view(k, bsz, t, d)


class Block(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        use_ln = cfg.normalization == "LN"
        self.ln1 = LayerNorm(k, cfg.d_model) if use_ln else nn.Identity()
        self.attn = Attention(k, cfg)
        self.mlp = None if cfg.attn_only else MLP(k, cfg)
        self.ln2 = LayerNorm(k, cfg.d_model) if use_ln and not cfg.attn_only else nn.Identity()

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The residual stream after this block, at every position or only at the last ``queries``."""
        attn_out = self.attn(self.ln1(x), queries)
        x = x[:, :, -attn_out.shape[2] :] + attn_out
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class Embed(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        self.W_E = _stacked(k, cfg.d_vocab, cfg.d_model)


class PosEmbed(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        self.W_pos = _stacked(k, cfg.n_ctx, cfg.d_model)


class Unembed(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        self.W_U = _stacked(k, cfg.d_model, cfg.d_vocab_out)


class Transformer(nn.Module):
    """K independent transformers in one module; ``seeds[k]`` initialises member k."""

    def __init__(self, cfg: ModelConfig, seeds: list[int] | int = 0):
        super().__init__()
        self.cfg = cfg
        self.seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        k = self.n_models
        self.embed = Embed(k, cfg)
        self.pos_embed = PosEmbed(k, cfg)
        self.blocks = nn.ModuleList(Block(k, cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(k, cfg.d_model) if cfg.normalization == "LN" else nn.Identity()
        self.unembed = Unembed(k, cfg)
        # Member k's token ids are offset by k * d_vocab into the flattened (K * d_vocab, d_model) table:
        # one embedding lookup for all members, whose backward is far cheaper than advanced indexing.
        self.register_buffer("token_offsets", torch.arange(k)[:, None, None] * cfg.d_vocab, persistent=False)
        for member, seed in enumerate(self.seeds):
            self.init_member(member, seed)

    @property
    def n_models(self) -> int:
        return len(self.seeds)

    @torch.no_grad()
    def init_member(self, member: int, seed: int) -> None:
        """Initialise member ``member`` from its own generator, in a fixed parameter order."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if not leaf.startswith("W_"):
                continue  # biases 0 and LayerNorm weights 1 are set at construction
            if cfg.init == "nanda":
                # As Nanda's public code: every weight N(0, 1/d_model) but W_U N(0, 1/d_vocab_out).
                # (W_out too is scaled by d_model there, not by d_mlp.)
                fan = cfg.d_vocab_out if leaf == "W_U" else cfg.d_model
                std = 1.0 / math.sqrt(fan)
            else:
                std = cfg.init_std
            p[member].copy_(torch.randn(p.shape[1:], generator=g) * std)

    def residual(self, tokens: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Final residual stream ``(K, B, T, d_model)`` for tokens ``(K, B, T)`` or ``(B, T)``.

        With ``last``, only the last ``last`` positions ``(K, B, last, d_model)``: the final block then
        computes its queries and MLP there alone — the same values, with less work (the answer is a
        third of the sequence). Token ids must lie in ``[0, d_vocab)``: they are not range-checked
        here (the hot path), and an id outside would read another member's embedding.
        """
        if tokens.dim() == 2:
            tokens = tokens.expand(self.n_models, *tokens.shape)
        x = self.embed_tokens(tokens)  # (K, B, T, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, last if i == len(self.blocks) - 1 else None)
        return self.ln_final(x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embeddings ``(K, B, T, d_model)`` of tokens ``(K, B, T)``."""
        t = tokens.shape[-1]
        k, d_vocab, d_model = self.embed.W_E.shape
        x = F.embedding(tokens + self.token_offsets, self.embed.W_E.view(k * d_vocab, d_model))  # (K, B, T, d_model)
        return x + self.pos_embed.W_pos[:, None, :t]

    def forward(self, tokens: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Logits ``(K, B, T, d_vocab_out)``; with ``last``, only at the last ``last`` positions."""
        return self.logits(self.residual(tokens, last))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(K, B, T, d_vocab_out)`` of a final residual stream ``(K, B, T, d_model)``."""
        k, bsz, t, d = x.shape
        return torch.bmm(x.reshape(k, bsz * t, d), self.unembed.W_U).view(k, bsz, t, -1)

    def member_state_dict(self, member: int) -> dict[str, torch.Tensor]:
        """A single model's TransformerLens-style state dict (no leading K)."""
        return {name: t[member].detach().clone() for name, t in self.state_dict().items()}

    @classmethod
    def from_member_state_dicts(cls, cfg: ModelConfig, states: list[dict[str, torch.Tensor]]) -> Transformer:
        model = cls(cfg, seeds=[0] * len(states))
        stacked = {name: torch.stack([s[name] for s in states]) for name in states[0]}
        model.load_state_dict(stacked)
        return model


def parameter_group(name: str) -> str:
    """The gradient-norm group of a parameter: embed, attn, mlp, ln or unembed."""
    if name.startswith(("embed.", "pos_embed.")):
        return "embed"
    if name.startswith("unembed."):
        return "unembed"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "ln"


def model_from_checkpoint(ckpt: dict) -> tuple[Transformer, TaskSpec]:
    """Rebuild the single model of a loaded checkpoint (K = 1): its ``task``, ``model_config`` and ``model``."""
    spec = TaskSpec(**ckpt["task"])
    cfg = ModelConfig(**ckpt["model_config"])
    model = Transformer.from_member_state_dicts(cfg, [ckpt["model"]])
    return model, spec
