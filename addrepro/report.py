"""``python -m addrepro.report <job folder>``: redraw a run's plots from its saved files alone.

Reads ``csv/metrics.csv``, ``confusion.npz`` and ``.hydra/config.yaml``; needs no W&B. Given a sweep
folder instead (job folders with ``.hydra/`` inside), compares its jobs (``addrepro.reports.sweep``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from addrepro.reports.job import draw_job
from addrepro.reports.sweep import draw_sweep, is_sweep_dir
from addrepro.rundir.metrics_file import RunFileError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m addrepro.report <job folder | sweep folder>", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not folder.exists():
        print(f"addrepro.report: {folder} does not exist", file=sys.stderr)
        return 2
    if not folder.is_dir():
        print(f"addrepro.report: {folder} is not a folder (give a job folder or a sweep folder)", file=sys.stderr)
        return 2
    try:
        if is_sweep_dir(folder):
            paths = draw_sweep(folder, warn=lambda line: print(f"addrepro.report: {line}", file=sys.stderr))
        else:
            paths = draw_job(folder)
    except (FileNotFoundError, RunFileError) as e:
        print(f"addrepro.report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only copy of a run: the reports are written beside what they read
        print(f"addrepro.report: {e} (the reports are written into the folder they are drawn from)", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
