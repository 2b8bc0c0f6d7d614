"""Interpretability analyses and the `addrepro.analyze` CLI.

What an analysis should *find* is tested on a hand-built adder (``adder.py``) whose weights say
exactly what every head, the MLP and every logit do: those results are the same on every CPU. A
small CPU-trained model is only ever compared with itself (its reported numbers against a plain
re-computation from its own weights), never against a threshold on how its training turned out:
an Intel and an AMD CPU round differently and train it to slightly different models.
"""

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import adder
import matplotlib.pyplot as plt
import pytest
import torch
from conftest import cli_env, run_cli

pytest.importorskip("transformer_lens")

from addrepro.interp import ablation, attention, composition, logit_attribution, over_training  # noqa: E402
from addrepro.interp.common import (  # noqa: E402
    answer_positions,
    answer_targets,
    load_subject,
    naive_digits,
    write_outputs,
)
from addrepro.model.transformer import ModelConfig, Transformer  # noqa: E402
from addrepro.rundir.metrics_file import load_rows  # noqa: E402
from addrepro.task.spec import TaskSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


SUBJECT = {"carry_size": 32, "chain_size": 16}  # smaller carry-conditioned sets than training's


STEPS = [100, 200, 300, 400]  # the trained job's checkpoints


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A 1-layer 3-digit model trained on the CPU (400 steps, ~5 s of CPU), checkpointed every 100 steps.

    No test depends on how well it learned (that differs between CPUs): only on its own weights."""
    job = tmp_path_factory.mktemp("analyze") / "job"
    env = cli_env() | {"OMP_NUM_THREADS": "1"}
    args = [
        "data.n_digits=3",
        f"trainer.max_steps={STEPS[-1]}",
        "model.width=64",
        "optimizer.lr=5e-3",
        "logger=csv",
        "trainer.progress_bar=false",
        "trainer.plots=false",
        f"hydra.run.dir={job}",
        f"trainer.ckpt_every_n_steps={STEPS[0]}",
        "trainer.ckpt_schedule=linear",
        f"trainer.val_every_n_steps={STEPS[0]}",
        "metrics.every_n_steps=200",
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
    initial = next(r["val/loss"] for r in load_rows(job) if "val/loss" in r and r["step"] == 0)
    # (c) it trained: the loss halves, from ~log 10 at step 0 (it is below a tenth of that by step 400
    # on every seed tried, so any CPU's rounding clears this by far)
    assert status["final_val_loss"] < 0.5 * initial, (status, initial)
    return job


@pytest.fixture(scope="module")
def subject(job):
    return load_subject(job / "checkpoints" / "last.ckpt", **SUBJECT)


@pytest.fixture(scope="module")
def adder_subject():
    """(b) The hand-built adder, with a 512-pair validation set: every answer right, with logit 20."""
    return load_subject(adder.checkpoint(val_size=512), **SUBJECT)


# -- a plain re-computation of a 1-layer model from its state dict, for comparisons --------------------


def reference_run(
    ckpt: dict, tokens: torch.Tensor, head_fill: dict | None = None, mlp_fill=None, neuron_fill: dict | None = None
) -> dict:
    """A 1-layer model without LayerNorm written out with einsums in float64 from the checkpoint's
    state dict (neither our fused model nor TransformerLens), on the inputs ``tokens[:, :-1]``.

    ``head_fill[h]`` replaces head h's output ``z_h W_O[h]`` (0, or ``(T, d_model)``), ``mlp_fill`` the
    MLP's output, ``neuron_fill[n]`` neuron n's activation (0, or ``(T,)``). Returns the attention
    pattern ``(B, H, T, T)``, every head's output ``(B, H, T, d)``, the neurons' activations
    ``(B, T, d_mlp)``, the MLP's output ``(B, T, d)``, the logits ``(B, T, V)`` and the per-place
    losses ``(B, n+1)``."""
    assert ckpt["model_config"]["n_layers"] == 1 and ckpt["model_config"]["normalization"] is None
    w = {name: p.double() for name, p in ckpt["model"].items()}
    spec = TaskSpec(**ckpt["task"])
    inp = tokens[:, :-1]
    t = inp.shape[1]
    x = w["embed.W_E"][inp] + w["pos_embed.W_pos"][:t]
    q, k, v = (torch.einsum("btd,hde->bhte", x, w[f"blocks.0.attn.W_{m}"]) for m in "QKV")
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    pattern = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    heads = torch.einsum("bhte,hed->bhtd", pattern @ v, w["blocks.0.attn.W_O"])
    used = heads.clone()
    for h, fill in (head_fill or {}).items():
        used[:, h] = fill
    x = x + used.sum(1)
    post = torch.relu(x @ w["blocks.0.mlp.W_in"] + w["blocks.0.mlp.b_in"])
    used = post.clone()
    for n, fill in (neuron_fill or {}).items():
        used[..., n] = fill
    mlp = used @ w["blocks.0.mlp.W_out"] + w["blocks.0.mlp.b_out"]
    logits = (x + (mlp if mlp_fill is None else mlp_fill)) @ w["unembed.W_U"]
    answer = logits[:, answer_positions(spec)]
    losses = -answer.log_softmax(-1).gather(-1, answer_targets(tokens, spec)[..., None]).squeeze(-1)
    return {"pattern": pattern, "heads": heads, "post": post, "mlp": mlp, "logits": logits, "losses": losses}


_BASELINES: dict = {}


def reference_deltas(subject, **fills) -> dict:
    """``{"val": [Δ loss of place j], "carry": {set: Δ loss at its place}}`` of an ablation, by
    ``reference_run`` on the subject's own validation and carry-conditioned sets."""
    out = {}
    for key, tokens in (("val", subject.val_tokens), ("carry", subject.carry_sets.tokens)):
        if (id(subject), key) not in _BASELINES:
            _BASELINES[id(subject), key] = (subject, reference_run(subject.ckpt, tokens)["losses"])
        out[key] = reference_run(subject.ckpt, tokens, **fills)["losses"] - _BASELINES[id(subject), key][1]
    return {
        "val": out["val"].mean(0).tolist(),
        "carry": {
            name: out["carry"][lo:hi, j].mean().item() for name, (j, lo, hi) in subject.carry_sets.slices.items()
        },
    }


