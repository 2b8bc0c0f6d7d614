"""``confusion.npz``: one model's confusion matrices over training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.metrics_file import RunFileError


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
    """``(steps (S,), confusion (S, n+1, base, base))`` of a job (None without the file); a file that is
    not what ``save_confusion`` writes raises ``RunFileError`` naming it."""
    path = Path(job_dir) / "confusion.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            steps, confusion = data["steps"], data["confusion"]
    except Exception as e:  # torn, foreign or pickled: numpy raises many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{path} cannot be read ({reason})") from None
    if steps.ndim != 1 or confusion.ndim != 4 or len(steps) != len(confusion):
        raise RunFileError(f"{path} holds steps {steps.shape} and matrices {confusion.shape}, not one matrix per step")
    return steps, confusion
