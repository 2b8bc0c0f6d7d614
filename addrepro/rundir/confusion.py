"""``confusion.npz``: one model's confusion matrices over training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from addrepro.rundir.atomic import atomic_write


def save_confusion(job_dir: Path, confusions: list) -> Path | None:
    """Store ``(step, (n+1, base, base))`` pairs of one model as ``confusion.npz``."""
    if not confusions:
        return None

    steps = np.array([s for s, _ in confusions])
    mats = np.stack([c.numpy() for _, c in confusions])
    path = Path(job_dir) / "confusion.npz"
    atomic_write(path, lambda f: np.savez_compressed(f, steps=steps, confusion=mats))
    return path


def load_confusion(job_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = Path(job_dir) / "confusion.npz"
    if not path.exists():
        return None
    data = np.load(path)
    return data["steps"], data["confusion"]
