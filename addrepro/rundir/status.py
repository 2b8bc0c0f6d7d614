"""Job status files and the end-of-multirun summary that names failed jobs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.job import job_dirs

STATUS_FILE = "status.json"


def write_status(job_dir: Path, status: str, message: str = "", **extra: Any) -> None:
    """Write ``status.json`` atomically; a running job records its process, so a kill can be told later."""
    record = {"status": status, "message": message, **extra}
    if status == "running":
        record.update(pid=os.getpid(), host=socket.gethostname())
    atomic_write(Path(job_dir) / STATUS_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))


def read_status_file(path: Path) -> dict:
    """A job's status record; a missing, torn or foreign ``status.json`` reads as status "unknown"."""
    if not path.exists():
        return {"status": "unknown", "message": "no status.json (killed?)"}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"status": "unknown", "message": f"status.json cannot be read ({type(e).__name__})"}
    if not isinstance(record, dict) or not isinstance(record.get("status"), str):
        return {"status": "unknown", "message": "status.json holds no status"}
    return record


def read_statuses(sweep_dir: Path) -> dict[str, dict]:
    """Status of every job folder of a sweep, keyed by folder name.

    A job still marked "running" whose process is gone (same host) is reported as "killed".
    """
    out = {}
    for job in job_dirs(sweep_dir):
        status_path = job / STATUS_FILE
        out[job.name] = _unless_gone(read_status_file(status_path))
    return out


def _unless_gone(record: dict) -> dict:
    pid, host = record.get("pid"), record.get("host")
    if record.get("status") != "running" or host != socket.gethostname() or not isinstance(pid, int):
        return record  # another machine's job (SLURM) cannot be checked from here
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return {**record, "status": "killed", "message": f"process {pid} ended while running (killed?)"}
    except PermissionError:
        pass  # it exists, under another user
    return record
