"""Read W&B offline runs (``.wandb`` files) back without the W&B server.

Recent ``wandb`` releases (>= 0.2x, the Go ``wandb-core`` backend) no longer ship a
Python reader for the run transaction log, so this module implements one.

File format (verified against wandb 0.31 and the former
``wandb/sdk/internal/datastore.py``), a LevelDB-style log:

* A 7-byte file header: ``b":W&B"`` + magic ``0xBEE1`` (uint16, little endian) +
  version ``0`` (uint8), i.e. ``3a 57 26 42 e1 be 00``.
* Then the data, laid out in 32 KiB blocks (the file header counts towards the first
  block). Each block holds chunks with a 7-byte header
  ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8)`` followed by ``length``
  payload bytes. Types: FULL=1, FIRST=2, MIDDLE=3, LAST=4. When fewer than 7 bytes
  remain in a block they are zero padding and the next chunk starts at the next block.
* The checksum is the standard (IEEE, ``zlib``) CRC-32 of ``type byte + payload``
  (**not** the CRC-32C LevelDB itself uses).
* Each reassembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Corruption handling: :func:`iter_records` (and :func:`read_run`) by default read as
much as possible. A chunk with a bad CRC or impossible header makes the reader emit a
:class:`WandbLogWarning`, drop the rest of that 32 KiB block (and any partially
assembled record) and resume at the next block; a file truncated mid-chunk/mid-record
(e.g. a crashed or still-running job) yields the intact prefix and warns once. Pass
``strict=True`` to raise :class:`WandbLogError` instead. A bad *file header* (not a
``.wandb`` file, unknown format version) always raises :class:`WandbLogError`.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from wandb.proto import wandb_internal_pb2

__all__ = [
    "OfflineRun",
    "WandbLogError",
    "WandbLogWarning",
    "find_runs",
    "iter_records",
    "read_run",
]

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
HEADER_LEN = 7
BLOCK_LEN = 32 * 1024

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_NAMES = {FULL: "FULL", FIRST: "FIRST", MIDDLE: "MIDDLE", LAST: "LAST"}
# CRC of the type byte, used as the running seed for the payload CRC.
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in _TYPE_NAMES}

_INTERNAL_KEY = "_wandb"


class WandbLogError(ValueError):
    """The ``.wandb`` file is not a valid/readable W&B transaction log."""


class WandbLogWarning(UserWarning):
    """Part of a ``.wandb`` file was corrupt or truncated and had to be skipped."""


# --------------------------------------------------------------------------- low level


def _problem(msg: str, strict: bool) -> None:
    if strict:
        raise WandbLogError(msg)
    warnings.warn(msg, WandbLogWarning, stacklevel=4)


def _read_file_header(data: bytes, path: Path) -> None:
    if len(data) < HEADER_LEN:
        raise WandbLogError(f"{path}: too short ({len(data)} bytes) to be a .wandb file")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise WandbLogError(
            f"{path}: not a W&B transaction log (header {data[:HEADER_LEN].hex()}, "
            f"expected {FILE_HEADER.pack(HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION).hex()})"
        )
    if version != HEADER_VERSION:
        raise WandbLogError(f"{path}: unsupported .wandb format version {version} (expected {HEADER_VERSION})")


def _iter_chunks(data: bytes, path: Path, strict: bool = False) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(offset, type, payload)`` for every valid chunk after the file header.

    Corrupt chunks are reported (warning or :class:`WandbLogError`) and the rest of
    their block is skipped.
    """
    pos = HEADER_LEN
    size = len(data)
    while pos < size:
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < HEADER_LEN:  # block trailer (zero padding)
            pos += left_in_block
            continue
        if size - pos < HEADER_LEN:
            _problem(f"{path}: truncated chunk header at offset {pos} (file ends)", strict)
            return
        crc, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        next_block = pos + left_in_block
        if crc == 0 and length == 0 and ctype == 0:
            # Zero-filled (preallocated / unwritten) space: nothing more in this block.
            pos = next_block
            continue
        if ctype not in _TYPE_NAMES or HEADER_LEN + length > left_in_block:
            _problem(
                f"{path}: corrupt chunk header at offset {pos} (type={ctype}, length={length}); "
                f"skipping to offset {next_block}",
                strict,
            )
            pos = next_block
            yield pos, 0, b""  # continuity broken: drop any partial record
            continue
        start = pos + HEADER_LEN
        end = start + length
        if end > size:
            _problem(
                f"{path}: truncated {_TYPE_NAMES[ctype]} chunk at offset {pos} "
                f"(needs {length} bytes, {size - start} left)",
                strict,
            )
            return
        payload = data[start:end]
        if zlib.crc32(payload, _TYPE_CRC[ctype]) != crc:
            _problem(
                f"{path}: CRC mismatch in {_TYPE_NAMES[ctype]} chunk at offset {pos}; skipping to offset {next_block}",
                strict,
            )
            pos = next_block
            yield pos, 0, b""  # continuity broken: drop any partial record
            continue
        yield pos, ctype, payload
        pos = end


