"""Neuron maps, periodicity, clustering, group ablation and attribution patching: synthetic maps with
a planted structure, the hand-built adder's threshold neurons, and a finite-difference check."""

import math

import adder
import pytest
import torch

pytest.importorskip("transformer_lens")

from test_analyze import random_subject  # noqa: E402

from addrepro.interp import ablation, neurons  # noqa: E402
from addrepro.interp.common import answer_positions, answer_targets, load_subject, write_outputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decomposition_of_planted_maps():
    base = 10
    a, b = torch.arange(base).double()[:, None], torch.arange(base).double()[None, :]
    w = 2 * math.pi / base
    cases = {
        "a alone": (torch.cos(w * a + 0.3).expand(base, base), [1, 0, 0, 0]),
        "b alone": ((b**2).expand(base, base), [0, 1, 0, 0]),
        "a wave in (a + b) mod base": (torch.cos(2 * w * (a + b)), [0, 0, 1, 0]),
        "a + b, linear (additive)": (a + b, [0.5, 0.5, 0, 0]),
        "a - b wave": (torch.cos(w * (a - b)), None),
        "a threshold on a + b": ((a + b >= 10).double(), None),
    }
    for name, (grid, expected) in cases.items():
        shares = neurons.decompose(grid)
        assert float(shares.sum()) == pytest.approx(1.0, abs=1e-9), name
        if expected is not None:
            assert shares.tolist() == pytest.approx(expected, abs=1e-9), name
    # cos(w (a - b)) has no main effect and is no wave in a + b, but the short anti-diagonals near the
    # grid's corners (s = 0 is one cell) do not average it out: "other" holds most of it, not all.
    shares = neurons.decompose(cases["a - b wave"][0])
    assert float(shares[0]) == pytest.approx(0, abs=1e-9) and float(shares[1]) == pytest.approx(0, abs=1e-9)
    assert 0.6 < float(shares[3]) < 0.9
    # The carry threshold: its main effects are two equal ramps, the rest a function of a + b alone.
    shares = neurons.decompose(cases["a threshold on a + b"][0])
    assert float(shares[0]) == pytest.approx(float(shares[1]), abs=1e-12) and float(shares[3]) < 1e-12
    # Parts add in variance: 2 cos(w a) + cos(2w (a + b)): a holds 4/5 of it, the sum wave 1/5.
    mixed = 2 * torch.cos(w * a).expand(base, base) + torch.cos(2 * w * (a + b))
    assert neurons.decompose(mixed).tolist() == pytest.approx([0.8, 0, 0.2, 0], abs=1e-9)
    assert neurons.decompose(torch.full((base, base), 3.0)).tolist() == [0, 0, 0, 0]  # a dead neuron
    # A stack of maps keeps its leading shape.
    stacked = torch.stack([cases["a alone"][0], cases["b alone"][0]])
    assert neurons.decompose(stacked).shape == (2, 4)


def test_strongest_wave_of_planted_maps():
    base = 10
    a, b = torch.arange(base).double()[:, None], torch.arange(base).double()[None, :]
    w = 2 * math.pi / base
    wave, share = neurons.strongest_wave(torch.cos(3 * w * (a + b) + 0.4))
    assert wave.tolist() == [3, 3] and float(share) == pytest.approx(1.0, abs=1e-9)
    wave, share = neurons.strongest_wave(torch.cos(2 * w * a - 0.1) + 0.5 * torch.cos(4 * w * b))  # power 1 : 0.25
    assert wave.tolist() == [2, 0] and float(share) == pytest.approx(0.8, abs=1e-9)
    wave, _ = neurons.strongest_wave(torch.cos(w * (a - b)))  # a wave in a - b: (1, -1) = (1, 9)
    assert wave.tolist() == [1, 9]
    wave, share = neurons.strongest_wave(torch.cos(5 * w * a).expand(base, base))  # Nyquist: its own conjugate
    assert wave.tolist() == [5, 0] and float(share) == pytest.approx(1.0, abs=1e-9)


def test_clusters_recover_planted_groups():
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(3, 50, generator=g)
    truth = torch.tensor([0, 1, 2] * 6)
    maps = prototypes[truth] * (1 + torch.rand(18, 1, generator=g)) + 0.05 * torch.randn(18, 50, generator=g)
    maps = torch.cat([maps, torch.full((2, 50), 3.0)])  # two dead neurons (constant maps)
    labels = neurons.cluster_maps(maps, k=3)
    assert labels[18:].tolist() == [-1, -1]
    # same partition as the truth, up to renaming
    pairs = set(zip(truth.tolist(), labels[:18].tolist(), strict=True))
    assert len(pairs) == 3 and len({b for _, b in pairs}) == 3


