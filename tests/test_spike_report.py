"""The spike report, from hand-built weights: a spike that removes the answer digit 7's logit."""

import math

import adder
import torch

from addrepro.metrics.place import stats_from_logits
from addrepro.model.transformer import model_from_checkpoint
from addrepro.reports.spike_report import examine_spike, example_gradients, write_spike_report
from addrepro.rundir.checkpoints import save_checkpoint
from addrepro.task.encoding import decode, split_tokens
from addrepro.task.streams import configured_validation_tokens

SEVEN = 7


BETA2 = 0.99
SCALES = {"before": 1e-3, "at": 4e-3}  # Adam's sqrt(v̂) of every weight, as stored (after has none)


def save_around_spike(job, first_step=110):
    """before/after: the exact adder; at: the same with digit 7's logit weight zeroed (a change of 20).
    before and at carry second moments: v = scale² (1 − β2^(step + 1)), so sqrt(v̂) is the scale."""
    for point, step, broken in (("before", 100, False), ("at", first_step, True), ("after", 120, False)):
        ckpt = adder.checkpoint()
        if broken:
            ckpt["model"]["unembed.W_U"][adder.OUT + SEVEN, SEVEN] = 0.0
        ckpt["step"] = step
        ckpt["config"]["optimizer"] = {"betas": [0.9, BETA2]}
        if point in SCALES:
            v = SCALES[point] ** 2 * (1 - BETA2 ** (step + 1))
            ckpt["second_moments"] = {n: torch.full_like(w, v) for n, w in ckpt["model"].items()}
        save_checkpoint(job / "checkpoints" / f"spike_{first_step}_{point}.ckpt", ckpt)


def test_the_spike_report_finds_what_was_broken(tmp_path):
    save_around_spike(tmp_path)
    spike = {"step": 120, "first_step": 110, "loss": 1.0, "baseline": 0.1, "ratio": 10.0}
    ex = examine_spike(tmp_path, spike)

    # Brute force over the run's held-out set: at the spike, an answer digit 7 has all ten logits 0.
    val = configured_validation_tokens(adder.checkpoint()["config"], adder.SPEC)
    answers = [f"{c:04d}"[::-1] for _, _, c in decode(val, adder.SPEC)]  # place j is character j
    sevens = [[int(ans[j] == "7") for j in range(adder.SPEC.n_places)] for ans in answers]
    for j in range(adder.SPEC.n_places):
        share = sum(s[j] for s in sevens) / len(sevens)
        assert math.isclose(ex["points"]["at"]["place_loss"][j], share * math.log(10), rel_tol=1e-5, abs_tol=1e-6)
        assert ex["points"]["before"]["place_loss"][j] < 1e-6 and ex["points"]["after"]["place_loss"][j] < 1e-6
    # Logit norm: 20 at every answer position, 0 where the answer digit is 7.
    all_sevens = sum(map(sum, sevens)) / (len(sevens) * adder.SPEC.n_places)
    assert math.isclose(ex["points"]["before"]["logit_norm"], adder.LOGIT, rel_tol=1e-6)
    assert math.isclose(ex["points"]["at"]["logit_norm"], adder.LOGIT * (1 - all_sevens), rel_tol=1e-5)
    # Each update changed one weight by 20.
    assert ex["update_before_at"] == ex["update_at_after"] == adder.LOGIT
    # The worst examples are those with the most 7s in their answer; each costs log 10 per 7.
    most = max(map(sum, sevens))
    assert most >= 2
    top = ex["worst"][0]
    a, b, c = (int(x) for x in top["example"].replace("+", "=").split("="))
    assert a + b == c and str(c).count("7") == most
    assert math.isclose(top["loss_at"], most * math.log(10), rel_tol=1e-5)
    assert str(c).zfill(4)[::-1][top["place"]] == "7"
    # Before and after are the same weights: nothing changed inside the model.
    assert ex["mechanism"] and all(m["before"] == m["after"] for m in ex["mechanism"])
    # One weight moved, by 20: its update-to-weight ratio is 20 / its norm, every other one's 0.
    w_u = adder.checkpoint()["model"]["unembed.W_U"].double().norm()
    ratios = ex["relative_before_at"]
    assert next(iter(ratios)) == "unembed.W_U" and math.isclose(ratios["unembed.W_U"], 20 / float(w_u), rel_tol=1e-9)
    assert all(r == 0 for n, r in ratios.items() if n != "unembed.W_U")
    # Per group: only the unembedding moved; Adam's scale is what was stored, and absent where it was not.
    groups = ex["groups_before_at"]
    assert math.isclose(groups["unembed"], 20 / float(w_u), rel_tol=1e-9) and groups["attn"] == 0
    for point, scale in SCALES.items():
        adam = ex["points"][point]["adam"]
        assert set(adam) == set(groups) and all(math.isclose(v, scale, rel_tol=1e-6) for v in adam.values())
    assert ex["points"]["after"]["adam"] is None
    # The exact adder (logit 20 against 0) barely pulls on its weights; at the spike a 7 costs log 10 and pulls hard.
    assert top["grad_norm_at"] > 1e3 * top["grad_norm_before"] and top["grad_norm_before"] == top["grad_norm_after"]


def test_example_gradients_add_up_to_the_batch_gradient():
    # Each row is one example's gradient alone: their sum is the gradient of the summed loss of the batch.
    model, spec = model_from_checkpoint(adder.checkpoint())
    with torch.no_grad():
        for p in model.parameters():  # away from the exact adder's saturated softmax
            p.mul_(0.05)
    val = configured_validation_tokens(adder.checkpoint()["config"], adder.SPEC)[:6]
    inputs, targets = split_tokens(val, spec)
    rows = example_gradients(model, inputs, targets, spec)  # (6, n_params)
    logits = model(inputs, last=spec.n_places)
    loss = stats_from_logits(logits, targets.unsqueeze(0), spec).token_loss.sum()
    batch = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert rows.shape == (6, batch.numel())
    torch.testing.assert_close(rows.sum(0), batch, rtol=1e-4, atol=1e-5 * float(batch.abs().max()))
    assert len({round(float(n), 6) for n in rows.norm(dim=-1)}) > 1  # the examples differ


def test_spikes_md_lists_every_spike_and_says_when_no_weights_were_saved(tmp_path):
    save_around_spike(tmp_path)
    spikes = [
        {"step": 120, "first_step": 110, "loss": 1.0, "baseline": 0.1, "ratio": 10.0},
        {"step": 300, "first_step": 300, "loss": 0.5, "baseline": 0.1, "ratio": 5.0},
    ]
    text = write_spike_report(tmp_path, spikes).read_text()
    assert "## Step 120" in text and "## Step 300" in text
    assert text.split("## Step 300")[1].split("\n\n")[1] == "No weights were saved around this spike."
    assert "before → at: 20" in text and "| at | 110 |" in text
    assert "| attn | 0.001 | 0.004 | — | 0 | 0 |" in text
    assert write_spike_report(tmp_path, []).read_text().endswith("No spike was detected.\n")
