"""One process per run folder: ``<job>/.lock`` names the holder's host, pid and Slurm job.

A second process that would write into the same folder (two commands with the same
``hydra.run.dir``, or ``resume=`` of a job that is still running) is refused. A lock left by a
process that is gone is taken over: one on this host whose pid no longer exists, or one of the same
Slurm job (a requeued job starts again on another node with the same job id).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class LockError(RuntimeError):
    """The run folder is in use by another process; the message names it."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job_id()}


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _stale(holder: dict) -> bool:
    """Whether the lock's holder is gone (or is this process); a lock from another host stays."""
    me = _holder()
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True
    if holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
        return False
    return holder["pid"] == me["pid"] or not _alive(holder["pid"])


def read_holder(path: Path) -> dict:
    """The holder a lock file names; ``{}`` for none, one being written, or one torn or written by
    something else (not a JSON object)."""
    try:
        holder = json.loads(path.read_text(errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def check_free(job_dir: Path) -> None:
    """Raise ``LockError`` when another live process holds ``<job_dir>/.lock`` (nothing is written)."""
    path = Path(job_dir) / LOCK_FILE
    holder = read_holder(path)  # none, or one being written: acquire() decides
    if holder and not _stale(holder):
        raise LockError(in_use(job_dir, holder, path))


def in_use(job_dir: Path, holder: dict, path: Path) -> str:
    return (
        f"{job_dir} is in use by pid {holder.get('pid')} on {holder.get('host')} "
        f"(lock file {path}; delete it if that process is gone)"
    )


def acquire(job_dir: Path) -> Path:
    """Take ``<job_dir>/.lock`` for this process; raise ``LockError`` when another live process holds it."""
    path = Path(job_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps(_holder()).encode()
    for _ in range(3):  # a stale lock is removed and creation retried; two takers race fairly
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = read_holder(path)  # {}: being written right now, or torn by a kill while writing
            if holder and not _stale(holder):
                raise LockError(in_use(job_dir, holder, path)) from None
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:  # its holder just released it
                continue
            if not holder and age < 10:  # its taker is writing it
                raise LockError(f"{job_dir} is in use (lock file {path} is being written)") from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        return path
    raise LockError(f"{job_dir} is in use (lock file {path} keeps reappearing)")


def release(job_dir: Path) -> None:
    """Remove the lock if this process holds it."""
    path = Path(job_dir) / LOCK_FILE
    holder = read_holder(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
