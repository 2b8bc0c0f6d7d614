"""Tests for addrepro.shelves.detection on synthetic curves with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from addrepro.shelves.detection import Shelf, atlas_plateaus, detect_shelves
from addrepro.shelves.spikes import Spike, SpikeMonitor, detect_spikes, trend_baseline
from addrepro.shelves.trend import shelf_trend

LOG10 = math.log(10)
LOG2 = math.log(2)
ATLAS = {
    "uniform": LOG10,
    "near_uniform": 2.1,
    "naive_sum": LOG2,
    "carry_tenth": 0.1 * LOG2,
    "solved": 0.0,
}
TOL_STEPS = 60


def staircase_log_loss(steps: np.ndarray, levels: list[float], centres: list[float], width: float) -> np.ndarray:
    """log-loss resting at `levels`, with sigmoid drops centred at `centres`."""
    y = np.full(len(steps), math.log(levels[0]))
    for c, hi, lo in zip(centres, levels[:-1], levels[1:], strict=True):
        y += (math.log(lo) - math.log(hi)) * 0.5 * (1 + np.tanh((steps - c) / (2 * width)))
    return y


def noisy(y: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Multiplicative (log-normal) noise, as minibatch losses have."""
    rng = np.random.default_rng(seed)
    return np.exp(y + sigma * rng.standard_normal(len(y)))


