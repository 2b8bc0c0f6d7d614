"""``confusion.npz``: one model's confusion matrices over training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.metrics_file import RunFileError

if TYPE_CHECKING:  # the run files are read before torch loads (the config checks come first)
    import torch


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
    if not path.is_file():  # a pipe would block, a device never end
        raise RunFileError(f"{path} is not a regular file")
    try:
        with np.load(path, allow_pickle=False) as data:
            steps, confusion = data["steps"], data["confusion"]
    except Exception as e:  # torn, foreign or pickled: numpy raises many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{path} cannot be read ({reason})") from None
    if steps.dtype.kind not in "iu" or confusion.dtype.kind != "f":
        raise RunFileError(
            f"{path} holds steps of {steps.dtype} and matrices of {confusion.dtype}, not integers and floats"
        )
    if steps.ndim != 1 or confusion.ndim != 4 or len(steps) != len(confusion):
        raise RunFileError(f"{path} holds steps {steps.shape} and matrices {confusion.shape}, not one matrix per step")
    return steps, confusion


def confusion_image(confusion: torch.Tensor, scale: int = 8) -> np.ndarray:
    """Greyscale tiles of ``(n+1, base, base)`` probabilities, carry-out first; NaN rows drawn mid-grey."""
    tiles = []
    for j in range(confusion.shape[0] - 1, -1, -1):
        tile = confusion[j].nan_to_num(0.5).clamp(0, 1).numpy()
        tile = np.kron(1.0 - tile, np.ones((scale, scale)))  # dark = high probability
        tiles += [tile, np.ones((tile.shape[0], scale))]
    return (np.concatenate(tiles[:-1], axis=1) * 255).astype(np.uint8)


def confusion_row(confusion: torch.Tensor, step: int) -> dict:
    """The W&B row of one model's confusion matrices at ``step``: one image, places side by side."""
    import wandb  # noqa: PLC0415 - only W&B runs pay for this import

    caption = f"step {step}: rows true digit, cols predicted; places carry-out .. units"
    return {"val/confusion": wandb.Image(confusion_image(confusion), caption=caption), "trainer/global_step": step}
