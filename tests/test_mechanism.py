"""Mechanism metrics and the timeline: known answers from a hand-built adder, planted probe
directions and a synthetic run whose events are known."""

import math

import adder
import numpy as np
import pytest
import torch

from addrepro.metrics.mechanism import (
    attention_masses,
    carry_probe_accuracies,
    mechanism_metric_dict,
    ridge_probe_accuracy,
    streams_and_patterns,
)
from addrepro.reports.timeline import merge_rests, plot_timeline, shelf_exits, timeline_markdown, write_timeline
from addrepro.shelves.detection import Shelf
from addrepro.task.encoding import encode, sample_operands
from addrepro.task.sets import CarrySets


def test_attention_masses_of_the_adder_are_known_exactly():
    model, spec = adder.model(), adder.SPEC
    tokens = encode(*sample_operands(spec, 64, torch.Generator().manual_seed(0)), spec)
    _, patterns = streams_and_patterns(model, tokens)
    masses = attention_masses(patterns, spec)
    for key, value in masses.items():
        head, kind = key.split("/")[2], key.split("/")[4]
        h = int(head.split("H")[1])
        # Head h reads pair j - h from the position predicting place j (adder.py): own is head 0's,
        # lower is head 1's; every other head reads another pair (or + and =) and gives 0.
        expected = 1.0 if (kind == "own" and h == 0) or (kind == "lower" and h == 1) else 0.0
        assert value.shape == (1,)
        assert value.item() == pytest.approx(expected, abs=1e-6), key
    # own: places 0..n-1 (the carry-out has no operands); lower: places 1..n; for 4 heads.
    assert len(masses) == adder.N_HEADS * 2 * spec.n_digits


def test_ridge_probe_finds_a_planted_direction_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 32
    y = (torch.arange(n) % 2).float()[torch.randperm(n, generator=g)]
    direction = torch.randn(d, generator=g)
    noise = torch.randn(2, n, d, generator=g)
    planted = noise[0] + 3.0 * (2 * y[:, None] - 1) * direction / direction.norm()  # margin 3 along one direction
    train = torch.arange(n) % 2 == 0
    acc = ridge_probe_accuracy(torch.stack([planted, noise[1]]), y, train)  # member 0 planted, member 1 noise
    assert acc[0].item() >= 0.99
    assert 0.3 < acc[1].item() < 0.7  # labels independent of the features: chance


def test_carry_probe_reads_the_carry_when_the_stream_holds_it():
    # The adder writes the pair sums below place j into the stream at its query position, so the
    # carry into place 1 ([a0 + b0 >= 10]) is a threshold on one coordinate: linearly readable (a
    # least-squares probe is not a max-margin one, hence not always 100%). Without its heads' outputs
    # the stream holds no operand of place 0 there, and the probe is at chance.
    model, spec = adder.model(), adder.SPEC
    sets = CarrySets.build(spec, carry_size=64, chain_size=8)
    probes = carry_probe_accuracies(model, sets, spec)
    assert set(probes) == {f"mech/probe/carry_in/place_{j}/acc" for j in range(1, spec.n_places)}
    assert probes["mech/probe/carry_in/place_1/acc"].item() >= 0.9
    blind = adder.model()
    with torch.no_grad():
        blind.blocks[0].attn.W_O.zero_()
    assert carry_probe_accuracies(blind, sets, spec)["mech/probe/carry_in/place_1/acc"].item() < 0.7
    assert all(0.0 <= v.item() <= 1.0 for v in probes.values())
    both = mechanism_metric_dict(model, sets.tokens[None], sets, spec)
    assert set(probes) < set(both)


# -- the timeline on a synthetic run ---------------------------------------------------------
def synthetic_rows() -> list[dict]:
    """Place 1 rests at log 10 until step 500, falls by 600 and rests exact from 700; meanwhile L0H2 starts
    reading a1, b1 (0.05 -> 0.61), L0H3 reads a0, b0 (0.02 -> 0.40) and the carry probe learns (0.5 -> 0.97)."""
    rows = []
    for step in range(0, 1001, 100):
        late = step >= 600
        rows.append(
            {
                "step": step,
                "train/loss/place_1": math.log(10) if step <= 500 else 1e-3,
                "mech/attn/L0H2/place_1/own": 0.61 if late else 0.05,
                "mech/attn/L0H1/place_1/own": 0.1,
                "mech/attn/L0H3/place_1/lower": 0.40 if late else 0.02,
                "mech/attn/L0H1/place_1/lower": 0.2,
                "mech/probe/carry_in/place_1/acc": 0.97 if late else 0.5,
            }
        )
    return rows


SHELVES = {
    1: [
        Shelf(0, 500, math.log(10), "uniform", math.log(10), "atlas"),
        Shelf(700, 1000, 1e-3, "exact", 0.0, "atlas"),
    ]
}
SPIKES = [{"step": 880, "loss": 0.073, "ratio": 52.1, "baseline": 0.0014}]


