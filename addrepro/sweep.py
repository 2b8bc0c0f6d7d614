"""Job status files and the end-of-multirun summary that names failed jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS_FILE = "status.json"


def write_status(job_dir: Path, status: str, message: str = "", **extra: Any) -> None:
    record = {"status": status, "message": message, **extra}
    (Path(job_dir) / STATUS_FILE).write_text(json.dumps(record, indent=1))


def read_statuses(sweep_dir: Path) -> dict[str, dict]:
    """Status of every job folder of a sweep, keyed by folder name."""
    out = {}
    for job in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        if job.is_dir() and (job / ".hydra").is_dir():
            status_path = job / STATUS_FILE
            out[job.name] = (
                json.loads(status_path.read_text())
                if status_path.exists()
                else {"status": "unknown", "message": "no status.json (killed?)"}
            )
    return out


class SweepSummary(Callback):
    """After a multirun: write ``sweep_summary.json``, print the failed jobs, exit non-zero if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        statuses = read_statuses(sweep_dir)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(statuses, indent=1))
        failed = {k: v for k, v in statuses.items() if v["status"] != "ok"}
        print(f"addrepro: sweep {sweep_dir}: {len(statuses) - len(failed)}/{len(statuses)} jobs ok", file=sys.stderr)
        for job, status in failed.items():
            print(f"addrepro: job {job} {status['status']}: {status['message']}", file=sys.stderr)
        if failed:
            sys.exit(1)