def test_adder_threshold_neurons_and_group_ablation(tmp_path):
    subject = load_subject(adder.checkpoint(val_size=256), carry_size=8, chain_size=8)
    result = neurons.run(subject, per_cell=2, clusters=6, max_examples=256, n_check=4)
    maps = torch.as_tensor(result["maps"])  # (1, 64, places, 10, 10)
    # Units place (no carry can come in): neurons 2k and 2k+1 differ by exactly [a0 + b0 >= k + 1].
    s = torch.arange(10)[:, None] + torch.arange(10)[None, :]
    for k in range(adder.N_THRESHOLDS):
        diff = maps[0, 2 * k, 0] - maps[0, 2 * k + 1, 0]
        assert torch.equal(diff, (s >= k + 1).float()), k
    # ... and each of them reads a0 + b0 alone: no variance outside the operand and sum parts.
    shares = torch.as_tensor(result["shares"])[0, : 2 * adder.N_THRESHOLDS, 0]  # (2 N_THRESHOLDS, 4)
    live = shares.sum(-1) > 0
    assert live.any() and float(shares[live, 3].max()) < 1e-6
    assert torch.allclose(shares[live, 0], shares[live, 1], atol=1e-6)  # a0 and b0 alike
    # At the units position every activation is a function of a0 + b0 alone (no pair lies below): removing
    # the 'other' part of the maps changes nothing there, keeping only the map's mean plus its a0 + b0 part
    # changes nothing either, and removing that part breaks the units digit.
    cut = result["part_ablation"]
    assert abs(cut["L0/excluded/other"][0]) < 1e-5 and abs(cut["L0/restricted/a_j+b_j"][0]) < 1e-5
    assert cut["L0/excluded/a_j+b_j"][0] > 1.0
    # Neurons 38..63 are never written by the adder: dead, grouped as -1, and ablating them does nothing.
    dead = next(g for g in result["clusters"] if g["cluster"] == -1)
    assert set(range(2 * adder.N_THRESHOLDS, adder.D_MLP)) <= set(dead["neurons"])
    assert max(abs(v) for v in dead["zero"] + dead["mean"]) < 1e-6
    # every live cluster's group ablation against the ablation module's per-neuron hook, for one member
    batch = ablation.EvalBatch(subject.val_tokens, len(subject.val_tokens), {})
    fill = ablation.position_means(subject.bridge, subject.val_tokens, {"blocks.0.mlp.hook_post"})
    one = neurons.val_losses(
        subject,
        subject.val_tokens,
        [("blocks.0.mlp.hook_post", neurons._group_hook([5], fill["blocks.0.mlp.hook_post"]))],
    )
    want = ablation._hooked_neuron_losses(subject, batch, 0, fill["blocks.0.mlp.hook_post"], chunk=64)[5].mean(0)
    assert torch.allclose(one, want, atol=1e-5)
    paths = write_outputs(result, neurons.plot(result), tmp_path / "neurons")
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


def test_attribution_is_the_first_order_change():
    # The estimate for neuron n is d/d eps of the mean loss with act_n -> act_n + eps (mean_n - act_n),
    # at eps = 0: compare with a central finite difference through hooks, in both layers. Both run in
    # float64, the difference with its own loss written here: in float32 the rounding of the two losses
    # (~1e-7 of ~2.3) is a few percent of their difference, and differs between CPU kinds.
    subject, _ = random_subject(2, "LN", seed=5)
    subject.bridge.to(torch.float64)
    tokens = subject.val_tokens[:128]
    names = {f"blocks.{layer}.mlp.hook_post" for layer in range(2)}
    means = ablation.position_means(subject.bridge, subject.val_tokens, names)
    estimate = neurons.attribution(subject, tokens, means)  # (2, d_mlp)
    assert estimate.dtype == torch.float64
    targets = answer_targets(tokens, subject.spec)
    # Small: a larger nudge moves later ReLUs across their kink (at 1e-2 the difference is 0.3% off).
    eps = 1e-5
    for layer, n in [(0, 3), (1, 7), (1, int(estimate[1].abs().argmax()))]:
        name = f"blocks.{layer}.mlp.hook_post"

        def loss(sign, name=name, n=n):
            def hook(act, hook):
                act = act.clone()
                act[..., n] += sign * eps * (means[name][: act.shape[1], n] - act[..., n])
                return act

            logits = subject.bridge.run_with_hooks(tokens[:, :-1], fwd_hooks=[(name, hook)])
            logits = logits[:, answer_positions(subject.spec)]  # (B, n+1, base), float64
            return -logits.log_softmax(-1).gather(-1, targets[..., None]).mean().detach()

        diff = (loss(1) - loss(-1)) / (2 * eps)
        # float64 rounding of the difference is ~1e-8 of it; the two agree to ~5e-7 here
        assert float(estimate[layer, n]) == pytest.approx(float(diff), rel=1e-5, abs=1e-12), (layer, n)
