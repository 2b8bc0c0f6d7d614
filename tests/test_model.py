"""Tests for addrepro.model.transformer (stacked transformer) and addrepro.metrics.grad_norms."""

import math

import pytest
import torch

from addrepro.metrics.grad_norms import grad_norm_keys, grad_norms
from addrepro.model.transformer import ModelConfig, Transformer, parameter_group

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**overrides) -> ModelConfig:
    base = dict(d_vocab=12, d_vocab_out=10, n_ctx=11, d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=24)
    base.update(overrides)
    return ModelConfig(**base)


def random_tokens(batch: int, length: int, seed: int, vocab: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# -----------------------------------------------------------------------------
# a plain, unbatched reference forward pass in float64, from a single member's state dict


def reference_logits(sd: dict, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    sd = {k: v.double() for k, v in sd.items()}
    use_ln = cfg.normalization == "LN"

    def ln(x, prefix):
        if not use_ln:
            return x
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".w"] + sd[prefix + ".b"]

    t = tokens.shape[-1]
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:t]  # (B, T, d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        h = ln(x, p + "ln1")
        attn_out = torch.zeros_like(x)
        for head in range(cfg.n_heads):
            q = h @ sd[p + "attn.W_Q"][head]
            k = h @ sd[p + "attn.W_K"][head]
            v = h @ sd[p + "attn.W_V"][head]
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.d_head)
            scores = scores.masked_fill(~causal, float("-inf"))
            attn_out = attn_out + (scores.softmax(-1) @ v) @ sd[p + "attn.W_O"][head]
        x = x + attn_out
        if not cfg.attn_only:
            h = ln(x, p + "ln2")
            act = torch.relu if cfg.act_fn == "relu" else torch.nn.functional.gelu
            pre = h @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"]
            x = x + act(pre) @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
    x = ln(x, "ln_final")
    return x @ sd["unembed.W_U"]


