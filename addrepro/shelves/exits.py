"""Shelf exits as training goes: the moment a place's loss leaves an atlas level it rested on.

The rule is the online form of ``detection.atlas_plateaus``: the running median of the last
``smooth`` logged losses rests at an atlas level while it stays within ``rel_tol`` of it (in log
space); ``min_points`` such logs in a row make a rest. The place has left the rest when the median
falls below ``level * drop`` — clearly below the level, not a wobble at its edge. Training uses the
exits to save the weights just before (the last log still on the shelf) and just after.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ShelfExit:
    """Place ``place`` rested at ``level`` from ``start_step`` to ``last_on_shelf`` and was below it at ``step``."""

    place: int
    level: str
    level_loss: float
    start_step: int
    last_on_shelf: int
    step: int

    def as_dict(self) -> dict:
        return asdict(self)


def distinct_levels(levels: dict[str, float]) -> dict[str, float]:
    """The levels a rest can be named after, as in ``atlas_plateaus``: above 1e-3 nats (lower ones have
    no visible exit), and of levels within 3% of each other only the first in atlas order."""
    kept: dict[str, float] = {}
    for name, value in levels.items():
        if value > 1e-3 and all(abs(math.log(value / v)) > 0.03 for v in kept.values()):
            kept[name] = value
    return kept


class ShelfExitMonitor:
    """Follows every place of one model; ``update`` returns the exits completed at this log."""

    def __init__(
        self,
        levels: dict[int, dict[str, float]],
        smooth: int = 9,
        rel_tol: float = 0.12,
        min_points: int = 10,
        drop: float = 0.5,
    ):
        self.levels = {j: distinct_levels(lv) for j, lv in levels.items()}
        self.rel_tol, self.min_points, self.drop = rel_tol, min_points, drop
        self.recent = {j: deque(maxlen=smooth) for j in levels}
        self.candidate: dict[int, tuple[str | None, int, int]] = {
            j: (None, 0, 0) for j in levels
        }  # level, first, count
        self.resting: dict[int, tuple[str, int, int] | None] = dict.fromkeys(levels)  # level, first step, last step
        self.exits: list[ShelfExit] = []

    def nearest(self, j: int, loss: float) -> str | None:
        """The level nearest ``loss`` in log space, if within ``rel_tol``."""
        best, distance = None, self.rel_tol
        for name, value in self.levels[j].items():
            d = abs(math.log(loss / value))
            if d < distance or (best is None and d == distance):
                best, distance = name, d
        return best

    def update(self, step: int, place_losses: dict[int, float]) -> list[ShelfExit]:
        """Feed the losses logged at ``step`` (place -> loss); returns the exits completed here."""
        found = []
        for j, loss in place_losses.items():
            if j not in self.recent or not math.isfinite(loss) or loss <= 0:
                continue
            self.recent[j].append(loss)
            median = float(np.median(self.recent[j]))
            level = self.nearest(j, median)
            rest = self.resting[j]
            if rest is not None and level == rest[0]:
                rest = self.resting[j] = (rest[0], rest[1], step)
            elif rest is not None and median < self.levels[j][rest[0]] * self.drop:
                found.append(self.leave(j, rest, step))
                rest = None
            name, first, count = self.candidate[j]
            name, first, count = (level, first, count + 1) if level == name else (level, step, 1)
            self.candidate[j] = (name, first, count)
            if name is not None and count >= self.min_points and (rest is None or rest[0] != name):
                if rest is not None and self.levels[j][name] < self.levels[j][rest[0]]:
                    found.append(self.leave(j, rest, step))  # settled on a lower level before falling far
                self.resting[j] = (name, first, step)  # a new rest (or back onto a higher one)
        return found

    def leave(self, j: int, rest: tuple[str, int, int], step: int) -> ShelfExit:
        name, first, last = rest
        exit_ = ShelfExit(j, name, self.levels[j][name], first, last, step)
        self.exits.append(exit_)
        self.resting[j] = None
        return exit_
