"""Statistics over the seeds of a sweep: a bootstrap interval of a mean, for tables that compare settings
by a handful of seeds each."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Resamples of the percentile bootstrap: the interval's ends move by well under a step of training at
# this count for the descent steps of five seeds.
RESAMPLES = 10_000


def bootstrap_interval(values: Sequence[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement, a fixed seed so
    that a report is the same each time it is drawn). One value gives ``(v, v)``: no spread is known."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_interval: no values")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(RESAMPLES, x.size))].mean(1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)
