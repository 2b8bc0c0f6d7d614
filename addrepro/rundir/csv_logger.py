"""Lightning's CSV metrics file, appended as the run goes and continued (not wiped) on resume.

Lightning's writer deletes an existing ``metrics.csv`` when it starts and rewrites it whole on every
save, which costs time that grows with the run. This writer appends the new rows at each save and
rewrites the file (atomically, through a temporary file) only when the header must change — a key
appears for the first time — or a resumed run starts. Every row ends with a newline, so a kill during
an append leaves at most a torn last line without one; readers drop it, and a resumed run drops the
rows from its checkpoint's step on.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.metrics_file import read_csv_rows


class AtomicExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None = None) -> None:
        self.metrics: list[dict] = []
        self.metrics_keys: list[str] = []
        self.log_dir = log_dir
        self.metrics_file_path = str(Path(log_dir) / self.NAME_METRICS_FILE)
        self.hparams: dict = {}
        self.rows: list[dict] = []  # every row, for the rare rewrite
        self.written_keys: list[str] | None = None  # the file's header; None: the file must be (re)written
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(self.metrics_file_path)
        if keep_before_step is not None and path.exists():
            self.rows = [row for row in read_csv_rows(path) if "step" in row and int(row["step"]) < keep_before_step]
            self.metrics_keys = sorted(set().union(*self.rows)) if self.rows else []

    def save(self) -> None:
        if not self.metrics:
            return
        new, self.metrics = self.metrics, []
        self.rows.extend(new)
        self.metrics_keys = sorted(set(self.metrics_keys).union(*new))
        path = Path(self.metrics_file_path)
        if self.metrics_keys != self.written_keys:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))
            self.written_keys = list(self.metrics_keys)
            return
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.metrics_keys, lineterminator="\n").writerows(new)
        with path.open("a", newline="") as f:  # one write of whole lines: a kill tears the last one at most
            f.write(buffer.getvalue())


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
