"""Markdown tables comparing several runs of a preset with its published reference curve.

    python docs/compare_seeds.py <job folder> [<job folder> ...]

Prints the per-place train loss (mean over step ± 25, then mean and range over the runs) at the
reference's steps, and the step at which each place's smoothed loss first falls below half of
its marginal entropy (log base; log 2 for the carry-out) — the middle of its main descent — per run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from addrepro.reports.job import load_reference, place_atlas
from addrepro.rundir.job import job_config
from addrepro.rundir.metrics_file import load_rows
from addrepro.task.spec import TaskSpec


def window_mean(rows: list[dict], key: str, step: int, window: int = 25) -> float:
    near = [r[key] for r in rows if key in r and abs(r["step"] - step) <= window]
    return sum(near) / len(near) if near else math.nan


def descent_step(rows: list[dict], key: str, level: float, smooth: int = 5) -> int | None:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    steps = np.array([s for s, _ in pts])
    values = np.convolve([v for _, v in pts], np.ones(smooth) / smooth, mode="same")
    below = np.nonzero(values[smooth:] < level)[0]
    return int(steps[smooth + below[0]]) if len(below) else None


def main(folders: list[str]) -> None:
    jobs = [Path(f) for f in folders]
    cfg = job_config(jobs[0])
    spec, reference = TaskSpec.from_config(cfg.data), load_reference(cfg.get("reference"))
    runs = [load_rows(j) for j in jobs]
    places = list(range(spec.n_digits, -1, -1))
    print("| step | " + " | ".join(f"place {j}: runs / published" for j in places) + " |")
    print("|" + "---|" * (len(places) + 1))
    for i, step in enumerate(reference["steps"]):
        cells = []
        for j in places:
            vals = [window_mean(rows, f"train/loss/place_{j}", step) for rows in runs]
            published = reference["places"][str(j)][i]
            cells.append(f"{np.mean(vals):.3g} ({min(vals):.2g}–{max(vals):.2g}) / {published:.3g}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    print()
    marginal = {j: levels["marginal"] for j, levels in place_atlas(spec).items()}
    print("| run | " + " | ".join(f"place {j}" for j in places) + " | order of descents |")
    print("|" + "---|" * (len(places) + 2))
    for job, rows in zip(jobs, runs, strict=True):
        steps = {j: descent_step(rows, f"train/loss/place_{j}", 0.5 * marginal[j]) for j in places}
        order = sorted((s, j) for j, s in steps.items() if s is not None)
        shown = " | ".join(str(steps[j]) if steps[j] is not None else "—" for j in places)
        print(f"| {job} | {shown} | {', '.join(str(j) for _, j in order)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
