"""PNG plots of a run, drawn from its metric rows alone (no W&B needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from addrepro.data import TaskSpec  # noqa: E402


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


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure atomically: a kill mid-write never leaves a truncated PNG."""
    from addrepro.checkpoints import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
