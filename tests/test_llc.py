"""The local learning coefficient: SGLD against losses whose coefficient is known (quadratic: 1/2 per
direction, quartic: 1/4, flat: 0), with the sampler's own discretisation and localisation in the
closed form; then `analyze analysis=llc` on a real run."""

import json
import math

import pytest
import torch
from conftest import FAST, run_cli

from addrepro.metrics.llc import SGLDSettings, estimate_llc
from addrepro.metrics.place import place_stats
from addrepro.model.transformer import model_from_checkpoint
from addrepro.reports.learning_coefficient import batches, part_masks
from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.task.spec import TaskSpec

pytestmark = pytest.mark.usefixtures("one_thread")

CURVATURES = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0, 1.0])


def quadratic_and_flat():
    q, flat = torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(3))
    return q, flat, lambda batch: 0.5 * (CURVATURES * q**2).sum() + 0 * flat.sum()


def test_a_quadratic_loss_has_half_a_direction_each_as_the_sampler_sees_it():
    """SGLD on ½ h w² is the AR(1) chain w ← (1 − ε a / 2) w + √ε ξ with a = nβ h + γ: its stationary
    variance is ε / (1 − (1 − ε a / 2)²), so E[nβ ½ h w²] is known exactly; as ε, γ → 0 it is 1/2."""
    q, flat, loss = quadratic_and_flat()
    s = SGLDSettings(n=100, eps=2e-3, gamma=1.0, chains=16, draws=500, burn_in=100, seed=3)
    a = s.n_beta * CURVATURES + s.gamma
    variance = s.eps / (1 - (1 - s.eps * a / 2) ** 2)
    exact = float((s.n_beta * 0.5 * CURVATURES * variance).sum())
    assert abs(exact - 3.0) < 0.15  # six directions, a little off 1/2 each by ε and γ
    out = estimate_llc([q, flat], loss, lambda: None, s)
    assert abs(out["llc"] - exact) < 4 * out["llc_se"] and out["llc_se"] < 0.1 * exact
    assert out["diagnostics"] == []
    assert torch.equal(q.detach(), torch.zeros(6)) and torch.equal(flat.detach(), torch.zeros(3))  # restored

    # Restricted to the flat weights the loss never changes: exactly 0.
    s = SGLDSettings(n=100, eps=2e-3, gamma=1.0, chains=8, draws=400, burn_in=100, seed=4)
    still = estimate_llc([q, flat], loss, lambda: None, s, masks=[torch.zeros(6), None])
    assert still["llc"] == 0.0 and all(c == 0.0 for c in still["chains"])
    # Restricted to the first two directions: their share of the closed form.
    mask = torch.tensor([1.0, 1.0, 0, 0, 0, 0])
    part = estimate_llc([q, flat], loss, lambda: None, s, masks=[mask, torch.zeros(3)])
    share = float((s.n_beta * 0.5 * CURVATURES * variance)[:2].sum())
    assert abs(part["llc"] - share) < 4 * part["llc_se"]


def test_a_quartic_loss_counts_a_quarter_per_direction():
    """L = Σ w⁴ is singular at 0 (λ = 1/4 per direction): the tempered, localised posterior's
    E[nβ Σ w⁴], by quadrature, against the chains (a small ε: its discretisation bias is below 3%)."""
    w = torch.nn.Parameter(torch.zeros(3))
    s = SGLDSettings(n=100, eps=2e-3, gamma=0.1, chains=8, draws=600, burn_in=200, seed=5)
    grid = torch.linspace(-4, 4, 400_001, dtype=torch.float64)
    density = torch.exp(-s.n_beta * grid**4 - s.gamma * grid**2 / 2)
    exact = 3 * float((s.n_beta * grid**4 * density).sum() / density.sum())
    assert abs(exact - 0.75) < 0.05
    out = estimate_llc([w], lambda batch: (w**4).sum(), lambda: None, s)
    assert abs(out["llc"] - exact) < 4 * out["llc_se"] + 0.03 * exact