def _iter_payloads(path: Path, strict: bool = False) -> Iterator[tuple[int, bytes]]:
    """Reassemble chunks into record payloads, yielding ``(offset, payload)``."""
    data = path.read_bytes()
    _read_file_header(data, path)
    parts: list[bytes] = []
    start: int | None = None
    resyncing = False  # after reported damage, silently drop the damaged record's tail chunks
    for offset, ctype, payload in _iter_chunks(data, path, strict):
        if ctype == 0:  # corruption reported by _iter_chunks: drop partial record
            parts, start, resyncing = [], None, True
            continue
        if ctype in (FULL, FIRST):
            resyncing = False
        if ctype == FULL:
            if start is not None:
                _problem(f"{path}: record at offset {start} is missing its LAST chunk; dropped", strict)
                parts, start = [], None
            yield offset, payload
        elif ctype == FIRST:
            if start is not None:
                _problem(f"{path}: record at offset {start} is missing its LAST chunk; dropped", strict)
            parts, start = [payload], offset
        else:  # MIDDLE / LAST
            if start is None:
                if resyncing:
                    continue
                _problem(
                    f"{path}: orphan {_TYPE_NAMES[ctype]} chunk at offset {offset} (no FIRST chunk before it); skipped",
                    strict,
                )
                continue
            parts.append(payload)
            if ctype == LAST:
                yield start, b"".join(parts)
                parts, start = [], None
    if start is not None:
        _problem(f"{path}: file ends inside a multi-chunk record starting at offset {start}", strict)


def iter_records(path: str | Path, *, strict: bool = False) -> Iterator[wandb_internal_pb2.Record]:
    """Yield every ``Record`` protobuf stored in a ``.wandb`` file, in file order.

    With ``strict=False`` (default) corrupt chunks / undecodable records are skipped
    with a :class:`WandbLogWarning` and a truncated tail ends the iteration after the
    last intact record. With ``strict=True`` these raise :class:`WandbLogError`.
    """
    # wandb's protobuf modules load only when a .wandb file is actually read.
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    from wandb.proto import wandb_internal_pb2  # noqa: PLC0415

    path = Path(path)
    for offset, payload in _iter_payloads(path, strict):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            _problem(f"{path}: undecodable record at offset {offset}: {exc}; skipped", strict)
            continue
        yield record


# --------------------------------------------------------------------------- run model


def _decode(value_json: str) -> Any:
    if value_json == "":
        return None
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def _item_path(item: Any) -> list[str]:
    """Key path of a Config/Summary/History item (``nested_key`` wins over ``key``)."""
    if len(item.nested_key):
        return list(item.nested_key)
    return [item.key]


