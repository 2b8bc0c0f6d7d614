"""Loss spikes: short excursions of a training loss above its recent level."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Spike:
    """A transient jump of the loss above its recent running median."""

    step: int
    loss: float
    baseline: float  # median of the `window` finite losses before this point
    ratio: float  # loss / baseline

    def as_dict(self) -> dict:
        return asdict(self)


def _min_history(window: int) -> int:
    # A median of a handful of points is already a fair baseline; waiting
    # for a full window would blind the detector at the start of training.
    return max(1, min(window, 10))


def _is_spike(loss: float, baseline: float, factor: float, min_excess: float) -> bool:
    # Both conditions: the ratio alone fires on tiny absolute wiggles of a
    # near-zero loss, the excess alone on ordinary noise of a high loss.
    return loss > factor * baseline and loss - baseline > min_excess


def detect_spikes(
    steps: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    window: int = 50,
    factor: float = 3.0,
    min_excess: float = 0.05,
) -> list[Spike]:
    """Find loss spikes in a whole curve.

    A point is a spike point when its loss exceeds ``factor`` x the median of
    the previous ``window`` finite losses and exceeds it by more than
    ``min_excess``. Runs of consecutive spike points are one spike,
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

    # baseline[i] = median of loss_arr[max(0, i - window):i], for i >= need.
    baseline = np.full(n, np.nan)
    for i in range(need, min(window, n)):
        baseline[i] = np.median(loss_arr[:i])
    if n > window:
        past = np.lib.stride_tricks.sliding_window_view(loss_arr[:-1], window)
        baseline[window:] = np.median(past, axis=1)

    spikes: list[Spike] = []
    in_spike = False
    for i in range(need, n):
        if not _is_spike(loss_arr[i], baseline[i], factor, min_excess):
            in_spike = False
            continue
        candidate = _make_spike(steps_arr[i], loss_arr[i], baseline[i])
        if not in_spike:
            spikes.append(candidate)
        elif candidate.loss > spikes[-1].loss:
            spikes[-1] = candidate  # keep the peak of the run
        in_spike = True
    return spikes


def _make_spike(step: float, loss: float, baseline: float) -> Spike:
    ratio = float(loss / baseline) if baseline > 0 else math.inf
    return Spike(step=int(step), loss=float(loss), baseline=float(baseline), ratio=ratio)


class SpikeMonitor:
    """Streaming spike detection for use inside a training loop.

    Keeps only the last ``window`` losses. ``update`` returns a Spike at the
    first point of each new spike so the caller can react at once; the
    ``spikes`` list holds one entry per spike, updated to the run's peak as
    the spike continues, and so equals ``detect_spikes`` on the same series.
    """

    def __init__(self, window: int = 50, factor: float = 3.0, min_excess: float = 0.05):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.factor = factor
        self.min_excess = min_excess
        self._history: deque[float] = deque(maxlen=window)
        self._in_spike = False
        self.spikes: list[Spike] = []

    def update(self, step: int, loss: float) -> Spike | None:
        loss = float(loss)
        if not math.isfinite(loss):
            return None  # ignored, as in detect_spikes
        new_spike: Spike | None = None
        if len(self._history) >= _min_history(self.window):
            baseline = float(np.median(self._history))
            if _is_spike(loss, baseline, self.factor, self.min_excess):
                candidate = _make_spike(step, loss, baseline)
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