def test_each_draw_is_a_difference_on_one_batch_so_batch_noise_cancels():
    """A batch that shifts the loss by a large random amount (a noisy estimate of L) changes nothing:
    every draw is L_B(w) − L_B(w*) on the same batch."""
    q, flat, loss = quadratic_and_flat()
    s = SGLDSettings(n=100, eps=2e-3, gamma=1.0, chains=2, draws=100, burn_in=20, seed=1)
    offsets = torch.Generator().manual_seed(0)
    quiet = estimate_llc([q, flat], loss, lambda: None, s)
    noisy = estimate_llc([q, flat], lambda b: loss(b) + b, lambda: torch.rand((), generator=offsets) * 5, s)
    for a, b in zip(quiet["chains"], noisy["chains"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-3)


def test_a_chain_that_fails_is_named_and_left_out():
    q, flat, loss = quadratic_and_flat()
    calls = []

    def failing(batch):
        calls.append(1)
        # A chain makes 20 + 80 calls at w and 80 at w*: call 200 is in the second chain's burn-in.
        return loss(batch) * (math.nan if len(calls) == 200 else 1.0)

    s = SGLDSettings(n=100, eps=2e-3, gamma=1.0, chains=3, draws=80, burn_in=20, seed=2)
    out = estimate_llc([q, flat], failing, lambda: None, s)
    assert math.isnan(out["chains"][1]) and all(math.isfinite(out["chains"][k]) for k in (0, 2))
    assert out["llc"] == pytest.approx((out["chains"][0] + out["chains"][2]) / 2)
    assert any("non-finite" in d for d in out["diagnostics"])


def test_a_step_too_large_is_reported_not_hidden():
    q, flat, loss = quadratic_and_flat()
    s = SGLDSettings(n=100, eps=0.5, gamma=1.0, chains=2, draws=50, burn_in=0)  # ε a / 2 > 2: the chain explodes
    out = estimate_llc([q, flat], loss, lambda: None, s)
    assert math.isnan(out["llc"]) and any("non-finite" in d for d in out["diagnostics"])
    # Without burn-in and with a step far too small to mix in 200 steps, the chains still climb from w*.
    s = SGLDSettings(n=100, eps=1e-5, gamma=1.0, chains=8, draws=200, burn_in=0)
    out = estimate_llc([q, flat], loss, lambda: None, s)
    assert any("still rises" in d for d in out["diagnostics"])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("llc")
    run = ["data.n_digits=3", "model.width=32", "trainer.max_steps=50", "trainer.ckpt_every_n_steps=25",
           "trainer.plots=false", "logger.wandb.enabled=false", *FAST, "hydra.run.dir=job"]  # fmt: skip
    proc = run_cli("addrepro.train", run, root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "job"


def test_analyze_llc_on_a_run_per_part_and_refuses_bad_options_in_one_line(job, tmp_path):
    out = tmp_path / "out"
    args = [f"checkpoint={job}", "analysis=llc", "llc.steps=[25,50]", "llc.parts=[all,heads,mlp]", "llc.chains=2",
            "llc.draws=10", "llc.burn_in=5", f"out_dir={out}"]  # fmt: skip
    proc = run_cli("addrepro.analyze", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "llc.json").read_text())
    assert [p["step"] for p in result["points"]] == [25, 50]
    for point in result["points"]:
        assert list(point["parts"]) == ["all", "L0H0", "L0H1", "L0H2", "L0H3", "L0.mlp"]
        for estimate in point["parts"].values():
            assert len(estimate["chains"]) == 2 and all(len(t) == 10 for t in estimate["traces"])
            assert math.isfinite(estimate["llc"])
    assert "| 50 |" in (out / "llc.md").read_text() and (out / "llc.png").stat().st_size > 10_000
    for extra, said in (
        (["llc.parts=[heads,ffn]"], "llc.parts=['heads', 'ffn'] is invalid: must be a list of all, heads, mlp"),
        (["llc.eps=0"], "llc.eps=0 is invalid: must be a number > 0"),
        (["llc.steps=[7]"], "llc.steps=[7] have no checkpoint"),
    ):
        proc = run_cli(
            "addrepro.analyze", [f"checkpoint={job}", "analysis=llc", f"out_dir={out}/bad", *extra], tmp_path
        )
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "bad").exists()


def test_a_head_moves_alone_on_a_real_model(job):
    """Restricted to one head, every other weight stays at the checkpoint's value at every step, and the
    head's own slice (dim 1 of W_Q, W_K, W_V, W_O) moves."""
    ckpt = load_checkpoint(job)
    model, spec = model_from_checkpoint(ckpt)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    masks = part_masks(model, ["heads"])["L0H1"]
    for name, m in zip(names, masks, strict=True):
        if ".attn.W_" in name:
            assert m[:, 1].eq(1).all() and m.sum() == m[:, 1].numel()
        else:
            assert m.eq(0).all()
    centre = [p.detach().clone() for p in params]
    moved = []
    next_batch = batches(ckpt, spec, None, 0, int(ckpt["step"]))

    def loss_of(tokens):
        for p, w, m in zip(params, centre, masks, strict=True):
            held = m == 0
            assert torch.equal(p.detach()[held], w[held])
        moved.append(max(float((p.detach() - w).abs().max()) for p, w in zip(params, centre, strict=True)))
        return place_stats(model, tokens.unsqueeze(0), spec).loss[0]

    out = estimate_llc(params, loss_of, next_batch, SGLDSettings(chains=2, draws=5, burn_in=2), masks)
    assert math.isfinite(out["llc"]) and max(moved) > 0


def test_a_finite_run_trained_on_its_whole_set_is_sampled_whole():
    spec = TaskSpec(n_digits=2, base=10)
    data = {"train_size": 50, "batch_size": None, "val_size": 20, "val_seed": 1, "seed": 0}
    draw = batches({"config": {"data": data}}, spec, None, 0, step=0)
    assert draw().shape == (50, spec.seq_len)
    assert batches({"config": {"data": data}}, spec, 8, 0, step=0)().shape == (8, spec.seq_len)