def assert_deltas_equal(got: dict, want: dict, tol: float = 1e-4) -> None:
    assert got["val"] == pytest.approx(want["val"], abs=tol, rel=tol)
    assert got["carry"].keys() == want["carry"].keys()
    for name, value in want["carry"].items():
        assert got["carry"][name] == pytest.approx(value, abs=tol, rel=tol), name


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


def test_attention_units_head_reads_a0_b0(adder_subject, subject, tmp_path):
    # (b) The adder's head h reads, from the position predicting place j, half a_{j-h} and half b_{j-h}.
    result = attention.run(adder_subject)
    pattern = torch.as_tensor(result["pattern"])  # (layers, heads, places, T)
    labels = result["key_labels"]
    a0, b0 = labels.index("a0"), labels.index("b0")
    units = pattern[:, :, 0]  # from the position predicting place 0
    on_units = units[..., a0] + units[..., b0]
    layer, head = divmod(int(on_units.argmax()), adder_subject.n_heads)
    best = units[layer, head]
    assert (layer, head) == (0, 0)
    assert best[a0] > 0.3 and best[b0] > 0.3 and best[a0] + best[b0] > 0.8, best
    positions = answer_positions(adder_subject.spec)
    for h in range(adder_subject.n_heads):
        for j, pos in enumerate(positions):
            want = torch.zeros(pattern.shape[-1])
            want[adder.attended(h, pos)] = 0.5
            assert torch.allclose(pattern[0, h, j], want, atol=1e-6), (h, j, pattern[0, h, j])
        own = result["heads"][f"L0H{h}"]["own_operands"]  # attention on a_j + b_j: head 0's whole job
        assert own == pytest.approx([1.0, 1.0, 1.0, 0.0] if h == 0 else [0.0] * 4, abs=1e-6), (h, own)
    assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-4)
    assert result["query_labels"] == ["c1→c0", "c2→c1", "c3→c2", "=→c3"]
    # (a) The trained model's patterns are the softmax of its own scores, re-computed from its weights.
    trained = attention.run(subject)
    want = reference_run(subject.ckpt, subject.val_tokens)["pattern"][:, :, answer_positions(subject.spec)].mean(0)
    assert torch.allclose(torch.as_tensor(trained["pattern"])[0].double(), want, atol=1e-5)
    assert trained["query_labels"][0].endswith("→c0")
    paths = write_outputs(trained, attention.plot(trained), tmp_path / "attention")
    assert [p.suffix for p in paths] == [".json", ".png"]


