"""Export to TransformerLens 4 (TransformerBridge): the exported model computes our logits exactly."""

import sys
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("transformer_lens")

from addrepro.model.export import MISSING_MESSAGE, export_diff, to_transformer_lens  # noqa: E402
from addrepro.model.transformer import ModelConfig, Transformer  # noqa: E402
from addrepro.task.spec import TaskSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(base: int, n_layers: int, attn_only: bool, norm: str | None, act: str, seed: int = 0) -> Transformer:
    spec = TaskSpec(n_digits=3, base=base)
    cfg = ModelConfig(
        d_vocab=spec.d_vocab,
        d_vocab_out=base,
        n_ctx=spec.seq_len - 1,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        act_fn=act,
        normalization=norm,
        attn_only=attn_only,
    )
    model = Transformer(cfg, seeds=[seed, seed + 1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial biases and LayerNorm weights, which init leaves at 0 and 1
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


# Every value of every option appears, in varied combinations: (base, layers, attn_only, norm, act).
SHAPES = [
    (2, 1, False, None, "relu"),
    (2, 2, True, "LN", "gelu"),
    (2, 3, False, "LN", "gelu"),
    (10, 1, True, None, "gelu"),
    (10, 1, False, "LN", "relu"),
    (10, 2, False, None, "gelu"),
    (10, 3, True, "LN", "relu"),
    (16, 1, False, "LN", "gelu"),
    (16, 2, False, "LN", "relu"),
    (16, 3, False, None, "relu"),
    (16, 2, True, None, "relu"),
]


@pytest.mark.parametrize("base,n_layers,attn_only,norm,act", SHAPES)
def test_export_logits_equal(base, n_layers, attn_only, norm, act):
    model = random_model(base, n_layers, attn_only, norm, act, seed=base + n_layers)
    for member in (0, 1):
        bridge = to_transformer_lens((model, member))  # verify=True checks too; here the exact bound
        diff, size = export_diff(model, member, bridge, batch=32, seed=member)
        assert diff <= 1e-5 * max(1.0, size), (diff, size)  # float32 in two summation orders, logits of ~size
        assert bridge(torch.zeros(1, model.cfg.n_ctx, dtype=torch.long)).shape[-1] == base  # d_vocab_out


def test_export_hooks_match_the_model():
    """Zero-ablating a head through hook_z equals zeroing its W_O in our model."""
    model = random_model(10, 2, False, "LN", "gelu")
    bridge = to_transformer_lens(model)
    tokens = torch.randint(0, 12, (8, model.cfg.n_ctx), generator=torch.Generator().manual_seed(0))

    def hook(z, hook=None):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    hooked = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", hook)])
    with torch.no_grad():
        model.blocks[1].attn.W_O[0, 2] = 0
    assert (hooked - model(tokens)[0]).abs().max() < 1e-5
    _, cache = bridge.run_with_cache(tokens)
    for name in (
        "blocks.0.attn.hook_pattern",
        "blocks.1.mlp.hook_post",
        "blocks.0.hook_resid_pre",
        "ln_final.hook_scale",
    ):
        assert name in cache


def test_export_from_checkpoint_dict():
    model = random_model(10, 1, False, None, "relu")
    spec = TaskSpec(n_digits=3)
    ckpt = {"task": asdict(spec), "model_config": model.cfg.to_dict(), "model": model.member_state_dict(1)}
    bridge = to_transformer_lens(ckpt)
    assert bridge.addrepro_spec == spec
    assert export_diff(model, 1, bridge)[0] <= 1e-5


def test_missing_transformer_lens_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # makes `import transformer_lens` fail
    with pytest.raises(ImportError) as e:
        to_transformer_lens(random_model(10, 1, False, None, "relu"))
    assert str(e.value) == MISSING_MESSAGE == 'TransformerLens is not installed: pip install -e ".[interp]"'