def _set_path(target: dict, path: list[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _del_path(target: dict, path: list[str]) -> None:
    node: Any = target
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _apply_updates(target: dict, updates: Any, removes: Any = ()) -> None:
    for item in updates:
        path = _item_path(item)
        if path[0] == _INTERNAL_KEY:
            continue
        _set_path(target, path, _decode(item.value_json))
    for item in removes:
        path = _item_path(item)
        if path[0] != _INTERNAL_KEY:
            _del_path(target, path)


_MISSING = object()


def _lookup(row: dict, key: str) -> Any:
    """``row[key]``; falls back to a dotted path into nested values (``"a.b"``)."""
    if key in row:
        return row[key]
    if "." in key:
        node: Any = row
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node
    return _MISSING


@dataclass
class OfflineRun:
    """Contents of one offline W&B run, reconstructed from its ``.wandb`` file(s).

    ``config``/``summary`` are nested dicts with wandb's internal ``_wandb`` key
    stripped; later ``config``/``summary`` records override earlier values at the
    same key path (a top-level ``run.config.update({"x": {...}})`` replaces ``x``, as
    in wandb). ``history`` has one dict per logged row (values JSON-decoded, nested
    dicts logged by the user are re-nested, ``_step``/``_runtime``/``_timestamp``
    included). ``name``/``group``/``job_type`` are ``""`` when not set.
    """

    path: Path
    run_id: str
    project: str
    name: str
    group: str
    job_type: str
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None
    parts: list[Path] = field(default_factory=list)  # the .wandb files read, in start order

    @property
    def history_keys(self) -> set[str]:
        """All top-level keys appearing in any history row."""
        keys: set[str] = set()
        for row in self.history:
            keys.update(row)
        return keys

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` over the history rows that contain ``key``.

        ``key`` is a top-level history key (slashes are part of the key, e.g.
        ``"train/loss/place_0"``); if absent, a dotted path into nested logged dicts
        (``"a.b"``) is tried. Numeric values are returned as floats (NaN/inf kept);
        non-numeric values are returned unchanged.
        """
        steps: list[int] = []
        values: list[Any] = []
        for row in self.history:
            value = _lookup(row, key)
            if value is _MISSING:
                continue
            if isinstance(value, bool):
                value = float(value)
            elif isinstance(value, int | float):
                value = float(value)
            steps.append(int(row["_step"]) if "_step" in row else len(steps))
            values.append(value)
        return steps, values


def _history_row(history: Any) -> dict:
    row: dict = {}
    for item in history.item:
        path = _item_path(item)
        if path[0] == _INTERNAL_KEY:
            continue
        _set_path(row, path, _decode(item.value_json))
    if "_step" not in row and history.HasField("step"):
        row["_step"] = history.step.num
    return row


def _resolve_wandb_files(path: Path) -> list[Path]:
    """The ``.wandb`` file(s) of the run at ``path``: several only for one run resumed in new processes."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise WandbLogError(f"{path}: not a file or directory")

    direct = sorted(p for p in path.glob("*.wandb") if p.is_file())
    if len(direct) == 1:
        return direct
    if len(direct) > 1:
        raise WandbLogError(
            f"{path}: contains {len(direct)} .wandb files, expected one: " + ", ".join(p.name for p in direct)
        )

    # Search recursively for wandb/offline-run-* run folders (not following symlinks,
    # so wandb's latest-run link does not produce duplicates).
    run_dirs: list[Path] = []
    for dirpath, dirnames, _ in os.walk(path):
        here = Path(dirpath)
        for d in dirnames:
            if d.startswith("offline-run-") and here.name == "wandb":
                run_dirs.append(here / d)
    # offline-run-<YYYYMMDD_HHMMSS>-<run id>: name order is start order
    run_dirs.sort(key=lambda d: (d.name, d.stat().st_mtime))
    if not run_dirs:
        raise WandbLogError(f"{path}: no wandb/offline-run-* folder found (searched recursively)")
    if len({d.name.rsplit("-", 1)[-1] for d in run_dirs}) > 1:
        listing = "\n  ".join(str(d) for d in run_dirs)
        raise WandbLogError(
            f"{path}: found {len(run_dirs)} wandb/offline-run-* folders; pass one of them:\n  {listing}"
        )
    files = []
    for run_dir in run_dirs:
        found = sorted(p for p in run_dir.glob("*.wandb") if p.is_file())
        if len(found) != 1:
            raise WandbLogError(f"{run_dir}: expected exactly one .wandb file, found {len(found)}")
        files.append(found[0])
    return files


def read_run(path: str | Path, *, strict: bool = False) -> OfflineRun:
    """Read an offline run.

    ``path`` may be a ``.wandb`` file, a run folder containing one ``*.wandb`` file
    (``offline-run-*/``), or any folder containing ``wandb/offline-run-*`` folders of
    one run below it: a run resumed in a new process (same id) writes one folder per
    process, and they are read as one run, in start order — a later part replaces
    the earlier parts' rows from its first step on (it restarted from a checkpoint),
    and its config, summary, name and exit code win. ``strict`` is passed to
    :func:`iter_records`; in the default lenient mode a truncated file gives the
    intact prefix (``exit_code`` is then ``None`` unless the exit record survived).
    """
    parts = [_read_one(f, strict) for f in _resolve_wandb_files(Path(path))]
    run = parts[0]
    for later in parts[1:]:
        run = _continued(run, later)
    return run


def _read_one(wandb_file: Path, strict: bool) -> OfflineRun:
    run = OfflineRun(path=wandb_file, run_id="", project="", name="", group="", job_type="", parts=[wandb_file])
    for record in iter_records(wandb_file, strict=strict):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_history_row(record.history))
        elif kind == "summary":
            _apply_updates(run.summary, record.summary.update, record.summary.remove)
        elif kind == "config":
            _apply_updates(run.config, record.config.update, record.config.remove)
        elif kind == "run":
            r = record.run
            run.run_id = r.run_id or run.run_id
            run.project = r.project or run.project
            run.name = r.display_name or run.name
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            run.tags = list(r.tags) or run.tags
            _apply_updates(run.config, r.config.update, r.config.remove)
            _apply_updates(run.summary, r.summary.update, r.summary.remove)
        elif kind == "exit":
            run.exit_code = int(record.exit.exit_code)
    if not run.run_id:
        # No run record survived: fall back to the file name (run-<id>.wandb).
        stem = wandb_file.stem
        run.run_id = stem[4:] if stem.startswith("run-") else stem
    return run


STEP_KEY = "trainer/global_step"


def _continued(earlier: OfflineRun, later: OfflineRun) -> OfflineRun:
    """``earlier`` continued by ``later``, a new process of the same run resumed from a checkpoint.

    Rows are placed by their training step (``trainer/global_step``), not wandb's ``_step``, which
    restarts in every offline process. Rows without a training step (plots and tables logged at the
    end of a process) belong to the end of their part: an earlier part's are dropped when the later
    part trained on, as are its rows from the step the later part resumed at.
    """
    stepped = [r[STEP_KEY] for r in later.history if STEP_KEY in r]
    resumed_at = min(stepped, default=float("inf"))
    kept = [r for r in earlier.history if (r[STEP_KEY] < resumed_at if STEP_KEY in r else not stepped)]
    return OfflineRun(
        path=later.path,
        run_id=later.run_id or earlier.run_id,
        project=later.project or earlier.project,
        name=later.name or earlier.name,
        group=later.group or earlier.group,
        job_type=later.job_type or earlier.job_type,
        tags=later.tags or earlier.tags,
        config={**earlier.config, **later.config},
        history=kept + later.history,
        summary={**earlier.summary, **later.summary},
        exit_code=later.exit_code,
        parts=earlier.parts + later.parts,
    )


def find_runs(root: str | Path) -> list[Path]:
    """Every ``.wandb`` file under ``root`` (recursively, symlinks not followed), sorted."""
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix == ".wandb" else []
    found = [
        Path(dirpath) / name for dirpath, _, filenames in os.walk(root) for name in filenames if name.endswith(".wandb")
    ]
    return sorted(found)