def test_ablation_whole_mlp_hurts_every_carry_place(adder_subject):
    # (b) The adder computes every answer in its MLP: without it every logit is 0 (loss log 10 at every
    # place and on every carry set, from 0); the position mean of its output leaves only each place's
    # digit frequencies, times the answer logit 20.
    subject = adder_subject
    result = ablation.run(subject, top_k=20)
    n = subject.spec.n_digits
    mlp = result["components"]["L0_mlp"]
    base = result["baseline"]
    assert max(base["val"]) < 1e-6 and max(base["carry"].values()) < 1e-6  # it adds exactly
    targets = answer_targets(subject.val_tokens, subject.spec)
    freq = torch.stack([torch.bincount(targets[:, j], minlength=10) for j in range(n + 1)]) / len(targets)
    mean_logp = (adder.LOGIT * freq.double()).log_softmax(-1)  # (places, digits): the same for every input
    want_mean = [-mean_logp[j, targets[:, j]].mean().item() for j in range(n + 1)]
    assert mlp["zero"]["val"] == pytest.approx([math.log(10)] * (n + 1), abs=1e-5)
    assert mlp["mean"]["val"] == pytest.approx(want_mean, abs=1e-4)
    for mode, least in (("zero", 0.5), ("mean", 0.2)):  # the mean keeps some of the carry-out prior
        for j in range(1, n + 1):
            delta = mlp[mode]["val"][j]
            assert delta > least and delta > 5 * base["val"][j], (mode, j, mlp[mode]["val"], base["val"])
    carry_targets = answer_targets(subject.carry_sets.tokens, subject.spec)
    for name, delta in mlp["zero"]["carry"].items():  # every carry-conditioned set, at its place
        assert delta == pytest.approx(math.log(10), abs=1e-5), (name, delta)
        j, lo, hi = subject.carry_sets.slices[name]
        want = -mean_logp[j, carry_targets[lo:hi, j]].mean().item()
        assert mlp["mean"]["carry"][name] == pytest.approx(want, abs=1e-4), name
    # Each head carries one pair sum: head h reads pair j - h, so zeroing it changes nothing at the
    # places where that pair does not exist (it then reads "+" and "=", worth 0 already) ...
    heads = [result["components"][f"L0H{h}"]["zero"] for h in range(4)]
    assert abs(heads[0]["val"][n]) < 1e-6 and all(heads[0]["val"][j] > 1 for j in range(n))  # no pair n
    for h in (1, 2, 3):
        assert all(abs(heads[h]["val"][j]) < 1e-6 for j in range(h)), (h, heads[h]["val"])
    # ... and head 3 (pair j - 3) matters only for the carry-out when pairs 2 and 1 both sum to 9.
    assert heads[3]["carry"]["chain/place_3/len_2"] > 1
    assert abs(heads[3]["carry"]["chain/place_3/len_0"]) < 1e-6 and abs(heads[3]["carry"]["chain/place_3/len_1"]) < 1e-6
    # (a) every head and mode against the plain re-computation from the same weights
    parts = reference_run(subject.ckpt, subject.val_tokens)
    for h in range(4):
        for mode, fill in (("zero", 0.0), ("mean", parts["heads"][:, h].mean(0))):
            assert_deltas_equal(result["components"][f"L0H{h}"][mode], reference_deltas(subject, head_fill={h: fill}))
    assert set(result["components"]) == {"L0H0", "L0H1", "L0H2", "L0H3", "L0_mlp"}
    assert len(result["baseline"]["carry"]) == len(subject.carry_sets.slices)
    for mode in ("zero", "mean"):
        top = result["neurons"][mode]
        assert len(top) == 20
        totals = [r["total"] for r in top]
        assert totals == sorted(totals, reverse=True) and totals[0] > 0
        assert len(top[0]["val"]) == n + 1
    json.dumps(result, default=str)


