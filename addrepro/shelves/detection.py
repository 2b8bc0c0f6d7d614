"""Detect loss "shelves" (plateaus) and loss spikes in training curves.

Per-answer-place loss curves of small addition transformers fall in phases:
they rest on plateaus at characteristic levels (log 10 for a uniform guess
over digits, log 2 for a carry coin-flip, ...) and then drop. This module
finds those plateaus in a logged loss curve and names them against an
"atlas" of known levels, and separately flags short loss spikes.

Everything works in log-loss, because the noise of a minibatch loss is
roughly multiplicative and the shelves of interest span several decades.
Work is done in *index* space (one point per logged evaluation) so that
log-spaced logging needs no special treatment; only the reported
boundaries are translated back to training steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import ruptures as rpt
from ruptures.base import BaseCost

__all__ = [
    "Shelf",
    "detect_shelves",
]

# Losses are clipped to this floor before taking logs, so that an exact zero
# (float underflow of a solved place) becomes a very low, finite shelf rather
# than -inf.
_LOSS_FLOOR = 1e-12
# An atlas level of exactly 0 cannot be compared in log space; a shelf
# matches it only when its own level is below this.
_ZERO_MATCH_LEVEL = 1e-3
# Change-point search runs on at most this many points (block averages of the
# smoothed curve); PELT's cost is super-linear in the length, and shelves of
# interest are far longer than n / _MAX_SEGMENT_POINTS.
_MAX_SEGMENT_POINTS = 400
# Curves shorter than this carry no usable shelf information.
_MIN_POINTS = 10
# Default penalty = _PENALTY_SCALE * noise_variance * log(n); BIC-like, with a
# generous constant because the smoothed signal has correlated noise.
_PENALTY_SCALE = 10.0
# Lower bound on the estimated log-loss noise (1%): noise-free synthetic or
# heavily averaged curves would otherwise give a ~0 penalty and shatter.
_MIN_NOISE = 0.01
# Consistency factor turning a median absolute deviation into a standard
# deviation for Gaussian noise.
_MAD_TO_STD = 1.4826
# Slack, in standard errors, added to max_slope in the flatness test so that
# short shelves of a noisy curve are not rejected for noise alone. One is
# enough: more lets the curved shoulders of drops pass as short shelves.
_SLACK = 1.0


# ----------------------------------------------------------------------------
# Shelves
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shelf:
    """A plateau of the loss curve, with inclusive step boundaries."""

    start_step: int
    end_step: int
    level: float  # median loss on the shelf (nats)
    atlas_level: str | None  # name of the nearest atlas level within tolerance
    atlas_loss: float | None
    method: str = "change_point"  # "change_point" (a flat segment) or "atlas" (resting near a level)

    def as_dict(self) -> dict:
        return asdict(self)


class _CostLinearTrend(BaseCost):
    """Squared error of a least-squares line fitted to each segment.

    A piecewise-*linear* model (rather than ruptures' piecewise-constant
    "l2") lets a steady descent stay one segment with a large slope, instead
    of being cut into a staircase of short, nearly flat pieces that would be
    mistaken for shelves. Prefix sums make every segment cost O(1), which
    ruptures' built-in "linear" cost (a lstsq per call) is not.
    """

    model = "linear_trend"
    min_size = 3

    def fit(self, signal: np.ndarray) -> _CostLinearTrend:
        y = np.asarray(signal, dtype=float).reshape(-1)
        self.signal = y.reshape(-1, 1)  # ruptures reads signal.shape
        # x is scaled to [0, 1] to keep the prefix sums well conditioned.
        x = np.linspace(0.0, 1.0, len(y))

        def prefix(a: np.ndarray) -> np.ndarray:
            return np.concatenate([[0.0], np.cumsum(a)])

        self._sx, self._sy = prefix(x), prefix(y)
        self._sxx, self._sxy, self._syy = prefix(x * x), prefix(x * y), prefix(y * y)
        return self

    def error(self, start: int, end: int) -> float:
        n = end - start
        sx = self._sx[end] - self._sx[start]
        sy = self._sy[end] - self._sy[start]
        cxx = self._sxx[end] - self._sxx[start] - sx * sx / n
        cxy = self._sxy[end] - self._sxy[start] - sx * sy / n
        cyy = self._syy[end] - self._syy[start] - sy * sy / n
        sse = cyy - cxy * cxy / cxx if cxx > 0 else cyy
        # Rounding in the prefix sums can give tiny negative values.
        return max(sse, 0.0)


def running_median(y: np.ndarray, width: int) -> np.ndarray:
    """Centred running median; edges are padded by repeating the end values."""
    width = max(1, int(width))
    if width % 2 == 0:
        width += 1  # a centred window needs an odd width
    if width == 1 or len(y) < 2:
        return y.copy()
    half = width // 2
    padded = np.pad(y, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    return np.median(windows, axis=1)


def _robust_noise(y: np.ndarray, lag: int = 1) -> float:
    """Noise std of y from the MAD of its lag-differences.

    Differencing removes the (slowly varying) shelf levels and the median
    ignores the few large differences at drops, so this measures the
    point-to-point scatter.
    """
    if len(y) <= lag:
        return 0.0
    d = y[lag:] - y[:-lag]
    return float(_MAD_TO_STD * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _block_means(y: np.ndarray, block: int) -> np.ndarray:
    starts = np.arange(0, len(y), block)
    counts = np.diff(np.append(starts, len(y)))
    return np.add.reduceat(y, starts) / counts


def _drift(y: np.ndarray) -> tuple[float, float]:
    """Change of log-loss across a segment, and its standard error.

    Estimated as 1.5 x (median of the last third - median of the first
    third): medians keep a single spike or a bit of a neighbouring drop at
    the segment edge from tilting the estimate, as a least-squares slope
    would. The factor 1.5 rescales the distance between third-centres
    (2/3 of the segment) to the full segment, i.e. slope x length.
    """
    third = max(1, len(y) // 3)
    head, tail = y[:third], y[-third:]
    drift = 1.5 * float(np.median(tail) - np.median(head))
    # The median of m Gaussian points has std ~1.2533 sigma / sqrt(m).
    sigma = _robust_noise(y)
    stderr = 1.5 * math.sqrt(2.0) * 1.2533 * sigma / math.sqrt(third)
    return drift, stderr


def _is_flat(y: np.ndarray, max_slope: float) -> bool:
    drift, stderr = _drift(y)
    return abs(drift) <= max_slope + _SLACK * stderr


def _match_atlas(level: float, atlas: dict[str, float] | None, rel_tol: float) -> tuple[str | None, float | None]:
    """Nearest atlas level in log space, if within rel_tol (in log units)."""
    if not atlas:
        return None, None
    best: tuple[float, str, float] | None = None
    for name, loss in atlas.items():
        if loss <= 0:
            # log(0) is undefined: a zero level matches only a tiny loss, and
            # counts as an exact match then.
            dist = 0.0 if level < _ZERO_MATCH_LEVEL else math.inf
        else:
            dist = abs(math.log(max(level, _LOSS_FLOOR) / loss))
        if dist <= rel_tol and (best is None or dist < best[0]):
            best = (dist, name, float(loss))
    if best is None:
        return None, None
    return best[1], best[2]


def nearest_levels(level: float, atlas: dict[str, float] | None, k: int = 3) -> list[dict]:
    """The ``k`` atlas levels nearest to a shelf at ``level`` (nats), by distance in log space, whether or
    not within a matching tolerance: for a shelf that matches no level, what it is closest to and how far.
    Zero levels are left out unless the loss is tiny (then they are at distance 0)."""
    out = []
    for name, loss in (atlas or {}).items():
        if loss <= 0:
            if level >= _ZERO_MATCH_LEVEL:
                continue
            dist = 0.0
        else:
            dist = abs(math.log(max(level, _LOSS_FLOOR) / loss))
        out.append({"level": name, "loss": float(loss), "distance": dist})
    return sorted(out, key=lambda c: c["distance"])[:k]


def detect_shelves(
    steps: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    atlas: dict[str, float] | None = None,
    *,
    smooth: int = 9,
    penalty: float | None = None,
    min_length: int = 5,
    max_slope: float = 0.1,
    rel_tol: float = 0.15,
) -> list[Shelf]:
    """Find plateaus ("shelves") of a loss curve.

    Args:
        steps: training step of each logged point (any spacing, increasing).
        losses: loss at each step (nats). NaN/inf points are ignored.
        atlas: named reference levels, e.g. {"uniform": log(10)}; each shelf
            is labelled with the nearest one within ``rel_tol``.
        smooth: width (points) of the running median applied to log-loss.
        penalty: PELT penalty on the smoothed log-loss (piecewise-linear
            cost). Default: scaled from the estimated noise level.
        min_length: minimum number of logged points on a shelf.
        max_slope: largest |change of log-loss across the segment|
            (fitted slope per point x number of points) for it to count as
            flat; 0.1 is a ~10% loss change over the whole shelf. Noisy
            short segments get two standard errors of slack on top.
        rel_tol: largest |log(level / atlas_loss)| for an atlas match.

    Returns:
        Shelves in order of time, with inclusive step boundaries.
    """
    steps_arr = np.asarray(steps, dtype=float).reshape(-1)
    loss_arr = np.asarray(losses, dtype=float).reshape(-1)
    if steps_arr.shape != loss_arr.shape:
        raise ValueError(f"steps and losses differ in length: {steps_arr.shape} vs {loss_arr.shape}")
    keep = np.isfinite(loss_arr) & np.isfinite(steps_arr)
    steps_arr, loss_arr = steps_arr[keep], loss_arr[keep]
    n = len(loss_arr)
    if n < max(_MIN_POINTS, min_length):
        return []

    log_loss = np.log(np.maximum(loss_arr, _LOSS_FLOOR))
    smoothed = running_median(log_loss, smooth)

    # Segment block averages of the smoothed curve to bound PELT's cost.
    block = math.ceil(n / _MAX_SEGMENT_POINTS)
    signal = _block_means(smoothed, block)
    n_blocks = len(signal)

    if penalty is None:
        # The smoothing makes neighbouring points correlated, so measure the
        # scatter at a lag beyond the smoothing width.
        lag = max(1, math.ceil(smooth / block))
        sigma = max(_robust_noise(signal, lag), _MIN_NOISE)
        penalty = _PENALTY_SCALE * sigma**2 * math.log(n_blocks)

    algo = rpt.Pelt(custom_cost=_CostLinearTrend(), min_size=3, jump=1)
    try:
        ends = algo.fit(signal).predict(pen=penalty)
    except rpt.exceptions.BadSegmentationParameters:
        ends = [n_blocks]
    # Block boundaries -> point indices: segment k covers [bounds[k], bounds[k+1]).
    bounds = [0] + [min(e * block, n) for e in ends]

    # Flat segments, as [start, end) index pairs; None marks a non-flat
    # segment so that only truly adjacent flat segments get merged.
    flat: list[tuple[int, int] | None] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        flat.append((a, b) if _is_flat(log_loss[a:b], max_slope) else None)

    # Merge neighbours that are the same shelf cut in two (PELT sometimes
    # splits a long noisy shelf): same level and still flat once joined.
    merged: list[tuple[int, int] | None] = []
    for seg in flat:
        prev = merged[-1] if merged else None
        if seg is not None and prev is not None:
            a0, b0 = prev
            a1, b1 = seg
            gap = abs(np.median(log_loss[a0:b0]) - np.median(log_loss[a1:b1]))
            if gap <= max_slope and _is_flat(log_loss[a0:b1], max_slope):
                merged[-1] = (a0, b1)
                continue
        merged.append(seg)

    cores = [seg for seg in merged if seg is not None]
    shelves = []
    for k, (a, b) in enumerate(cores):
        # PELT's boundaries inside a curved shoulder are somewhat arbitrary,
        # so grow the shelf over neighbouring non-flat points for as long as
        # the smoothed curve stays within a band around the shelf level
        # (never into another shelf's core).
        log_level = float(np.median(log_loss[a:b]))
        core_noise = _robust_noise(log_loss[a:b]) * 1.2533 / math.sqrt(max(1, smooth))
        band = max_slope / 2 + 3.0 * core_noise
        lo = cores[k - 1][1] if k > 0 else 0
        hi = cores[k + 1][0] if k + 1 < len(cores) else n
        while a > lo and abs(smoothed[a - 1] - log_level) <= band:
            a -= 1
        while b < hi and abs(smoothed[b] - log_level) <= band:
            b += 1
        if b - a < min_length:
            continue
        level = float(np.median(loss_arr[a:b]))
        name, atlas_loss = _match_atlas(level, atlas, rel_tol)
        shelves.append(
            Shelf(
                start_step=int(steps_arr[a]),
                end_step=int(steps_arr[b - 1]),
                level=level,
                atlas_level=name,
                atlas_loss=atlas_loss,
            )
        )
    return shelves


def atlas_plateaus(
    steps, losses, atlas: dict[str, float], *, smooth: int = 9, rel_tol: float = 0.12, min_points: int = 10
) -> list[Shelf]:
    """Stretches where the smoothed curve rests near an atlas level, whether or not it is flat.

    Change points find flat segments; a curve that sinks slowly through a level (the tens digit of
    5-digit addition passing log 2 over a few hundred steps) has none, yet it does rest near that
    level. Every point is assigned to the nearest nonzero atlas level within ``rel_tol`` (in log
    space); runs of at least ``min_points`` points at one level are reported, each with the median
    smoothed loss of its points near the level.
    """
    steps = np.asarray(steps, dtype=float)
    losses = np.asarray(losses, dtype=float)
    keep = np.isfinite(losses) & np.isfinite(steps) & (losses > 0)
    steps, losses = steps[keep], losses[keep]
    # Levels closer than a few percent (answer_prefix is log 10 to 4 decimals at low places) would
    # split one rest into alternating labels: keep the first of each such group, in atlas order.
    levels: list[tuple[str, float]] = []
    for name, value in atlas.items():
        if value > 1e-3 and all(abs(math.log(value / kept)) > 0.03 for _, kept in levels):
            levels.append((name, value))
    if len(losses) < min_points or not levels:
        return []
    y = running_median(np.log(losses), smooth)
    logs = np.log([v for _, v in levels])
    distance = np.abs(y[:, None] - logs[None, :])  # (points, levels)
    nearest = distance.argmin(1)
    label = np.where(distance[np.arange(len(y)), nearest] <= rel_tol, nearest, -1)
    runs: list[list[int]] = []  # [label, first index, last index]
    for i, lab in enumerate(label):
        if lab < 0:
            continue
        if runs and runs[-1][0] == lab and i - runs[-1][2] <= smooth:  # bridge short excursions
            runs[-1][2] = i
        elif runs and runs[-1][0] == lab and i == runs[-1][2] + 1:
            runs[-1][2] = i
        else:
            runs.append([lab, i, i])
    out = []
    for lab, first, last in runs:
        if last - first + 1 >= min_points:
            name, value = levels[lab]
            # The median of the points that were near the level (not of the excursions bridged between
            # them): a named shelf's level always lies within rel_tol of its atlas level.
            near = label[first : last + 1] == lab
            level = float(np.exp(np.median(y[first : last + 1][near])))
            out.append(Shelf(int(steps[first]), int(steps[last]), level, name, float(value), method="atlas"))
    return out


# ----------------------------------------------------------------------------
# Spikes
# ----------------------------------------------------------------------------
