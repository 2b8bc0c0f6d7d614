"""``python -m addrepro.report <job folder>``: redraw a run's plots from its saved files alone.

Reads ``csv/metrics.csv``, ``confusion.npz`` and ``.hydra/config.yaml``; needs no W&B. Given a sweep
folder instead (job folders with ``.hydra/`` inside), compares its jobs (``addrepro.sweep_report``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from addrepro.data import TaskSpec

REFERENCE_DIR = Path(__file__).parent / "reference"


def load_rows(job_dir: Path) -> list[dict]:
    """Metric rows of a job (``step`` plus the keys logged at that step) from its CSV file."""
    path = Path(job_dir) / "csv" / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"no metrics file {path} (was the run started with logger.csv=false?)")
    rows = []
    with path.open() as f:
        for raw in csv.DictReader(f):
            row = {k: float(v) for k, v in raw.items() if v not in ("", None)}
            if "step" in row:
                row["step"] = int(row["step"])
                rows.append(row)
    return rows


def job_config(job_dir: Path):  # noqa: ANN201 - DictConfig
    path = Path(job_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{job_dir} is not a job folder: no .hydra/config.yaml")
    return OmegaConf.load(path)


def spec_of(cfg) -> TaskSpec:  # noqa: ANN001
    d = cfg.data
    return TaskSpec(n_digits=d.n_digits, base=d.base, order=d.order, task=d.task)


def load_reference(name: str | None) -> dict | None:
    """A published per-place loss curve shipped with addrepro (see ``addrepro/reference``)."""
    if not name:
        return None
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text())


def save_confusion(job_dir: Path, confusions: list) -> Path | None:
    """Store ``(step, (n+1, base, base))`` pairs of one model as ``confusion.npz``."""
    if not confusions:
        return None
    from addrepro.checkpoints import atomic_write

    steps = np.array([s for s, _ in confusions])
    mats = np.stack([c.numpy() for _, c in confusions])
    path = Path(job_dir) / "confusion.npz"
    atomic_write(path, lambda f: np.savez_compressed(f, steps=steps, confusion=mats))
    return path


def load_confusion(job_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = Path(job_dir) / "confusion.npz"
    if not path.exists():
        return None
    data = np.load(path)
    return data["steps"], data["confusion"]


def reference_table(rows: list[dict], reference: dict, spec: TaskSpec, window: int = 25) -> str:
    """Markdown table of the run's per-place train loss (mean over step ± window) against the reference."""
    places = sorted((int(p) for p in reference["places"]), reverse=True)
    head = "| step | " + " | ".join(f"place {j} run / ref" for j in places) + " |"
    lines = [head, "|" + "---|" * (len(places) + 1)]
    for i, step in enumerate(reference["steps"]):
        cells = []
        for j in places:
            near = [r[f"train/loss/place_{j}"] for r in rows
                    if f"train/loss/place_{j}" in r and abs(r["step"] - step) <= window]
            run = sum(near) / len(near) if near else math.nan
            cells.append(f"{run:.3g} / {reference['places'][str(j)][i]:.3g}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_job(job_dir: Path, rows: list[dict] | None = None, confusion=None) -> list[Path]:  # noqa: ANN001
    """All plots of one job, plus ``reference_comparison.md`` when the run has a reference curve."""
    from addrepro.shelf_plots import draw_all

    job_dir = Path(job_dir)
    cfg = job_config(job_dir)
    spec = spec_of(cfg)
    rows = load_rows(job_dir) if rows is None else rows
    confusion = load_confusion(job_dir) if confusion is None else confusion
    reference = load_reference(cfg.get("reference"))
    paths = draw_all(job_dir, rows, spec, reference=reference, confusion=confusion)
    if reference is not None:
        table = job_dir / "reference_comparison.md"
        table.write_text(f"{reference['label']}\n\n{reference_table(rows, reference, spec)}\n")
        paths.append(table)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m addrepro.report <job folder | sweep folder>", file=sys.stderr)
        return 2
    try:
        from addrepro.sweep_report import draw_sweep, is_sweep_dir

        folder = Path(argv[0])
        paths = draw_sweep(folder) if is_sweep_dir(folder) else draw_job(folder)
    except FileNotFoundError as e:
        print(f"addrepro.report: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