def test_ablation_of_a_trained_model_matches_a_re_computation(subject):
    # (a) The trained model is compared with itself only: whatever it learned on this CPU, zeroing or
    # mean-filling each head and the MLP changes its losses exactly as a plain re-computation says.
    result = ablation.run(subject, top_k=3)
    parts = reference_run(subject.ckpt, subject.val_tokens)
    base = parts["losses"].mean(0)
    assert result["baseline"]["val"] == pytest.approx(base.tolist(), abs=1e-4, rel=1e-4)
    for mode in ("zero", "mean"):
        fill = 0.0 if mode == "zero" else parts["mlp"].mean(0)
        assert_deltas_equal(result["components"]["L0_mlp"][mode], reference_deltas(subject, mlp_fill=fill))
        for h in range(subject.n_heads):
            fill = 0.0 if mode == "zero" else parts["heads"][:, h].mean(0)
            want = reference_deltas(subject, head_fill={h: fill})
            assert_deltas_equal(result["components"][f"L0H{h}"][mode], want)
        # the reported neurons' changes are their own ablations (neuron n's activation replaced)
        for row in result["neurons"][mode]:
            n = row["neuron"]
            fill = 0.0 if mode == "zero" else parts["post"][..., n].mean(0)
            assert_deltas_equal(row, reference_deltas(subject, neuron_fill={n: fill}))
            assert row["total"] == pytest.approx(sum(row["val"]) / len(row["val"]), abs=1e-6)


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
    # (a) The readouts of the actual logits are those of the model's own logits, re-computed: the
    # correct digit's logit, and logit(naive + 1) - logit(naive) signed by the true carry.
    tokens = subject.val_tokens[: result["n_examples"]]
    logits = reference_run(subject.ckpt, tokens)["logits"][:, answer_positions(subject.spec)]
    naive, carry = naive_digits(tokens, subject.spec)
    correct = logits.gather(-1, answer_targets(tokens, subject.spec)[..., None]).squeeze(-1)
    read = lambda digit: logits.gather(-1, digit[..., None]).squeeze(-1)  # noqa: E731
    signed = ((2 * carry - 1) * (read((naive + 1) % 10) - read(naive))).mean(0)
    assert result["actual"]["correct"] == pytest.approx(correct.mean(0).tolist(), abs=1e-4, rel=1e-4)
    assert result["actual"]["carry_signed"] == pytest.approx(signed.tolist(), abs=1e-4, rel=1e-4)


def test_logit_attribution_finds_the_adders_mlp(adder_subject):
    # (b) All of the adder's answer comes from its MLP (the heads write only to dimensions the
    # unembedding does not read): the correct logit is 20 and the carry readout, signed by the true
    # carry, is +20 at every place; every other component contributes exactly 0.
    result = logit_attribution.run(adder_subject)
    places = adder_subject.spec.n_places
    assert result["sum_error"] < 1e-4
    for key in ("correct", "carry_signed"):
        assert result["actual"][key] == pytest.approx([adder.LOGIT] * places, abs=1e-4), key
        assert result["components"]["L0_mlp"][key] == pytest.approx([adder.LOGIT] * places, abs=1e-4), key
    for name, d in result["components"].items():
        if name != "L0_mlp":
            assert all(abs(v) < 1e-4 for key in ("correct", "carry", "carry_signed") for v in d[key]), name
    # a carry into place j >= 1 moves its answer one digit up: carry_cin1 = +20, carry_cin0 = -20
    assert result["actual"]["carry_cin1"][1:] == pytest.approx([adder.LOGIT] * (places - 1), abs=1e-4)
    assert result["actual"]["carry_cin0"] == pytest.approx([-adder.LOGIT] * places, abs=1e-4)


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
    with pytest.raises(ValueError, match="analysis=composition needs a model of at least 2 layers: this one has 1"):
        composition.run(one_layer)


