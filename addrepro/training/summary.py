"""Hydra callbacks: the output folder is checked before any job, and the end-of-multirun summary names
failed jobs."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from addrepro.rundir.job import is_job_dir, make_folder
from addrepro.rundir.lock import LockError, check_free
from addrepro.rundir.status import read_statuses

SKIPPED: list[str] = []  # job folders a launcher did not run again: an earlier run of the sweep finished them


def note_skipped(job_name: str) -> None:
    SKIPPED.append(job_name)


class SweepSummary(Callback):
    """After a multirun: write ``sweep_summary.json``, print the failed jobs, exit non-zero if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        statuses = read_statuses(sweep_dir)
        for name in SKIPPED:
            if name in statuses:
                statuses[name]["skipped"] = "finished by an earlier run of this sweep"
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(statuses, indent=1))
        failed = {k: v for k, v in statuses.items() if v["status"] != "ok"}
        skipped = f" ({len(SKIPPED)} finished before, not run again)" if SKIPPED else ""
        print(
            f"addrepro: sweep {sweep_dir}: {len(statuses) - len(failed)}/{len(statuses)} jobs ok{skipped}",
            file=sys.stderr,
        )
        for job, status in failed.items():
            print(f"addrepro: job {job} {status['status']}: {status['message']}", file=sys.stderr)
        if failed:
            sys.exit(1)


class WritableOutput(Callback):
    """Before any job: the run or sweep folder must be writable, else one line and exit status 2
    (Hydra would stop with a traceback when it saves the job's configs there)."""

    created: Path | None = None  # the topmost folder a single run's check created (a refused run removes it)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir))
        try:  # a folder another process trains in: refused before Hydra overwrites its .hydra/ files
            check_free(folder.absolute())
        except LockError as e:
            print(f"addrepro: run folder error: {e}", file=sys.stderr)
            sys.exit(2)
        if not config.get("resume") and folder.is_dir() and any(folder.iterdir()):
            shown = ", ".join(sorted(p.name for p in folder.iterdir())[:3])
            hint = f", or resume={folder} to continue the run in it" if is_job_dir(folder) else ""
            print(
                f"addrepro: run folder error: hydra.run.dir={folder} already holds files ({shown}, …): give a new "
                f"folder{hint}",
                file=sys.stderr,
            )
            sys.exit(2)
        WritableOutput.created = self.check(folder)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        # A sweep folder is new, or one an earlier run of a sweep made (re-running a sweep continues it).
        if folder.is_dir() and any(folder.iterdir()) and not (folder / "multirun.yaml").is_file():
            shown = ", ".join(sorted(p.name for p in folder.iterdir())[:3])
            print(
                f"addrepro: run folder error: hydra.sweep.dir={folder} already holds files ({shown}, …) and is "
                "not a sweep folder: give a new folder",
                file=sys.stderr,
            )
            sys.exit(2)
        WritableOutput.created = self.check(folder)

    @staticmethod
    def check(folder: Path) -> Path | None:
        try:
            created = make_folder(folder)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", delete=True)  # noqa: SIM115
            probe.close()
        except OSError as e:
            print(f"addrepro: storage error: cannot write the output folder {folder}: {e.strerror}", file=sys.stderr)
            sys.exit(2)
        return created
