"""PNG plots of a run, drawn from its metric rows alone (no W&B needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from addrepro.rundir.atomic import atomic_write  # noqa: E402

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from addrepro.task.spec import TaskSpec  # noqa: E402

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")

# Okabe and Ito's colour-blind-safe palette (its yellow left out: too pale on white), then tab20.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999")


def colour(i: int) -> tuple | str:
    """The i-th of a set of curves that must be told apart: colour-blind-safe first, then tab20."""
    return COLOURS[i] if i < len(COLOURS) else plt.get_cmap("tab20")((i - len(COLOURS)) % 20)


def log_limits(curves: list[np.ndarray], top: float = 4.0) -> tuple[float, float]:
    """Limits of a log axis that show every positive value of ``curves``: from the decade below the
    lowest to at least ``top`` (above log 10 nats, the highest shelf of base 10), so panels drawn with
    the same limits compare at a glance and a learned place's loss is never cut off at a fixed floor."""
    values = np.concatenate([np.asarray(c, dtype=float).ravel() for c in curves] or [np.zeros(0)])
    values = values[np.isfinite(values) & (values > 0)]
    if not values.size:
        return 1e-4, top
    floor = 10.0 ** np.floor(np.log10(values.min()))
    return min(floor, top / 10), max(top, float(values.max()) * 1.3)


def place_label(j: int, spec: TaskSpec) -> str:
    if j == spec.n_digits:
        return f"place {j} (carry-out)"
    if j > 1:
        return f"place {j} ({spec.base}{str(j).translate(SUPERSCRIPT)})"
    return "place 0 (units)" if j == 0 else f"place 1 ({spec.base}s)"


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` over the rows that have it."""
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and r[key] == r[key]]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (odd); near the ends, over the points that exist.

    An arithmetic mean of losses, not a geometric one: the mean loss is what a shelf level means.
    """
    values = np.asarray(values, dtype=float)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return (csum[hi] - csum[lo]) / (hi - lo)


def smoothing_window(n_points: int) -> int:
    """An odd window of about 2% of a curve's points (1 for short curves, at most 25)."""
    return min(2 * (n_points // 100) + 1, 25)


def smoothing_label(steps: np.ndarray, window: int, what: str = "train") -> str:
    """What a running mean of ``window`` logged points spans, in optimiser steps, for a legend."""
    spacing = int(np.median(np.diff(steps))) if len(steps) > 1 else 1
    return f"{what}, running mean over {window * spacing} steps"


def label_without_overlap(ax: plt.Axes, labels: list[tuple[float, float, str]], **style) -> list:  # noqa: ANN003
    """Write ``(x, y, text)`` labels next to their points, each moved (up first, then down, a line at a
    time) to the nearest place where it overlaps no label written before it and stays inside the panel,
    so labels never overprint however crowded the curve.

    Call after the figure's layout is final: the check uses the labels' drawn extents.
    """
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = 72 / ax.figure.dpi  # display pixels -> offset points
    placed: list = []
    texts = []
    for x, y, text in labels:
        label = ax.annotate(text, (x, y), xytext=(0, 1), textcoords="offset points", ha="center", va="bottom", **style)
        box = label.get_window_extent(renderer)
        # Inside the panel horizontally: the atlas labels live right of it.
        dx = -(box.x1 - frame.x1) * points - 1 if box.x1 > frame.x1 else max(0.0, (frame.x0 - box.x0) * points + 1)
        line = box.height * points + 1
        for lift in [1.0] + [sign * k * line for k in range(1, 30) for sign in (1, -1)]:
            label.set_position((dx, lift))
            box = label.get_window_extent(renderer)
            inside = frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
        else:  # nowhere free: above the point, as a plain label would be
            label.set_position((dx, 1.0))
            box = label.get_window_extent(renderer)
        placed.append(box)
        texts.append(label)
    return texts


def margin_labels(ax: plt.Axes, labels: list[tuple[float, str]], **style) -> list:  # noqa: ANN003
    """Write ``(y, text)`` labels right of the panel at data height ``y``, spread by ``spread_labels``."""
    texts = [
        ax.annotate(
            f" {text}",
            (1.0, y),
            xycoords=ax.get_yaxis_transform(),
            xytext=(0, 0),
            textcoords="offset points",
            va="center",
            ha="left",
            **style,
        )
        for y, text in sorted(labels, key=lambda label: -label[0])
    ]
    spread_labels(ax, texts)
    return texts


def spread_labels(ax: plt.Axes, texts: list, min_gap_pt: float = 7.0) -> None:
    """Push margin labels (highest first) down until each sits ``min_gap_pt`` points below the one
    above it, so close levels (2.30 and 2.11 on a log axis) never touch. Run again after the
    layout changes the panel's height."""
    to_points = 72 / ax.figure.dpi
    last = None
    for text in texts:
        at = ax.transData.transform((0, text.xy[1]))[1] * to_points  # the level's height, in points
        shift = 0.0 if last is None or last - at >= min_gap_pt else (last - min_gap_pt) - at
        last = at + shift
        text.set_position((0, shift))


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure atomically: a kill mid-write never leaves a truncated PNG."""
    # No bbox_inches="tight": every figure is laid out with tight_layout already, and the tight box
    # would render the whole figure a second time (a fifth of a job's plotting time).
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