def test_over_training_attention(job, tmp_path):
    result = over_training.run(job, "attention", {"val_size": 128, **SUBJECT})
    # Every checkpoint of the folder, one per step: the periodic ones and any saved at shelf exits or spikes.
    saved = {torch.load(p, weights_only=True)["step"] for p in (job / "checkpoints").glob("*.ckpt")}
    assert result["steps"] == sorted(saved) and set(STEPS) <= saved
    assert all(len(v) == len(saved) for v in result["series"].values())
    assert "L0H0/place_0" in result["series"]
    paths = write_outputs(result, over_training.plot(result), tmp_path / "over")
    assert all(p.stat().st_size > 0 for p in paths)


def test_over_training_at_chosen_steps(job, tmp_path):
    # The chosen steps' values are those of the whole-run analysis at the same steps.
    whole = over_training.run(job, "attention", {"val_size": 128, **SUBJECT})
    chosen = over_training.run(job, "attention", {"val_size": 128, **SUBJECT}, steps=[STEPS[1], STEPS[0]])
    assert chosen["steps"] == [STEPS[0], STEPS[1]]
    at = [whole["steps"].index(s) for s in chosen["steps"]]
    assert chosen["series"] == {k: [v[i] for i in at] for k, v in whole["series"].items()}
    with pytest.raises(ValueError, match=r"steps=\[7\] have no checkpoint in .* train with trainer.ckpt_steps"):
        over_training.run(job, "attention", {"val_size": 128, **SUBJECT}, steps=[STEPS[0], 7])


def test_cli_attention_writes_png_and_json(job, tmp_path):
    ckpt = job / "checkpoints" / "last.ckpt"
    proc = run_cli("addrepro.analyze", [f"checkpoint={ckpt}", "analysis=attention", "data.val_size=256"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png, js = job / "analysis" / "attention_last.png", job / "analysis" / "attention_last.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    data = json.loads(js.read_text())
    assert data["analysis"] == "attention" and data["step"] == STEPS[-1] and len(data["pattern"]) == 1
    assert os.listdir(tmp_path) == []  # no stray outputs/ or .hydra/ in the working directory
    # It says what it found: the largest values of the analysis' summary, read back from its own JSON.
    values = attention.summarize(data)
    top = sorted(values, key=lambda k: -abs(values[k]))[: min(8, len(values))]
    out = proc.stdout.splitlines()
    assert (
        out[0] == f"attention: the {len(top)} largest of {len(values)} summary values (all of them in the files below)"
    )
    assert [line.split() for line in out[1 : 1 + len(top)]] == [[k, f"{values[k]:+.4g}"] for k in top]
    assert set(out[1 + len(top) :]) == {str(png), str(js)}


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


def test_over_training_draws_a_series_in_one_colour_in_every_panel():
    # place_2 moves most under L0H0, place_1 under L0H1: drawn in another order, yet one colour each.
    series = {"L0H0/place_1": [0.0, 0.1], "L0H0/place_2": [0.0, 0.9], "L0H1/place_1": [0.0, 0.8]}
    series["L0H1/place_2"] = [0.0, 0.2]
    fig = over_training.plot({"of": "attention", "steps": [0, 100], "series": series})
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes[:2]]
    assert colours[0] == colours[1] and colours[0]["place_1"] != colours[0]["place_2"]
    assert [ax.get_ylabel() for ax in fig.axes[:2]] == ["attention on the own operands"] * 2
    plt.close(fig)
