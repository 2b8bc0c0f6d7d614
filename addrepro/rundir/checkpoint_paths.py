"""Where a job folder keeps its checkpoints, and which file a setting such as ``resume=`` names.

No torch here: a run is planned, and a bad path refused, before torch loads.
"""

from __future__ import annotations

import math
from pathlib import Path


class CheckpointError(ValueError):
    pass


LAST = "last.ckpt"


def checkpoint_steps(max_steps: int, every: int) -> list[int]:
    """Steps at which resumable checkpoints ``step_N.ckpt`` are written (``last.ckpt`` is extra)."""
    return list(range(every, max_steps + 1, every))


def log_spaced_steps(max_steps: int, count: int) -> list[int]:
    """Step 0 (the initialisation) and ``count`` steps log-spaced from 1 to ``max_steps``: dense where
    the early shelves form, sparse later."""
    steps = {round(math.exp(i * math.log(max_steps) / max(count - 1, 1))) for i in range(count)}
    return sorted(s for s in {0, *steps} if 0 <= s <= max_steps)


def checkpoint_dir(job_dir: str | Path) -> Path:
    """Where a job folder keeps its checkpoints."""
    return Path(job_dir) / "checkpoints"


def resumable_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of a job folder to continue from: ``last.ckpt``, else the latest ``step_N.ckpt``."""
    ckpt_dir = checkpoint_dir(folder)
    if (ckpt_dir / LAST).exists():
        return ckpt_dir / LAST
    steps = sorted(ckpt_dir.glob("step_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))
    return steps[-1] if steps else None


def resolve_checkpoint(value: str | Path, key: str = "checkpoint", resumable: bool = False) -> Path:
    """The checkpoint file that the setting ``key=value`` names: the file itself, or a job folder's
    ``checkpoints/last.ckpt`` (with ``resumable``, else its latest ``checkpoints/step_N.ckpt``).

    Raises ``CheckpointError`` with one line naming ``key=value`` when there is no such file.
    """
    path = Path(value)
    if not path.exists():
        raise CheckpointError(f"{key}={path} does not exist")
    if not path.is_dir() and not path.is_file():  # a pipe or a device would block or never end
        raise CheckpointError(f"{key}={path} is not a regular file or a folder")
    if not path.is_dir():
        return path
    if resumable:
        found = resumable_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"{key}={path}: no checkpoints/{LAST} or checkpoints/step_N.ckpt in this folder{sweep_hint(path, key)}"
            )
        return found
    found = checkpoint_dir(path) / LAST
    if not found.exists():
        raise CheckpointError(f"{key}={path}: no checkpoints/{LAST} in this folder{sweep_hint(path, key)}")
    return found


def sweep_hint(folder: Path, key: str) -> str:
    """For a sweep folder given where a job folder is meant: which of its jobs could be named."""
    try:
        jobs = sorted(p for p in folder.iterdir() if p.is_dir() and checkpoint_dir(p).is_dir())
    except OSError:
        return ""
    if not jobs:
        return ""
    more = f" … ({len(jobs)} jobs)" if len(jobs) > 1 else ""
    return f"; it holds job folders: name one, e.g. {key}={jobs[0]}{more}"


def find_resume_checkpoint(resume: str, job_dir: Path) -> Path | None:
    """``resume``: a checkpoint file, a job folder, or ``auto`` (this job's own folder, if it has one).

    ``auto`` is for pre-emption: a requeued job finds what it wrote before it was stopped, and a
    first start finds nothing and begins from scratch.
    """
    if resume == "auto":
        return resumable_checkpoint(job_dir)
    return resolve_checkpoint(resume, "resume", resumable=True)
