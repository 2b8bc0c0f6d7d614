"""The end-of-multirun summary (a Hydra callback) that names failed jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from addrepro.rundir.status import read_statuses


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
