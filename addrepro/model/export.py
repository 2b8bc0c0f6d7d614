"""Export an addrepro model to TransformerLens 4.x (``TransformerBridge``), exactly.

TransformerLens 4 removed ``HookedTransformer``; small models are built with
``TransformerBridge.boot_native(TransformerBridgeConfig(...))``, a bridge around a TL-native
``NativeModel`` (modules ``tok_embed``, ``pos``, ``layers.i.{ln1,attn.{q,k,v,o},ln2,mlp.{fc_in,fc_out}}``,
``ln_out``, ``head``) exposing the usual hook names (``blocks.0.attn.hook_z``, ``hook_pattern``,
``blocks.0.mlp.hook_post``, ``blocks.0.hook_resid_pre`` …, ``ln_final.hook_scale``) and
``run_with_cache`` / ``run_with_hooks``. Our state dict already uses the legacy TL property names
(``blocks.0.attn.W_Q`` …), which ``transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint``
maps onto the bridge's keys (``blocks.0.attn.q.weight`` …).

How each difference between the two models is handled — all exact, no padding or slicing:

* ``d_vocab_out != d_vocab`` (``base + 2`` inputs, ``base`` outputs): native, via
  ``TransformerBridgeConfig(d_vocab_out=base)``; the head is ``Linear(d_model, base)``.
* Biases our model does not have (``b_Q/b_K/b_V/b_O``; the bridge's unembedding also exposes a
  ``unembed.bias`` buffer): loaded as explicit zeros, so the load is ``strict=True``.
* LayerNorm: ``normalization_type="LN"`` with ``eps=1e-5``; the bridge's NormalizationBridge computes
  ``(x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b``, the same formula as ours, and exposes the
  denominator as ``hook_scale``. ``normalization=None`` maps to ``normalization_type=None`` (the TL
  default is "LN", so it must be passed explicitly). No weight processing (LN folding, centering)
  is applied: the bridge runs our weights unchanged.
* Attention scale: TL's default ``attn_scale=-1`` means dividing by ``sqrt(d_head)``, as we do.
* ``gelu`` is exact (erf) GELU in both; ``relu`` is ReLU.

The remaining difference is float rounding order (≈1e-6 on logits of O(10)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from addrepro.model.transformer import LN_EPS, ModelConfig, Transformer, model_from_checkpoint
from addrepro.task.spec import TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge

MISSING_MESSAGE = 'TransformerLens is not installed: pip install -e ".[interp]"'

Source = dict | Transformer | tuple[Transformer, int]


def _import_tl() -> Any:
    # TransformerLens is an optional extra (and pulls transformers): imported only when exporting.
    try:
        import transformer_lens  # noqa: PLC0415
        from transformer_lens.model_bridge.sources import native  # noqa: F401, PLC0415 - attaches boot_native
    except ImportError as e:
        raise ImportError(MISSING_MESSAGE) from e
    return transformer_lens


def bridge_config(cfg: ModelConfig) -> Any:
    """The ``TransformerBridgeConfig`` of a model config (keyword arguments throughout)."""
    tl = _import_tl()
    return tl.TransformerBridgeConfig(
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        d_vocab_out=cfg.d_vocab_out,
        act_fn=cfg.act_fn,
        normalization_type=cfg.normalization,  # None or "LN"
        eps=LN_EPS,
        attn_only=cfg.attn_only,
        positional_embedding_type="standard",
        seed=0,  # the random init is overwritten; seeding only keeps the caller's RNG untouched
        model_name="addrepro",
    )


def bridge_state_dict(member_state: dict[str, torch.Tensor], cfg: ModelConfig, tl_cfg: Any) -> dict:
    """Our member state dict in the bridge's keys and shapes, with zeros for the biases we lack."""
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint  # noqa: PLC0415 - optional extra

    converted = convert_tl_checkpoint({k: v.float() for k, v in member_state.items()}, tl_cfg)
    qkv = cfg.n_heads * cfg.d_head
    for layer in range(cfg.n_layers):
        for name in "qkv":
            converted[f"blocks.{layer}.attn.{name}.bias"] = torch.zeros(qkv)
        converted[f"blocks.{layer}.attn.o.bias"] = torch.zeros(cfg.d_model)
    converted["unembed.bias"] = torch.zeros(cfg.d_vocab_out)
    return converted


def _resolve(source: Source, member: int) -> tuple[Transformer, int, TaskSpec | None]:
    if isinstance(source, tuple):
        model, member = source
        return model, member, None
    if isinstance(source, Transformer):
        return source, member, None
    model, spec = model_from_checkpoint(source)
    return model, 0, spec


def to_transformer_lens(source: Source, member: int = 0, verify: bool = True) -> TransformerBridge:
    """A ``TransformerBridge`` computing exactly the logits of one model.

    ``source``: a loaded checkpoint (``addrepro.rundir.checkpoints.load_checkpoint``), a ``Transformer``
    (member ``member``) or a ``(Transformer, member)`` pair. The bridge is in eval mode, float32, on the CPU;
    when the source is a checkpoint its ``TaskSpec`` is attached as ``bridge.addrepro_spec``.
    With ``verify``, the logits of both models are compared on random tokens and a mismatch raises.
    """
    tl = _import_tl()
    model, member, spec = _resolve(source, member)
    cfg = model.cfg
    tl_cfg = bridge_config(cfg)
    bridge = tl.TransformerBridge.boot_native(tl_cfg)
    state = {k: v.detach().cpu() for k, v in model.member_state_dict(member).items()}
    bridge.load_state_dict(bridge_state_dict(state, cfg, tl_cfg), strict=True)
    bridge.eval()
    bridge.addrepro_spec = spec
    if verify:
        check_export(model, member, bridge)
    return bridge


@torch.no_grad()
def export_diff(model: Transformer, member: int, bridge: Any, batch: int = 16, seed: int = 0) -> tuple[float, float]:
    """Largest logit difference between member ``member`` and the bridge on random token sequences,
    and the largest logit magnitude (for a relative tolerance)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, model.cfg.n_ctx), generator=g)
    device = next(model.parameters()).device
    ours = model(tokens.to(device))[member].float().cpu()
    theirs = bridge(tokens).float()
    return (ours - theirs).abs().max().item(), ours.abs().max().item()


def check_export(model: Transformer, member: int, bridge: Any) -> None:
    diff, size = export_diff(model, member, bridge)
    if not diff <= 1e-5 * max(1.0, size):
        raise RuntimeError(f"TransformerLens export differs from the model: max |logit diff| = {diff:.3g}")
