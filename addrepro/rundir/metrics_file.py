"""Lightning's CSV metrics file, written atomically and continued (not wiped) on resume.

Lightning's writer deletes an existing ``metrics.csv`` when it starts and appends in place, so a
kill can leave a torn last line and a resumed run would lose its history. This writer keeps every
row in memory and replaces the whole file through a temporary file on each save.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from addrepro.rundir.atomic import atomic_write


class AtomicExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None = None) -> None:
        self.metrics: list[dict] = []
        self.metrics_keys: list[str] = []
        self.log_dir = log_dir
        self.metrics_file_path = str(Path(log_dir) / self.NAME_METRICS_FILE)
        self.hparams: dict = {}
        self.rows: list[dict] = []
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(self.metrics_file_path)
        if keep_before_step is not None and path.exists():
            with path.open(newline="") as f:
                self.rows = [
                    {k: v for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)
                    if row.get("step") not in (None, "") and int(row["step"]) < keep_before_step
                ]
            self.metrics_keys = sorted(set().union(*self.rows)) if self.rows else []

    def save(self) -> None:
        if not self.metrics:
            return
        self.rows.extend(self.metrics)
        self.metrics = []
        self.metrics_keys = sorted(set(self.metrics_keys).union(*self.rows))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(Path(self.metrics_file_path), lambda f: f.write(buffer.getvalue().encode()))


class MetricsCSVLogger(CSVLogger):
    """``<job>/csv/metrics.csv``: one row per logging call, a ``step`` column and one column per key."""

    def __init__(self, job_dir: Path, keep_before_step: int | None = None) -> None:
        super().__init__(save_dir=str(job_dir), name="csv", version="")
        self._keep_before_step = keep_before_step

    @property
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            self._experiment = AtomicExperimentWriter(self.log_dir, self._keep_before_step)
        return self._experiment

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        pass  # the resolved config is in .hydra/config.yaml


class MetricsFileError(ValueError):
    """A metrics file that cannot be read as numbers; the message names the file, line and column."""


def _is_float(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def load_rows(job_dir: Path) -> list[dict]:
    """Metric rows of a job (``step`` plus the keys logged at that step) from its CSV file."""
    path = Path(job_dir) / "csv" / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"no metrics file {path} (was the run started with logger.csv=false?)")
    rows = []
    with path.open() as f:
        for line, raw in enumerate(csv.DictReader(f), start=2):
            try:
                row = {k: float(v) for k, v in raw.items() if v not in ("", None)}
            except (TypeError, ValueError):  # a foreign or damaged file: name the place
                bad = next((k, v) for k, v in raw.items() if v not in ("", None) and not _is_float(v))
                raise MetricsFileError(f"{path}, line {line}: {bad[0]}={bad[1]!r} is not a number") from None
            if "step" in row:
                row["step"] = int(row["step"])
                rows.append(row)
    return rows