def three_shelf_curve(seed: int = 0, sigma: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    # log 10 until ~440, log 2 on ~560-1140, 0.01 from ~1260 (a sigmoid of
    # width 20 is within 5% of its level 3 widths from its centre).
    steps = np.arange(2000)
    y = staircase_log_loss(steps, [LOG10, LOG2, 0.01], [500, 1200], width=20)
    return steps, noisy(y, sigma, seed)


THREE_SHELF_TRUTH = [(0, 440, LOG10, "uniform"), (560, 1140, LOG2, "naive_sum"), (1260, 1999, 0.01, None)]


def assert_shelves(shelves: list[Shelf], truth: list[tuple], tol: float = TOL_STEPS) -> None:
    assert len(shelves) == len(truth), shelves
    for shelf, (start, end, level, name) in zip(shelves, truth, strict=True):
        assert abs(shelf.start_step - start) <= tol, (shelf, start)
        assert abs(shelf.end_step - end) <= tol, (shelf, end)
        assert abs(math.log(shelf.level / level)) < 0.05, (shelf, level)
        assert shelf.atlas_level == name, shelf
        if name is None:
            assert shelf.atlas_loss is None
        else:
            assert shelf.atlas_loss == ATLAS[name]


# ----------------------------------------------------------------------------
# Shelves
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_three_shelves_found_with_levels_and_atlas(seed: int, sigma: float) -> None:
    steps, loss = three_shelf_curve(seed, sigma)
    assert_shelves(detect_shelves(steps, loss, ATLAS), THREE_SHELF_TRUTH)


def test_sharp_drops_give_exact_boundaries() -> None:
    steps = np.arange(1500)
    y = staircase_log_loss(steps, [LOG10, LOG2, 0.1 * LOG2], [500, 1000], width=0.5)
    shelves = detect_shelves(steps, noisy(y, 0.05, 3), ATLAS)
    truth = [
        (0, 499, LOG10, "uniform"),
        (500, 999, LOG2, "naive_sum"),
        (1000, 1499, 0.1 * LOG2, "carry_tenth"),
    ]
    assert_shelves(shelves, truth, tol=5)


def test_small_step_between_close_levels_is_two_shelves() -> None:
    # log 10 -> 2.1 is only 0.09 in log-loss, yet the two are distinct shelves
    # and each is matched to the nearer atlas level. A step that small is
    # flatter than max_slope throughout, so the two shelves touch and the
    # boundary lands somewhere inside the transition around step 2000.
    steps = np.arange(10_000)
    y = staircase_log_loss(steps, [LOG10, 2.1, LOG2, 0.1 * LOG2], [2000, 3500, 6000], width=80)
    shelves = detect_shelves(steps, noisy(y, 0.1, 4), ATLAS)
    truth = [
        (0, 2000, LOG10, "uniform"),
        (2000, 3250, 2.1, "near_uniform"),
        (3750, 5750, LOG2, "naive_sum"),
        (6250, 9999, 0.1 * LOG2, "carry_tenth"),
    ]
    assert_shelves(shelves, truth, tol=250)
    assert shelves[1].start_step == shelves[0].end_step + 1


def test_level_outside_atlas_has_no_match() -> None:
    steps = np.arange(1500)
    y = staircase_log_loss(steps, [LOG10, 1.2, 0.01], [400, 1000], width=15)
    shelves = detect_shelves(steps, noisy(y, 0.05, 5), ATLAS)
    assert_shelves(shelves, [(0, 355, LOG10, "uniform"), (445, 955, 1.2, None), (1045, 1499, 0.01, None)])


def test_zero_atlas_level_matches_only_tiny_losses() -> None:
    steps = np.arange(1000)
    y = staircase_log_loss(steps, [LOG2, 1e-5], [500], width=10)
    shelves = detect_shelves(steps, noisy(y, 0.1, 6), ATLAS)
    assert [s.atlas_level for s in shelves] == ["naive_sum", "solved"]
    assert shelves[1].atlas_loss == 0.0
    # Without the zero level, nothing is close to 1e-5.
    no_zero = {k: v for k, v in ATLAS.items() if v > 0}
    assert [s.atlas_level for s in detect_shelves(steps, noisy(y, 0.1, 6), no_zero)] == ["naive_sum", None]


def test_no_atlas_gives_no_names() -> None:
    steps, loss = three_shelf_curve()
    shelves = detect_shelves(steps, loss)
    assert len(shelves) == 3
    assert all(s.atlas_level is None and s.atlas_loss is None for s in shelves)


@pytest.mark.parametrize("tau", [100.0, 300.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_smooth_exponential_decay_has_no_shelves(tau: float, seed: int) -> None:
    # Log-loss falls linearly: never flat, so no shelf anywhere.
    steps = np.arange(2000)
    loss = noisy(math.log(2.3) - steps / tau, 0.1, seed)
    assert detect_shelves(steps, loss, ATLAS) == []


def test_exponential_decay_to_floor_has_only_the_floor() -> None:
    steps = np.arange(2000)
    loss = (0.01 + 2.3 * np.exp(-steps / 150)) * noisy(np.zeros(2000), 0.05, 7)
    shelves = detect_shelves(steps, loss, ATLAS)
    assert len(shelves) == 1
    # 2.3 exp(-t/150) is 5% of the floor at t ~ 1270.
    assert abs(shelves[0].start_step - 1270) <= 150
    assert shelves[0].end_step == 1999
    assert abs(shelves[0].level - 0.01) < 0.001


def test_log_spaced_steps_report_steps_not_indices() -> None:
    steps = np.unique(np.geomspace(1, 20_000, 600).astype(int))
    y = staircase_log_loss(steps.astype(float), [LOG10, LOG2, 0.01], [500, 3000], width=60)
    shelves = detect_shelves(steps, noisy(y, 0.05, 8), ATLAS)
    assert [s.atlas_level for s in shelves] == ["uniform", "naive_sum", None]
    assert shelves[0].start_step == 1
    assert 250 <= shelves[0].end_step <= 400
    assert 600 <= shelves[1].start_step <= 850
    assert 2500 <= shelves[1].end_step <= 2850
    assert 3150 <= shelves[2].start_step <= 3500
    assert shelves[2].end_step == 20_000
    assert all(isinstance(s.start_step, int) and isinstance(s.end_step, int) for s in shelves)


@pytest.mark.parametrize("n", [0, 1, 5, 9])
def test_short_curves_return_empty(n: int) -> None:
    assert detect_shelves(np.arange(n), np.full(n, LOG2), ATLAS) == []


def test_short_but_flat_curve_is_one_shelf() -> None:
    shelves = detect_shelves(np.arange(12), noisy(np.full(12, math.log(LOG2)), 0.02, 9), ATLAS)
    assert [(s.start_step, s.end_step, s.atlas_level) for s in shelves] == [(0, 11, "naive_sum")]


def test_nan_and_inf_points_are_ignored() -> None:
    steps, loss = three_shelf_curve(seed=10)
    rng = np.random.default_rng(11)
    bad = rng.choice(len(loss), size=100, replace=False)
    loss = loss.copy()
    loss[bad[:50]] = np.nan
    loss[bad[50:]] = np.inf
    assert_shelves(detect_shelves(steps, loss, ATLAS), THREE_SHELF_TRUTH)
    # All-NaN curve: nothing to find, no error.
    assert detect_shelves(steps, np.full(len(steps), np.nan), ATLAS) == []


def test_exact_zero_losses_do_not_break_detection() -> None:
    steps = np.arange(600)
    loss = np.where(steps < 300, LOG2, 0.0)
    shelves = detect_shelves(steps, loss, ATLAS)
    assert [(s.start_step, s.end_step, s.atlas_level) for s in shelves] == [
        (0, 299, "naive_sum"),
        (300, 599, "solved"),
    ]


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        detect_shelves(np.arange(10), np.ones(11))


def test_shelf_as_dict() -> None:
    shelf = Shelf(start_step=1, end_step=5, level=0.7, atlas_level="naive_sum", atlas_loss=LOG2)
    assert shelf.as_dict() == {
        "start_step": 1,
        "end_step": 5,
        "level": 0.7,
        "atlas_level": "naive_sum",
        "atlas_loss": LOG2,
        "method": "change_point",
    }


def test_ten_thousand_points() -> None:
    # Speed on long curves is measured by benchmarks/bench_shelves.py, not here.
    steps = np.arange(10_000)
    y = staircase_log_loss(steps, [LOG10, LOG2, 0.1 * LOG2, 0.01], [2000, 5000, 8000], width=50)
    curves = [noisy(y, 0.1, 12), noisy(0.3 * np.zeros(10_000), 0.3, 13), np.exp(-steps / 2000)]
    for loss in curves:
        shelves = detect_shelves(steps, loss, ATLAS)
        assert all(0 <= s.start_step < s.end_step <= steps[-1] for s in shelves)
    assert any(s.atlas_level == "naive_sum" for s in detect_shelves(steps, curves[0], ATLAS))


# ----------------------------------------------------------------------------
# Spikes
# ----------------------------------------------------------------------------


def flat_curve_with_spikes() -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(0, 4000, 2)  # steps need not be consecutive integers
    loss = noisy(np.full(len(steps), math.log(0.3)), 0.1, 20)
    loss[400] = 3.0  # single-point spike at step 800
    loss[1200:1203] = [1.5, 4.0, 2.0]  # three-point spike peaking at step 2402
    return steps, loss


def test_two_injected_spikes_are_found_exactly() -> None:
    steps, loss = flat_curve_with_spikes()
    spikes = detect_spikes(steps, loss)
    assert [s.step for s in spikes] == [800, 2402]
    assert [s.loss for s in spikes] == [3.0, 4.0]
    for s in spikes:
        assert abs(s.baseline - 0.3) < 0.03
        assert s.ratio == pytest.approx(s.loss / s.baseline)


def test_spike_thresholds() -> None:
    steps = np.arange(200)
    loss = np.full(200, 0.01)
    loss[100] = 0.05  # 5x the baseline but only 0.04 above it: below min_excess
    loss[150] = 0.2  # 20x and 0.19 above
    assert [s.step for s in detect_spikes(steps, loss)] == [150]
    assert [s.step for s in detect_spikes(steps, loss, min_excess=0.01)] == [100, 150]
    assert detect_spikes(steps, loss, factor=25.0) == []


def test_a_large_jump_from_a_near_zero_loss_is_a_spike_below_the_absolute_floor() -> None:
    # 1.3e-4 -> 0.025 (190x, 0.025 nats) is below min_excess=0.05 but far above the trend; a loss that
    # only wiggles about its trend, or keeps returning to the same height (a batch with one wrong
    # example), is not a spike, however small its baseline.
    steps = np.arange(0, 2000, 10)
    loss = np.full(len(steps), 1.3e-4) * np.exp(np.random.default_rng(0).normal(0, 0.3, len(steps)))
    loss[100] = 0.025
    assert [s.step for s in detect_spikes(steps, loss)] == [1000]
    assert detect_spikes(steps, loss, ratio_alone=500.0) == []  # 190x is below that ratio
    recurring = loss.copy()
    recurring[::7] = 0.01  # the same jump every 7th log: the window always holds one as high
    recurring[100] = 0.01
    assert detect_spikes(steps, recurring) == []
    tiny = np.full(len(steps), 1e-7)
    tiny[100] = 5e-4  # 5000x, but only 5e-4 nats: below RATIO_ALONE_FLOOR
    assert detect_spikes(steps, tiny) == []
    monitor = SpikeMonitor()
    for step, value in zip(steps, loss, strict=True):
        monitor.update(int(step), float(value))
    assert monitor.spikes == detect_spikes(steps, loss)


def test_spikes_ignore_nan_and_short_series() -> None:
    steps, loss = flat_curve_with_spikes()
    loss = loss.copy()
    loss[[10, 500, 1100]] = [np.nan, np.inf, np.nan]
    assert [s.step for s in detect_spikes(steps, loss)] == [800, 2402]
    assert detect_spikes([0, 1, 2], [1.0, 100.0, 1.0]) == []


def test_spike_monitor_agrees_with_batch_detection() -> None:
    steps, loss = flat_curve_with_spikes()
    loss = loss.copy()
    loss[700] = np.nan
    monitor = SpikeMonitor()
    alerts = [a for s, v in zip(steps, loss, strict=True) if (a := monitor.update(int(s), float(v))) is not None]
    batch = detect_spikes(steps, loss)
    # Alerts fire at the first point of each spike; the kept list holds peaks.
    assert [a.step for a in alerts] == [800, 2400]
    assert monitor.spikes == batch
    assert len(monitor._history) == monitor.window  # bounded memory


def fast_fall_then_spike(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A loss that falls slowly, then fast (0.12 -> 0.0014 over steps 650..800), and jumps to 0.073 at 880.

    The shape of a real LSB-order run: the median of the last 50 logs (~0.2) is above the spike
    itself, so a detector comparing with a running median misses it.
    """
    steps = np.arange(0, 1500, 10)
    slow = 2.3 * np.exp(-steps / 230) + 0.1
    fast = 0.12 * np.exp(-(steps - 650) / 150 * math.log(0.12 / 0.0014))
    loss = np.where(steps < 650, slow, np.where(steps <= 800, fast, 0.0014))
    loss = loss * np.exp(np.random.default_rng(seed).normal(0, 0.15, len(steps)))
    k = int(np.flatnonzero(steps == 880)[0])
    loss[k : k + 3] = [0.073, 0.012, 0.004]
    return steps, loss


@pytest.mark.parametrize("seed", range(4))
def test_a_spike_from_a_low_falling_loss_is_found(seed) -> None:
    steps, loss = fast_fall_then_spike(seed)
    k = int(np.flatnonzero(steps == 880)[0])
    assert np.median(loss[k - 50 : k]) * 3 > 0.073  # what a running-median baseline would need to beat
    spikes = detect_spikes(steps, loss)
    assert [s.step for s in spikes] == [880]
    assert spikes[0].baseline < 0.003  # the trend (~0.0014), not the window's median
    monitor = SpikeMonitor()
    alerts = [a.step for s, v in zip(steps, loss, strict=True) if (a := monitor.update(int(s), float(v)))]
    assert alerts == [880] and monitor.spikes == spikes


def test_trend_baseline_extrapolates_a_clean_exponential_and_clips() -> None:
    falling = 0.5 ** np.arange(10.0)  # log-linear: the next value is 0.5 ** 10, clipped to the window's minimum
    assert trend_baseline(falling) == pytest.approx(0.5**9)
    assert trend_baseline(np.full(7, 0.3)) == pytest.approx(0.3)
    noisy_line = np.exp(-0.1 * np.arange(20.0))
    noisy_line[5] = 50.0  # an earlier spike in the window does not tilt the line
    assert trend_baseline(noisy_line) == pytest.approx(np.exp(-0.1 * 19), rel=1e-9)


def test_spike_as_dict() -> None:
    spike = Spike(step=3, loss=1.0, baseline=0.25, ratio=4.0, first_step=2)
    assert spike.as_dict() == {"step": 3, "loss": 1.0, "baseline": 0.25, "ratio": 4.0, "first_step": 2}


def test_a_spike_is_reported_at_its_peak_and_remembers_where_it_began() -> None:
    losses = [1.0] * 20 + [4.0, 6.0, 5.0] + [1.0] * 5  # three points above the trend, the peak in the middle
    steps = [10 * i for i in range(len(losses))]
    (spike,) = detect_spikes(steps, losses)
    assert (spike.first_step, spike.step, spike.loss) == (200, 210, 6.0)
    monitor = SpikeMonitor()
    alerts = [s for st, loss in zip(steps, losses, strict=True) if (s := monitor.update(st, loss)) is not None]
    assert [(a.first_step, a.step) for a in alerts] == [(200, 200)]  # told at once, at the first point
    assert monitor.spikes == [spike]


# ---------------------------------------------------------------------------
# atlas_plateaus: resting near a known level, flat or not
# ---------------------------------------------------------------------------

REST_ATLAS = {
    "uniform": math.log(10),
    "answer_prefix": math.log(10) * 0.999,
    "naive_sum": math.log(2),
    "carry_depth_1": 0.1 * math.log(2),
    "exact": 0.0,
}


def _sloped_rest_curve(seed=0):
    """log 10 until 500, a slow slide through log 2 (0.78 -> 0.62 over 600..1000), then a fast drop."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 1500, 10)
    y = np.where(steps < 500, math.log(10), 0.0)
    y = np.where((steps >= 500) & (steps < 600), math.log(10) + (steps - 500) / 100 * (0.78 - math.log(10)), y)
    y = np.where((steps >= 600) & (steps < 1000), 0.78 - (steps - 600) / 400 * 0.16, y)
    y = np.where(steps >= 1000, 0.62 * np.exp(-(steps - 1000) / 30.0) + 1e-4, y)
    return steps, y * np.exp(rng.normal(0, 0.03, len(steps)))


def test_atlas_plateaus_find_a_sloped_rest_near_log2():
    steps, loss = _sloped_rest_curve()
    found = atlas_plateaus(steps, loss, REST_ATLAS)
    names = [s.atlas_level for s in found]
    assert names == ["uniform", "naive_sum"]  # answer_prefix merged into uniform; fast drop not a rest
    uniform, rest = found
    assert uniform.start_step <= 30 and 470 <= uniform.end_step <= 560
    assert 580 <= rest.start_step <= 660 and 950 <= rest.end_step <= 1020
    assert rest.method == "atlas" and abs(rest.level - math.log(2)) < 0.05
    # A flat-segment detector with its default flatness calls the slide no shelf at all.
    assert not any(abs(s.level - math.log(2)) < 0.1 for s in detect_shelves(steps, loss, REST_ATLAS))


def test_atlas_plateaus_ignore_fast_crossings_and_short_curves():
    steps = np.arange(0, 200, 10)
    loss = np.exp(np.linspace(math.log(3.0), math.log(0.01), len(steps)))  # crosses every level quickly
    assert atlas_plateaus(steps, loss, REST_ATLAS) == []
    assert atlas_plateaus(steps[:5], np.full(5, math.log(2)), REST_ATLAS) == []


# ----------------------------------------------------------------------------
# Flat plateau or slow passage
# ----------------------------------------------------------------------------


def test_shelf_trend_tells_a_flat_rest_from_a_slow_passage() -> None:
    steps = np.arange(0, 1000, 10)
    rng = np.random.default_rng(0)
    flat = 0.693 * np.exp(rng.normal(0, 0.02, len(steps)))
    assert shelf_trend(steps, flat, 0, 990)["kind"] == "flat"
    # A loss that falls by half over the rest, with the same noise: a slow passage, its factor recovered.
    sliding = 0.693 * np.exp(-math.log(2) * steps / 990 + rng.normal(0, 0.02, len(steps)))
    trend = shelf_trend(steps, sliding, 0, 990)
    assert trend["kind"] == "slow passage" and trend["change_low"] < 0.5 < trend["change_high"]
    assert shelf_trend(steps, 1 / sliding, 0, 990)["kind"] == "rising"
    # Only the shelf's own steps count; too few of them say so.
    assert shelf_trend(steps, sliding, 500, 520) == {
        "change": None,
        "change_low": None,
        "change_high": None,
        "points": 3,
        "kind": "unclear",
    }
    # Noise ten times larger over a 5% fall: the interval spans the boundary.
    noisy = 0.693 * np.exp(-0.05 * steps / 990 + rng.normal(0, 0.2, len(steps)))
    assert shelf_trend(steps, noisy, 0, 990)["kind"] == "unclear"
    # Exact straight line in log: the factor is exact and the interval has no width.
    exact = np.exp(-steps / 1000)
    trend = shelf_trend(steps, exact, 0, 990)
    assert trend["change"] == pytest.approx(math.exp(-0.99), rel=1e-9)
    assert trend["change_low"] == pytest.approx(trend["change_high"], rel=1e-9)


def test_a_named_rest_lies_within_the_naming_tolerance_of_its_level() -> None:
    # Rests near log 2 with dips to 0.3-0.7x of it on 85 of 200 logs (bridged into one rest): the level
    # reported is that of the points near log 2, never the dips'.
    atlas = {"uniform": math.log(10), "naive_sum": math.log(2), "carry_depth_1": math.log(2) / 10}
    rng = np.random.default_rng(3)
    for trial in range(20):
        steps = np.arange(0, 2000, 10)
        loss = math.log(2) * np.exp(rng.normal(0, 0.05, len(steps)))
        dips = rng.choice(len(steps), size=85, replace=False)
        loss[dips] *= rng.uniform(0.3, 0.7, len(dips))
        for shelf in atlas_plateaus(steps, loss, atlas):
            assert abs(math.log(shelf.level / shelf.atlas_loss)) <= 0.12, (trial, shelf)
