"""Interpretability analyses on a small CPU-trained 3-digit model, and the `addrepro.analyze` CLI."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import cli_env, run_cli

pytest.importorskip("transformer_lens")

from addrepro.model.transformer import ModelConfig, Transformer  # noqa: E402

from addrepro.interp import ablation, attention, composition, logit_attribution, over_training  # noqa: E402
from addrepro.interp.common import load_subject, write_outputs  # noqa: E402
from addrepro.task.spec import TaskSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


SUBJECT = {"carry_size": 32, "chain_size": 16}  # smaller carry-conditioned sets than training's


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A 1-layer 3-digit model trained on the CPU (~1000 steps, ~12 s of CPU); learns every place."""
    job = tmp_path_factory.mktemp("analyze") / "job"
    env = cli_env() | {"OMP_NUM_THREADS": "1"}
    args = [
        "data.n_digits=3",
        "trainer.max_steps=1000",
        "model.width=64",
        "optimizer.lr=5e-3",
        "logger=csv",
        "trainer.progress_bar=false",
        "trainer.plots=false",
        f"hydra.run.dir={job}",
        "trainer.ckpt_every_n_steps=250",
        "trainer.val_every_n_steps=250",
        "metrics.every_n_steps=500",
        "data.val_size=512",
        "metrics.carry_set_size=32",
        "metrics.chain_set_size=16",
    ]
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "addrepro.train", *args],
        cwd=job.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((job / "status.json").read_text())
    assert status["final_val_loss"] < 0.3, status  # it learned (most of) the task
    return job


@pytest.fixture(scope="module")
def subject(job):
    return load_subject(job / "checkpoints" / "last.ckpt", **SUBJECT)


def random_subject(n_layers: int, norm: str | None, seed: int = 0):
    spec = TaskSpec(n_digits=3)
    cfg = ModelConfig(
        d_vocab=spec.d_vocab,
        d_vocab_out=spec.base,
        n_ctx=spec.seq_len - 1,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        normalization=norm,
    )
    model = Transformer(cfg, seeds=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("ln") or ".ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    ckpt = {
        "task": asdict(spec),
        "model_config": cfg.to_dict(),
        "model": model.member_state_dict(0),
        "config": {"data": {"val_size": 256, "val_seed": 5}},
    }
    return load_subject(ckpt, **SUBJECT), model


def test_attention_units_head_reads_a0_b0(subject, tmp_path):
    result = attention.run(subject)
    pattern = torch.as_tensor(result["pattern"])  # (layers, heads, places, T)
    labels = result["key_labels"]
    a0, b0 = labels.index("a0"), labels.index("b0")
    units = pattern[:, :, 0]  # from the position predicting place 0
    on_units = units[..., a0] + units[..., b0]
    layer, head = divmod(int(on_units.argmax()), subject.n_heads)
    best = units[layer, head]
    assert best[a0] > 0.3 and best[b0] > 0.3 and best[a0] + best[b0] > 0.8, best
    assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-4)
    assert result["query_labels"][0].endswith("→c0")
    paths = write_outputs(result, attention.plot(result), tmp_path / "attention")
    assert [p.suffix for p in paths] == [".json", ".png"]


def test_ablation_whole_mlp_hurts_every_carry_place(subject):
    result = ablation.run(subject, top_k=20)
    n = subject.spec.n_digits
    mlp = result["components"]["L0_mlp"]
    base = result["baseline"]
    for mode, least in (("zero", 0.5), ("mean", 0.2)):  # the mean keeps some of the carry-out prior
        for j in range(1, n + 1):
            delta = mlp[mode]["val"][j]
            assert delta > least and delta > 5 * base["val"][j], (mode, j, mlp[mode]["val"], base["val"])
    for name, delta in mlp["zero"]["carry"].items():  # every carry-conditioned set, at its place
        assert delta > 0.5, (name, delta)
    assert set(result["components"]) == {"L0H0", "L0H1", "L0H2", "L0H3", "L0_mlp"}
    assert len(result["baseline"]["carry"]) == len(subject.carry_sets.slices)
    for mode in ("zero", "mean"):
        top = result["neurons"][mode]
        assert len(top) == 20
        totals = [r["total"] for r in top]
        assert totals == sorted(totals, reverse=True) and totals[0] > 0
        assert len(top[0]["val"]) == n + 1
    json.dumps(result, default=str)


