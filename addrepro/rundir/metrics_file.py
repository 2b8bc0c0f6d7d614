"""The metrics file of a job, ``<job>/csv/metrics.csv``, read back as numbers.

Rows are appended as the run goes (``rundir.csv_logger`` writes them); a kill during an append leaves
at most a torn last line without a newline, which readers drop.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path


class RunFileError(ValueError):
    """A file of a run folder that cannot be read as addrepro writes it; the message names the file."""


class MetricsFileError(RunFileError):
    """A metrics file that cannot be read as numbers; the message names the file, line and column."""


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a metrics file (``key -> text``, empty cells left out); a torn last line
    (no newline: the writer was killed mid-append) is dropped. A line with more or fewer cells than the
    header anywhere else was not written by a run: ``MetricsFileError`` names it."""
    if not Path(path).is_file():  # a folder, a device (/dev/zero never ends), a pipe
        raise MetricsFileError(f"{path} is not a regular file")
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise MetricsFileError(f"{path} is not a text file") from None
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    try:
        return _read_rows(reader, path, rows)
    except csv.Error as e:  # e.g. a cell beyond the csv module's field limit: not a run's file
        raise MetricsFileError(f"{path}, line {reader.line_num}: {e}") from None


def _read_rows(reader: csv.DictReader, path: Path, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    header = reader.fieldnames or []
    twice = next((k for i, k in enumerate(header) if k in header[:i]), None)
    if twice is not None:  # a run writes each key once; a second column would silently replace the first
        raise MetricsFileError(f"{path}, line 1: the column {twice!r} appears twice (not a file a run writes)")
    for row in reader:
        if None in row or None in row.values():  # cells beyond the header, or missing ones
            given = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
            raise MetricsFileError(
                f"{path}, line {reader.line_num}: {given} cells where the header has "
                f"{len(reader.fieldnames or [])} (a damaged line)"
            )
        rows.append({k: v for k, v in row.items() if v != ""})
    return rows


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
    for line, raw in enumerate(read_csv_rows(path), start=2):
        try:
            row = {k: float(v) for k, v in raw.items()}
        except (TypeError, ValueError):  # a foreign or damaged file: name the place
            bad = next((k, v) for k, v in raw.items() if not _is_float(v))
            raise MetricsFileError(f"{path}, line {line}: {bad[0]}={bad[1]!r} is not a number") from None
        if "step" in row:
            step = row["step"]
            if not (step.is_integer() and 0 <= step < 2**63):
                raise MetricsFileError(f"{path}, line {line}: step={raw['step']!r} is not a step (a whole number >= 0)")
            row["step"] = int(step)
            rows.append(row)
    return rows


def read_records(path: Path, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """A run file holding a JSON list of records (``spikes.json``, ``shelf_exits.json``); ``[]`` when
    there is none. A file that is not such a list — torn, foreign, a link to something else, records
    without ``fields`` of the given types — raises ``RunFileError`` naming it and what is wrong."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise RunFileError(f"{path} is not a regular file")
    try:
        records = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise RunFileError(f"{path} is not a JSON file as addrepro writes it ({str(e).splitlines()[0]})") from None
    if not isinstance(records, list):
        raise RunFileError(f"{path} holds {type(records).__name__}, not a list of records")
    for i, record in enumerate(records):
        bad = not isinstance(record, dict) or next(
            (k for k, kind in fields.items() if not isinstance(record.get(k), kind) or isinstance(record.get(k), bool)),
            None,
        )
        if bad:
            expected = ", ".join(fields)
            raise RunFileError(f"{path}: record {i} is not a record with {expected} ({str(record)[:60]})")
    return records
