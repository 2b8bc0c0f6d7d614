"""Shelf exits found as training goes, on curves whose rests and exits are known."""

import math

from addrepro.shelves.atlas import atlas_by_place, shelf_atlas
from addrepro.shelves.exits import ShelfExitMonitor

LEVELS = {0: {"uniform": math.log(10), "marginal": math.log(10), "naive_sum": math.log(2), "exact": 0.0}}


def feed(monitor, curves, every=10):
    found = []
    for i in range(len(next(iter(curves.values())))):
        found += monitor.update(every * i, {j: c[i] for j, c in curves.items()})
    return found


def test_a_staircase_gives_one_exit_per_step_at_the_median_crossing():
    curve = [2.3] * 50 + [0.7] * 50 + [0.001] * 30
    exits = feed(ShelfExitMonitor(LEVELS), {0: curve})
    # The running median of 9 logs crosses at the 5th new point: index 54 (step 540) is the first log
    # off the shelf; the last one on it is step 530. Of two equal levels the first in atlas order names it.
    assert [(e.level, e.start_step, e.last_on_shelf, e.step) for e in exits] == [
        ("uniform", 0, 530, 540),
        ("naive_sum", 540, 1030, 1040),
    ]


def test_wobbles_short_rests_and_rises_are_not_exits():
    monitor = ShelfExitMonitor(LEVELS)
    noisy = [math.log(10) * (1.05 if i % 2 else 0.95) for i in range(60)]  # within the tolerance
    short = [0.69] * 4  # fewer than half the median's 9 logs: the median never leaves the shelf
    assert feed(monitor, {0: noisy + short + noisy}) == []
    assert monitor.resting[0][0] == "uniform"
    # from a rest at log 2 back up to log 10: a new rest, not an exit
    monitor = ShelfExitMonitor(LEVELS)
    assert feed(monitor, {0: [0.69] * 30 + [2.3] * 30}) == [] and monitor.resting[0][0] == "uniform"


def test_settling_on_a_lower_level_less_than_half_way_down_is_an_exit():
    levels = {0: {"uniform": math.log(10), "lower": 1.69}}  # 1.69 is not below half of log 10
    exits = feed(ShelfExitMonitor(levels), {0: [2.3] * 30 + [1.69] * 30})
    assert [(e.level, e.last_on_shelf) for e in exits] == [("uniform", 330)]  # the median's last log near 2.3
    assert exits[0].step == 330 + 10 * 10  # confirmed once the new rest has its 10 logs: steps 340..430


def test_places_are_followed_separately():
    atlas = atlas_by_place(shelf_atlas(2, 10, "msb", "add"))
    monitor = ShelfExitMonitor(atlas)
    found = feed(monitor, {0: [2.3] * 40 + [1e-4] * 20, 1: [2.3] * 60, 2: [0.3] * 60})
    assert [(e.place, e.level) for e in found] == [(0, "uniform")]
    assert monitor.resting[1][0] == "uniform"
