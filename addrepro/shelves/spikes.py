"""Loss spikes: short excursions of a training loss above its local trend.

The baseline a loss is compared with follows the trend of the last ``window`` logged losses on a
log scale (a Theil–Sen line: the median of pairwise slopes, robust to earlier spikes), extrapolated
to the point and clipped to the window's range. A plain running median would lag behind a loss that
falls fast: a loss that has just dropped from 0.08 to 0.0014 and jumps back to 0.07 is a spike,
although 0.07 is below the median of the last 50 logs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Spike:
    """A transient jump of the loss above its local trend."""

    step: int
    loss: float
    baseline: float  # the trend of the `window` finite losses before this point, extrapolated to it
    ratio: float  # loss / baseline
    first_step: int = -1  # the first point above the trend (the peak is ``step``); -1: unknown

    def as_dict(self) -> dict:
        return asdict(self)


def _min_history(window: int) -> int:
    # A median of a handful of points is already a fair baseline; waiting
    # for a full window would blind the detector at the start of training.
    return max(1, min(window, 10))


def trend_baseline(history: np.ndarray) -> float:
    """The loss expected next from ``history`` (earlier finite losses, oldest first).

    A Theil–Sen line through (index, log loss), evaluated one index past the end and clipped to the
    range of ``history``, so a noisy slope never extrapolates outside what was seen.
    """
    y = np.log(np.maximum(history.astype(np.float64), _FLOOR))
    n = len(y)
    if n < 2:
        return float(np.exp(y[0]))
    i, j = np.triu_indices(n, k=1)
    slope = float(np.median((y[j] - y[i]) / (j - i)))
    intercept = float(np.median(y - slope * np.arange(n)))
    predicted = float(np.clip(intercept + slope * n, y.min(), y.max()))
    return float(np.exp(predicted))


# Losses are floored before taking logs, so an exact zero stays finite.
_FLOOR = 1e-12


# A jump of ``ratio_alone`` x the trend needs to rise only this far (nats) to count, so that a loss near
# zero that jumps 100-fold (1e-4 -> 0.02) is a spike, while float noise of an exact fit is not.
RATIO_ALONE_FLOOR = 1e-3


def _is_spike(
    loss: float, baseline: float, factor: float, min_excess: float, ratio_alone: float, recent_max: float
) -> bool:
    # The ratio alone would fire on tiny wiggles of a near-zero loss, the excess alone on ordinary noise of
    # a high loss: both, or a jump so large against the trend (and above every recent loss, so not the
    # usual noise of a batch that holds one wrong example) that the absolute floor would hide it.
    if loss > factor * baseline and loss - baseline > min_excess:
        return True
    return loss > ratio_alone * baseline and loss - baseline > RATIO_ALONE_FLOOR and loss > recent_max


def detect_spikes(
    steps: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    window: int = 50,
    factor: float = 3.0,
    min_excess: float = 0.05,
    ratio_alone: float = 30.0,
) -> list[Spike]:
    """Find loss spikes in a whole curve.

    A point is a spike point when its loss exceeds ``factor`` x its baseline
    (``trend_baseline`` of the previous ``window`` finite losses) and exceeds it
    by more than ``min_excess`` — or exceeds ``ratio_alone`` x its baseline and
    every loss of the window, by more than ``RATIO_ALONE_FLOOR`` (a jump from a
    near-zero loss). Runs of consecutive spike points are one spike,
    reported at its peak. NaN/inf points are skipped. The baseline includes
    earlier spike points, exactly as :class:`SpikeMonitor` sees them, and
    needs at least min(window, 10) earlier points.
    """
    steps_arr = np.asarray(steps, dtype=float).reshape(-1)
    loss_arr = np.asarray(losses, dtype=float).reshape(-1)
    if steps_arr.shape != loss_arr.shape:
        raise ValueError(f"steps and losses differ in length: {steps_arr.shape} vs {loss_arr.shape}")
    keep = np.isfinite(loss_arr)
    steps_arr, loss_arr = steps_arr[keep], loss_arr[keep]
    n = len(loss_arr)
    need = _min_history(window)
    if n <= need:
        return []

    # baseline[i]: the trend of loss_arr[max(0, i - window):i] extrapolated to i, for i >= need.
    baseline = np.full(n, np.nan)
    for i in range(need, n):
        baseline[i] = trend_baseline(loss_arr[max(0, i - window) : i])

    spikes: list[Spike] = []
    in_spike = False
    for i in range(need, n):
        recent_max = float(loss_arr[max(0, i - window) : i].max())
        if not _is_spike(loss_arr[i], baseline[i], factor, min_excess, ratio_alone, recent_max):
            in_spike = False
            continue
        candidate = _make_spike(steps_arr[i], loss_arr[i], baseline[i], spikes[-1].first_step if in_spike else None)
        if not in_spike:
            spikes.append(candidate)
        elif candidate.loss > spikes[-1].loss:
            spikes[-1] = candidate  # keep the peak of the run
        in_spike = True
    return spikes


def _make_spike(step: float, loss: float, baseline: float, first_step: int | None = None) -> Spike:
    ratio = float(loss / baseline) if baseline > 0 else math.inf
    first = int(step) if first_step is None else first_step
    return Spike(step=int(step), loss=float(loss), baseline=float(baseline), ratio=ratio, first_step=first)


class SpikeMonitor:
    """Streaming spike detection for use inside a training loop.

    Keeps only the last ``window`` losses. ``update`` returns a Spike at the
    first point of each new spike so the caller can react at once; the
    ``spikes`` list holds one entry per spike, updated to the run's peak as
    the spike continues, and so equals ``detect_spikes`` on the same series.
    """

    def __init__(self, window: int = 50, factor: float = 3.0, min_excess: float = 0.05, ratio_alone: float = 30.0):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.factor = factor
        self.min_excess = min_excess
        self.ratio_alone = ratio_alone
        self._history: deque[float] = deque(maxlen=window)
        self._in_spike = False
        self.spikes: list[Spike] = []

    def update(self, step: int, loss: float) -> Spike | None:
        loss = float(loss)
        if not math.isfinite(loss):
            return None  # ignored, as in detect_spikes
        new_spike: Spike | None = None
        if len(self._history) >= _min_history(self.window):
            baseline = trend_baseline(np.array(self._history, dtype=np.float64))
            recent_max = max(self._history)
            if _is_spike(loss, baseline, self.factor, self.min_excess, self.ratio_alone, recent_max):
                first = self.spikes[-1].first_step if self._in_spike else None
                candidate = _make_spike(step, loss, baseline, first)
                if not self._in_spike:
                    self.spikes.append(candidate)
                    new_spike = candidate
                elif candidate.loss > self.spikes[-1].loss:
                    self.spikes[-1] = candidate
                self._in_spike = True
            else:
                self._in_spike = False
        self._history.append(loss)
        return new_spike
