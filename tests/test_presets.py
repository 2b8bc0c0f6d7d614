"""Each experiment preset builds the model and optimiser of its published setup."""

import math

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir

import addrepro.train  # noqa: F401 - registers the ${uid:} resolver used by the configs
from addrepro.reports.job import load_reference
from addrepro.training.config import architecture, task_spec, typed, validate
from addrepro.training.module import AdditionModule
from addrepro.training.recorder import Member


def build(experiment: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"])
    validate(cfg)
    spec = task_spec(cfg.data)
    member = Member(seed=0, data_seed=0, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, job_dir=REPO)
    module = AdditionModule(spec, architecture(cfg.model, spec), [member], typed(cfg))
    return cfg, spec, module


@pytest.mark.parametrize("preset,d", [("nanda_5digit", 512), ("nanda_5digit_d128", 128)])
def test_nanda_5digit_matches_the_published_setup(preset, d):
    cfg, spec, module = build(preset)
    assert (spec.n_digits, spec.base, spec.order, spec.task) == (5, 10, "msb", "add")
    assert cfg.data.batch_size == 64 and cfg.data.train_size is None and cfg.trainer.max_steps == 3000
    shapes = {n: tuple(p.shape[1:]) for n, p in module.model.named_parameters()}
    assert shapes == {
        "embed.W_E": (12, d),
        "pos_embed.W_pos": (17, d),
        "blocks.0.attn.W_Q": (4, d, d // 4),
        "blocks.0.attn.W_K": (4, d, d // 4),
        "blocks.0.attn.W_V": (4, d, d // 4),
        "blocks.0.attn.W_O": (4, d // 4, d),
        "blocks.0.mlp.W_in": (d, 4 * d),
        "blocks.0.mlp.b_in": (4 * d,),
        "blocks.0.mlp.W_out": (4 * d, d),
        "blocks.0.mlp.b_out": (d,),
        "unembed.W_U": (d, 10),  # the 10 digits only; no attention biases, no LayerNorm
    }
    params = dict(module.model.named_parameters())
    # Nanda's code: every weight N(0, 1/d_model), W_U N(0, 1/d_vocab_out) (W_out too uses d_model)
    fans = {"embed.W_E": d, "blocks.0.attn.W_Q": d, "blocks.0.mlp.W_in": d, "blocks.0.mlp.W_out": d, "unembed.W_U": 10}
    for name, fan in fans.items():
        assert params[name].std().item() == pytest.approx(1 / math.sqrt(fan), rel=0.1), name
    opt = module.configure_optimizers()
    assert opt.member_lr.tolist() == [pytest.approx(1e-4)] and opt.member_wd.tolist() == [pytest.approx(0.1)]
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["warmup_steps"] == 10
    assert cfg.reference == "nanda_5digit"
    reference = load_reference(cfg.reference)
    assert reference["steps"] == [100, 500, 1000, 1400, 1800, 3000]
    assert reference["places"]["5"][0] == 0.60 and reference["places"]["0"][-1] == 0.002


def test_nanda_finite_uses_750_pairs():
    cfg, _, module = build("nanda_5digit_finite")
    assert cfg.data.train_size == 750 and cfg.model.width == 512 and cfg.optimizer.lr == 1e-4
    module.stack.build_data(module.device)
    stream = module.stack.streams[0]
    assert len(stream.train_tokens) == 750
    assert len(torch.unique(stream.train_tokens, dim=0)) == 750
    assert stream.full_batch and stream.next() is stream.train_tokens


def test_quirke_5digit_matches_the_paper():
    cfg, spec, module = build("quirke_5digit")
    params = dict(module.model.named_parameters())
    assert tuple(params["blocks.0.attn.W_Q"].shape[1:]) == (3, 510, 170)
    assert tuple(params["blocks.0.mlp.W_in"].shape[1:]) == (510, 2040)
    assert "blocks.0.ln1.w" in params and "ln_final.w" in params
    opt = module.configure_optimizers()
    assert opt.member_lr.tolist() == [pytest.approx(8e-5)] and opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert cfg.data.batch_size == 64 and cfg.trainer.max_steps == 5000 and cfg.seed == 129000
    # their notebook's generator: 20% of batches with 20% of digit pairs made to sum to 9
    assert cfg.data.sampler == "carry_enriched" and cfg.data.enrich_batches == cfg.data.enrich_digits == 0.2
    assert cfg.optimizer.warmup_steps == 10 and cfg.optimizer.weight_decay == 0.1
    assert cfg.metrics.spike_factor == 5.0  # enriched batches' ~3x loss is not a spike