def perturb_all(model: Transformer, seed: int) -> None:
    """Give biases and LayerNorm weights non-trivial values, so the reference check covers them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


# -----------------------------------------------------------------------------
# names and shapes


def expected_shapes(cfg: ModelConfig, k: int) -> dict[str, tuple[int, ...]]:
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    out = {
        "embed.W_E": (k, cfg.d_vocab, d),
        "pos_embed.W_pos": (k, cfg.n_ctx, d),
        "unembed.W_U": (k, d, cfg.d_vocab_out),
    }
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        out |= {p + f"attn.W_{m}": (k, h, d, dh) for m in "QKV"}
        out[p + "attn.W_O"] = (k, h, dh, d)
        if not cfg.attn_only:
            out |= {
                p + "mlp.W_in": (k, d, cfg.d_mlp),
                p + "mlp.b_in": (k, cfg.d_mlp),
                p + "mlp.W_out": (k, cfg.d_mlp, d),
                p + "mlp.b_out": (k, d),
            }
        if cfg.normalization == "LN":
            out |= {p + "ln1.w": (k, d), p + "ln1.b": (k, d)}
            if not cfg.attn_only:
                out |= {p + "ln2.w": (k, d), p + "ln2.b": (k, d)}
    if cfg.normalization == "LN":
        out |= {"ln_final.w": (k, d), "ln_final.b": (k, d)}
    return out


@pytest.mark.parametrize("normalization", [None, "LN"])
@pytest.mark.parametrize("attn_only", [False, True])
def test_parameter_names_and_shapes(normalization, attn_only):
    cfg = small_cfg(normalization=normalization, attn_only=attn_only)
    model = Transformer(cfg, seeds=[0, 1, 2])
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == expected_shapes(cfg, 3)
    # the state dict holds exactly the parameters (the causal mask is not persistent)
    assert set(model.state_dict()) == set(shapes)
    if attn_only:
        assert not any(".mlp." in n for n in shapes)
        assert not any(".ln2." in n for n in shapes)
    if normalization is None:
        assert not any(n.startswith("ln_final.") or ".ln" in n for n in shapes)
    else:
        assert "ln_final.w" in shapes and "blocks.0.ln1.w" in shapes


def test_biases_zero_and_layernorm_weights_one_at_init():
    model = Transformer(small_cfg(normalization="LN"), seeds=[3, 4])
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("b"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif leaf == "w":
            assert torch.equal(p, torch.ones_like(p)), name


# -----------------------------------------------------------------------------
# forward pass


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"normalization": "LN"},
        {"attn_only": True},
        {"act_fn": "gelu", "n_layers": 1},
        {"normalization": "LN", "attn_only": True},
    ],
)
def test_forward_matches_reference_implementation(overrides):
    cfg = small_cfg(**overrides)
    model = Transformer(cfg, seeds=[5, 6])
    perturb_all(model, seed=1)
    tokens = random_tokens(4, cfg.n_ctx, seed=2)
    logits = model(tokens)
    assert logits.shape == (2, 4, cfg.n_ctx, cfg.d_vocab_out)
    for k in range(2):
        ref = reference_logits(model.member_state_dict(k), cfg, tokens)
        torch.testing.assert_close(logits[k].double(), ref, atol=2e-5, rtol=1e-5)


def test_output_shapes_and_last():
    cfg = small_cfg()
    model = Transformer(cfg, seeds=[0, 1, 2])
    tokens = random_tokens(5, 9, seed=0)  # shorter than n_ctx
    full = model(tokens)
    assert full.shape == (3, 5, 9, cfg.d_vocab_out)
    tail = model(tokens, last=4)
    assert tail.shape == (3, 5, 4, cfg.d_vocab_out)
    torch.testing.assert_close(tail, full[:, :, -4:], atol=1e-6, rtol=0)
    # per-member tokens (K, B, T): member k sees its own batch
    per_member = torch.stack([random_tokens(5, 9, seed=s) for s in range(3)])
    out = model(per_member)
    assert out.shape == (3, 5, 9, cfg.d_vocab_out)
    for k in range(3):
        torch.testing.assert_close(out[k], model(per_member[k])[k], atol=1e-6, rtol=0)
    assert model.residual(tokens).shape == (3, 5, 9, cfg.d_model)


@pytest.mark.parametrize("normalization", [None, "LN"])
def test_causality(normalization):
    cfg = small_cfg(normalization=normalization)
    model = Transformer(cfg, seeds=[0, 1])
    tokens = random_tokens(3, cfg.n_ctx, seed=4)
    base = model(tokens)
    for t in (0, 4, cfg.n_ctx - 1):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.d_vocab
        out = model(changed)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], atol=1e-6, rtol=0)
        # and the change is visible at and after t (so the check above can fail)
        assert (out[:, :, t:] - base[:, :, t:]).abs().amax() > 1e-3


# -----------------------------------------------------------------------------
# ensembles


@pytest.mark.parametrize("init", ["nanda", "normal"])
def test_member_equals_single_model_with_same_seed(init):
    cfg = small_cfg(normalization="LN", init=init)
    seeds = [11, 7, 2024]
    stack = Transformer(cfg, seeds=seeds)
    tokens = random_tokens(4, cfg.n_ctx, seed=9)
    stacked_logits = stack(tokens)
    for k, seed in enumerate(seeds):
        single = Transformer(cfg, seeds=seed)
        assert single.n_models == 1
        member = stack.member_state_dict(k)
        for name, t in single.state_dict().items():
            assert torch.equal(member[name], t[0]), name
        # a batched matmul and a single one may round differently on some CPUs: a few ulp of logits ~5
        torch.testing.assert_close(stacked_logits[k], single(tokens)[0], atol=1e-5, rtol=1e-5)
    # different seeds give different weights
    assert not torch.equal(stack.embed.W_E[0], stack.embed.W_E[1])


def test_member_state_dict_round_trip():
    cfg = small_cfg(normalization="LN")
    model = Transformer(cfg, seeds=[1, 2, 3])
    perturb_all(model, seed=0)
    states = [model.member_state_dict(k) for k in range(3)]
    for name, t in states[0].items():
        assert t.shape == model.state_dict()[name].shape[1:]
    rebuilt = Transformer.from_member_state_dicts(cfg, states)
    assert rebuilt.n_models == 3
    for name, t in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], t), name
    tokens = random_tokens(2, cfg.n_ctx, seed=1)
    assert torch.equal(rebuilt(tokens), model(tokens))
    # a subset / reordering of members rebuilds exactly those members
    pair = Transformer.from_member_state_dicts(cfg, [states[2], states[0]])
    assert torch.equal(pair.embed.W_E[0], model.embed.W_E[2])
    assert torch.equal(pair.embed.W_E[1], model.embed.W_E[0])
    # member_state_dict returns copies
    states[0]["embed.W_E"].zero_()
    assert model.embed.W_E[0].abs().sum() > 0


# -----------------------------------------------------------------------------
# initialisation scales


# Nanda's 5-digit addition code (Non_Modular_Addition_Grokking_Tasks.ipynb) draws every weight as
# randn / sqrt(fan) with fan = d_model for W_E, W_pos, W_Q, W_K, W_V, W_O, W_in and W_out, and
# fan = d_vocab_out for W_U.
NANDA_CFG = dict(d_vocab=12, d_vocab_out=10, n_ctx=17, d_model=64, n_layers=1, n_heads=4, d_head=16, d_mlp=256)


def _pooled_std(models: list[Transformer], name: str) -> float:
    return torch.cat([dict(m.named_parameters())[name].detach().flatten() for m in models]).std().item()


@pytest.mark.parametrize(
    "name,fan",
    [
        ("embed.W_E", "d_model"),
        ("pos_embed.W_pos", "d_model"),
        ("blocks.0.attn.W_Q", "d_model"),
        ("blocks.0.attn.W_K", "d_model"),
        ("blocks.0.attn.W_V", "d_model"),
        ("blocks.0.attn.W_O", "d_model"),
        ("blocks.0.mlp.W_in", "d_model"),
        ("blocks.0.mlp.W_out", "d_model"),  # as in Nanda's code (the issue text said d_mlp)
        ("unembed.W_U", "d_vocab_out"),
    ],
)
def test_nanda_init_scale(name, fan):
    cfg = ModelConfig(**NANDA_CFG, init="nanda")
    models = [Transformer(cfg, seeds=[s, s + 100]) for s in range(2)]  # 4 members pooled
    expected = 1 / math.sqrt(getattr(cfg, fan))
    std = _pooled_std(models, name)
    assert abs(std / expected - 1) < 0.08, (name, std, expected)


def test_normal_init_scale():
    cfg = ModelConfig(**NANDA_CFG, init="normal", init_std=0.05)
    model = Transformer(cfg, seeds=[0, 1])
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("W_"):
            std = p.detach().std().item()
            assert abs(std / 0.05 - 1) < 0.1, (name, std)
            assert abs(p.detach().mean().item()) < 0.05 * 0.15


# -----------------------------------------------------------------------------
# gradient norms


def test_parameter_group():
    assert parameter_group("embed.W_E") == "embed"
    assert parameter_group("pos_embed.W_pos") == "embed"
    assert parameter_group("unembed.W_U") == "unembed"
    assert parameter_group("blocks.1.attn.W_O") == "attn"
    assert parameter_group("blocks.0.mlp.b_in") == "mlp"
    assert parameter_group("blocks.0.ln1.w") == "ln"
    assert parameter_group("ln_final.b") == "ln"


def test_grad_norm_keys_cover_the_right_parameters():
    model = Transformer(small_cfg(normalization="LN"), seeds=[0])
    keys = grad_norm_keys(model)
    names = [n for n, _ in model.named_parameters()]
    assert keys["grad_norm/global"] == names
    assert sorted(keys["grad_norm/embed"]) == ["embed.W_E", "pos_embed.W_pos"]
    assert keys["grad_norm/unembed"] == ["unembed.W_U"]
    assert sorted(keys["grad_norm/ln"]) == sorted(n for n in names if ".ln" in n or n.startswith("ln_final"))
    assert sorted(keys["grad_norm/layer_1"]) == sorted(n for n in names if n.startswith("blocks.1."))
    assert set(keys) == {
        "grad_norm/global", "grad_norm/embed", "grad_norm/attn", "grad_norm/mlp", "grad_norm/ln",
        "grad_norm/unembed", "grad_norm/layer_0", "grad_norm/layer_1",
    }  # fmt: skip


def test_grad_norms_match_manual_norm_per_member():
    cfg = small_cfg(normalization="LN")
    model = Transformer(cfg, seeds=[0, 1, 2])
    tokens = torch.stack([random_tokens(4, cfg.n_ctx, seed=s) for s in range(3)])
    targets = random_tokens(4 * cfg.n_ctx * 3, 1, seed=7, vocab=cfg.d_vocab_out).view(3, 4, cfg.n_ctx)
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
    (loss.view(3, -1).mean(1) * torch.tensor([1.0, 2.0, 0.5])).sum().backward()
    keys = grad_norm_keys(model)
    norms = grad_norms(model, keys)
    assert set(norms) == set(keys)
    params = dict(model.named_parameters())
    for key, names in keys.items():
        assert norms[key].shape == (3,)
        for k in range(3):
            manual = torch.linalg.norm(torch.cat([params[n].grad[k].flatten() for n in names]))
            torch.testing.assert_close(norms[key][k], manual, rtol=1e-5, atol=1e-8)
    # members differ (different weights and loss scales)
    assert len(set(norms["grad_norm/global"].tolist())) == 3


def test_grad_norms_closed_form_and_missing_grads():
    cfg = small_cfg(n_layers=1)
    model = Transformer(cfg, seeds=[0, 1])
    for p in model.parameters():
        p.grad = None
    w_e, w_u = model.embed.W_E, model.unembed.W_U
    w_e.grad = torch.stack([torch.full(w_e.shape[1:], 1.0), torch.full(w_e.shape[1:], 2.0)])
    w_u.grad = torch.stack([torch.full(w_u.shape[1:], 3.0), torch.zeros(w_u.shape[1:])])
    norms = grad_norms(model, grad_norm_keys(model))
    n_e, n_u = w_e[0].numel(), w_u[0].numel()
    torch.testing.assert_close(norms["grad_norm/embed"], torch.tensor([n_e**0.5, 2 * n_e**0.5]))
    torch.testing.assert_close(norms["grad_norm/unembed"], torch.tensor([3 * n_u**0.5, 0.0]))
    torch.testing.assert_close(norms["grad_norm/global"], torch.tensor([(n_e + 9 * n_u) ** 0.5, (4 * n_e) ** 0.5]))
    # groups whose parameters have no gradient are left out
    assert "grad_norm/attn" not in norms and "grad_norm/layer_0" not in norms


# -----------------------------------------------------------------------------
# answer positions only: the last block computes queries and MLP where the loss is read


@pytest.mark.parametrize(
    "overrides",
    [{"n_layers": 1}, {"n_layers": 2}, {"n_layers": 3, "normalization": "LN"}, {"attn_only": True},
     {"normalization": "LN", "attn_only": True, "n_layers": 2}, {"act_fn": "gelu", "seeds": [5]}],
)  # fmt: skip
def test_last_positions_give_the_full_forward_values_with_less_work(overrides):
    overrides = dict(overrides)
    seeds = overrides.pop("seeds", [3, 4])  # a single model (K = 1) too
    cfg = small_cfg(**overrides)
    model = Transformer(cfg, seeds=seeds)
    perturb_all(model, seed=2)
    tokens = random_tokens(6, cfg.n_ctx, seed=5)
    seen = []
    last_block = model.blocks[-1]
    hook_at = last_block.attn.W_O if cfg.attn_only else last_block.mlp.W_in
    module = last_block.attn if cfg.attn_only else last_block.mlp
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out.shape[2]))
    tail = model(tokens, last=4)
    handle.remove()
    assert seen == [4]  # the last block's output exists only at the 4 answer positions
    full = model(tokens)
    torch.testing.assert_close(tail, full[:, :, -4:], atol=1e-6, rtol=0)
    for k in range(len(seeds)):
        ref = reference_logits(model.member_state_dict(k), cfg, tokens)[:, -4:]
        torch.testing.assert_close(tail[k].double(), ref, atol=2e-5, rtol=1e-5)
    # and the gradients are those of the full forward pass
    weights = torch.randn(tail.shape, generator=torch.Generator().manual_seed(0))
    (tail * weights).sum().backward()
    trimmed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (full[:, :, -4:] * weights).sum().backward()
    assert hook_at.grad.abs().max() > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(trimmed[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    # asking for every position (or more) is the full forward pass
    for last in (cfg.n_ctx, cfg.n_ctx + 3):
        torch.testing.assert_close(model(tokens, last=last), full, atol=0, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"act_fn": "gelu", "normalization": "LN"}, {"attn_only": True}])
def test_gradients_match_the_reference_implementation(overrides):
    # In-place ReLU, the shared embedding lookup and the answer-only last block must not bend gradients.
    cfg = small_cfg(**overrides)
    model = Transformer(cfg, seeds=[1, 2])
    perturb_all(model, seed=0)
    tokens = random_tokens(4, cfg.n_ctx, seed=1)
    model(tokens, last=3).sum().backward()
    for k in range(2):
        leaves = {n: t[k].detach().double().requires_grad_() for n, t in model.state_dict().items()}
        reference_logits(leaves, cfg, tokens)[:, -3:].sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad[k].double(), leaves[name].grad, atol=2e-5, rtol=1e-4, msg=name)