def test_the_narrative_states_each_exit_with_the_logged_numbers():
    spec = adder.SPEC
    exits = shelf_exits(synthetic_rows(), spec, SHELVES)
    # left where the loss was clearly below log 10 (600), before the next shelf began (700)
    assert len(exits) == 1 and exits[0].until == 600 and exits[0].next_level == "exact"
    text = timeline_markdown(synthetic_rows(), spec, SHELVES, SPIKES)
    assert (
        "- Rested at uniform, loss 2.303 (atlas 2.303), steps 0–500 (flat: ×1 over the rest (1–1)); left it between "
        "steps 500 and 600 for exact." in text
    )
    assert "  - L0H2 on a1, b1: 0.05 → 0.61 (+0.56)" in text
    assert "  - L0H3 on a0, b0: 0.02 → 0.4 (+0.38)" in text
    assert "  - carry-in probe at place 1: 0.5 → 0.97 (+0.47)" in text
    # a constant loss is flat exactly; four logs are too few to say
    assert "- Rested at exact, loss 0.001 (atlas 0), steps 700–1000 (unclear (4 logs)); still there at the end" in text
    assert "- step 880: train loss 0.073, 52.1x its trend 0.0014" in text
    assert "## Checkpoints at shelf exits" not in text  # none were saved
    # Saved exits name the whole-curve exit of the same shelf beside their own, later, steps.
    saved = [
        {"place": 1, "level": "uniform", "start_step": 0, "last_on_shelf": 500, "step": 700},
        {"place": 0, "level": "uniform", "start_step": 0, "last_on_shelf": 100, "step": 200},
    ]
    text = timeline_markdown(synthetic_rows(), spec, SHELVES, SPIKES, saved)
    assert (
        "- place 1 (10s) left uniform (rested from step 0): `checkpoints/shelf_exit_700_place1_before.ckpt` "
        "(step 500), `checkpoints/shelf_exit_700_place1_after.ckpt` (step 700); whole curve: left between steps 500"
        " and 600" in text
    )
    assert "place 0 (units) left uniform" in text and text.count("the whole-curve detection found no shelf there") == 1
    # Without a next shelf, the place left once its smoothed loss was below half the level: step 600
    (alone,) = shelf_exits(synthetic_rows(), spec, {1: SHELVES[1][:1]})
    assert alone.until == 600 and alone.next_level is None
    exit_ = {"place": 1, "level": "uniform", "level_loss": 2.3, "start_step": 0, "last_on_shelf": 500, "step": 560}
    text = timeline_markdown(synthetic_rows(), spec, SHELVES, SPIKES, [exit_])
    assert (
        "- place 1 (10s) left uniform (rested from step 0): `checkpoints/shelf_exit_560_place1_before.ckpt` "
        "(step 500), `checkpoints/shelf_exit_560_place1_after.ckpt` (step 560)"
    ) in text
    assert text.index("## place 3 (carry-out)") < text.index("## place 1 (10s)")  # carry-out first


def test_timeline_files_are_written(tmp_path):
    paths = write_timeline(tmp_path, synthetic_rows(), adder.SPEC, SHELVES, SPIKES)
    assert [p.name for p in paths] == ["timeline.png", "timeline.md"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_timeline([], adder.SPEC, {}, [], tmp_path / "empty.png").exists()  # a run without metrics yet
    assert np.isfinite(paths[0].stat().st_size)


def test_consecutive_rests_at_one_level_are_one_shelf():
    pieces = [
        Shelf(0, 100, 2.3, "uniform", 2.3026),
        Shelf(200, 299, 0.07, "carry_depth_1", 0.0693),
        Shelf(320, 619, 0.08, "carry_depth_1", 0.0693),
        Shelf(700, 800, 0.01, None, None),
        Shelf(900, 950, 0.01, None, None),  # unnamed shelves stay apart: nothing says they are one level
    ]
    merged = merge_rests(pieces)
    assert [(s.start_step, s.end_step, s.atlas_level) for s in merged] == [
        (0, 100, "uniform"),
        (200, 619, "carry_depth_1"),
        (700, 800, None),
        (900, 950, None),
    ]
    assert merged[1].level == pytest.approx((0.07 * 100 + 0.08 * 300) / 400)
    # ... unless the curve shows the loss truly left the level in between (here: a dip to 0.01)
    steps = np.arange(0, 1000, 10)
    loss = np.where(steps < 200, 2.3, np.where((steps > 299) & (steps < 320), 0.01, 0.075))
    assert len(merge_rests(pieces, steps, loss)) == 4  # the dip is 1 point: the median ignores it
    loss = np.where(steps < 200, 2.3, np.where((steps > 250) & (steps < 330), 0.01, 0.075))
    split = merge_rests(pieces[:3], steps, loss)
    assert [(s.start_step, s.end_step) for s in split] == [(0, 100), (200, 299), (320, 619)]