def test_neuron_ablation_fast_path_equals_hooks():
    """The last layer's residual patch and the hooked rerun give the same losses."""
    subject, _ = random_subject(2, "LN", seed=3)
    batch = ablation.EvalBatch(subject.val_tokens[:64], 64, {})
    name = "blocks.1.mlp.hook_post"
    fill = ablation.position_means(subject.bridge, subject.val_tokens, {name})[name]
    fast = ablation._last_layer_neuron_losses(subject, batch, fill, chunk=16)
    hooked = ablation._hooked_neuron_losses(subject, batch, 1, fill, chunk=16)
    assert (fast - hooked).abs().max() < 1e-4


def test_logit_attribution_sums_to_the_logits(subject):
    result = logit_attribution.run(subject)
    actual = torch.tensor(result["actual"]["correct"])
    total = torch.tensor([d["correct"] for d in result["components"].values()]).sum(0)
    assert torch.allclose(total, actual, rtol=1e-4, atol=1e-3), (total, actual)
    assert result["sum_error"] < 1e-3
    for key in ("carry", "carry_signed"):
        total = torch.tensor([d[key] for d in result["components"].values()]).sum(0)
        assert torch.allclose(total, torch.tensor(result["actual"][key]), rtol=1e-4, atol=1e-3)
    assert {"embed", "pos_embed", "L0H0", "L0_mlp", "bias"} <= set(result["components"])
    assert len(result["neurons"]["L0"]) == 10
    # A trained model is confident: the correct logit's carry readout favours the right answer.
    assert all(v > 0 for v in result["actual"]["carry_signed"][1:])


def test_logit_attribution_exact_with_layernorm():
    subject, model = random_subject(2, "LN", seed=1)
    result = logit_attribution.run(subject, max_examples=128)
    assert result["sum_error"] < 1e-4
    # Per example and per logit, against our own model's logits.
    comps, extra, logits = logit_attribution.residual_components(subject, subject.val_tokens[:16])
    contrib = logit_attribution.to_logits(subject, torch.stack(list(comps.values())), extra["scale"])
    summed = contrib.sum(0) + logit_attribution.constant_logits(subject)
    ours = model(subject.val_tokens[:16, :-1])[0][
        :, [subject.spec.answer_start - 1 + e for e in subject.spec.emission_index]
    ]
    assert (summed - ours).abs().max() < 1e-4


def test_composition_scores_in_unit_interval_and_by_hand():
    subject, model = random_subject(2, None, seed=2)
    result = composition.run(subject)
    for mode in ("Q", "K", "V"):
        values = list(result["pairs"][mode].values())
        assert len(values) == 16 and all(0 <= v <= 1 for v in values)
    attn0, attn1 = model.blocks[0].attn, model.blocks[1].attn
    with torch.no_grad():
        ov_a = attn0.W_V[0, 1] @ attn0.W_O[0, 1]
        qk_b = attn1.W_Q[0, 2] @ attn1.W_K[0, 2].T
        ov_b = attn1.W_V[0, 2] @ attn1.W_O[0, 2]
    expected = {
        "Q": composition.hand_score(ov_a, qk_b),
        "K": composition.hand_score(ov_a, qk_b.T),
        "V": composition.hand_score(ov_a, ov_b),
    }
    for mode, value in expected.items():
        assert result["pairs"][mode]["L0H1->L1H2"] == pytest.approx(value, abs=1e-5)
    one_layer, _ = random_subject(1, None)
    assert composition.run(one_layer)["pairs"] == {}


def test_over_training_attention(job, tmp_path):
    result = over_training.run(job, "attention", {"val_size": 128, **SUBJECT})
    assert result["steps"] == [250, 500, 750, 1000]
    assert all(len(v) == 4 for v in result["series"].values())
    assert "L0H0/place_0" in result["series"]
    paths = write_outputs(result, over_training.plot(result), tmp_path / "over")
    assert all(p.stat().st_size > 0 for p in paths)


def test_cli_attention_writes_png_and_json(job, tmp_path):
    ckpt = job / "checkpoints" / "last.ckpt"
    proc = run_cli("addrepro.analyze", [f"checkpoint={ckpt}", "analysis=attention", "data.val_size=256"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png, js = job / "analysis" / "attention_last.png", job / "analysis" / "attention_last.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    data = json.loads(js.read_text())
    assert data["analysis"] == "attention" and data["step"] == 1000 and len(data["pattern"]) == 1
    assert os.listdir(tmp_path) == []  # no stray outputs/ or .hydra/ in the working directory


@pytest.mark.parametrize(
    "args,message",
    [
        (["checkpoint=/nonexistent/x.ckpt", "analysis=attention"], "checkpoint=/nonexistent/x.ckpt does not exist"),
        (["analysis=bogus"], "unknown analysis='bogus'"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path):
    proc = run_cli("addrepro.analyze", args, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
