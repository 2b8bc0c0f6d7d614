"""PNG plots of a run, drawn from its metric rows alone (no W&B needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from addrepro.rundir.atomic import atomic_write  # noqa: E402

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from addrepro.task.spec import TaskSpec  # noqa: E402


def place_label(j: int, spec: TaskSpec) -> str:
    if j == spec.n_digits:
        return f"place {j} (carry-out)"
    return f"place {j} ({spec.base}^{j})" if j > 1 else ("place 0 (units)" if j == 0 else f"place 1 ({spec.base}s)")


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


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure atomically: a kill mid-write never leaves a truncated PNG."""
    # No bbox_inches="tight": every figure is laid out with tight_layout already, and the tight box
    # would render the whole figure a second time (a fifth of a job's plotting time).
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
