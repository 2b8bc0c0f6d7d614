"""Round-trip tests for addrepro.wandb_offline using REAL offline wandb runs."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import pytest

from addrepro import wandb_offline as wo
from addrepro.wandb_offline import WandbLogError, WandbLogWarning, find_runs, iter_records, read_run

wandb = pytest.importorskip("wandb")

N_ROWS = 300
LONG = "0123456789abcdef" * 6000  # ~96 KB: one record spanning FIRST/MIDDLE/LAST chunks
CONFIG = {
    "model": {"d_model": 64, "n_layers": 2, "act": "gelu"},
    "optim": {"lr": 3e-4, "betas": [0.9, 0.98], "sched": {"warmup": 100}},
    "seed": 7,
    "n_digits": 5,
}


def _loss(i: int, place: int) -> float:
    return 1.0 / (i + 1 + place)


def _make_run(root: Path, *, name: str, group: str, exit_code: int | None, big: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project="addrepro-test",
        group=group,
        name=name,
        job_type="train",
        config=CONFIG,
        dir=str(root),
        mode="offline",
    )
    for i in range(N_ROWS):
        row = {f"train/loss/place_{p}": _loss(i, p) for p in range(3)}
        row["train/acc"] = i / N_ROWS
        if i % 10 == 0:
            row["val/loss"] = 2.0 / (i + 1)
        if big and i in (5, 150):
            row["blob"] = LONG + str(i)
        run.log(row)
    run.config.update({"late": {"added": True}})
    run.summary["best/val_loss"] = 0.125
    run.summary["final"] = {"acc": 0.99}
    if exit_code is None:
        run.finish()
    else:
        run.finish(exit_code=exit_code)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("wandb_runs")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(base), WANDB_SILENT="true", WANDB_CONSOLE="off")
    try:
        out = {
            "ok": _make_run(base / "ok", name="run-ok", group="grp-a", exit_code=None),
            "fail": _make_run(base / "fail", name="run-fail", group="grp-b", exit_code=1),
            "big": _make_run(base / "big", name="run-big", group="grp-a", exit_code=None, big=True),
        }
    finally:
        wandb.teardown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def _the_file(root: Path) -> Path:
    files = find_runs(root)
    assert len(files) == 1, files
    return files[0]


def test_round_trip(runs):
    run = read_run(runs["ok"])
    assert run.path == _the_file(runs["ok"])
    assert run.path.name == f"run-{run.run_id}.wandb"
    assert run.project == "addrepro-test"
    assert run.name == "run-ok"
    assert run.group == "grp-a"
    assert run.job_type == "train"
    assert run.exit_code == 0

    # config: nested, merged with the later update, no internal _wandb key
    assert run.config == {**CONFIG, "late": {"added": True}}
    assert "_wandb" not in run.config

    # history
    assert len(run.history) == N_ROWS
    assert [r["_step"] for r in run.history] == list(range(N_ROWS))
    for key in ("train/loss/place_0", "train/loss/place_2", "train/acc", "val/loss", "_step"):
        assert key in run.history_keys
    for i, row in enumerate(run.history):
        assert row["train/loss/place_1"] == _loss(i, 1)
        assert ("val/loss" in row) == (i % 10 == 0)
    steps, vals = run.series("train/loss/place_0")
    assert steps == list(range(N_ROWS))
    assert vals == [_loss(i, 0) for i in range(N_ROWS)]
    assert all(isinstance(v, float) for v in vals)
    vsteps, vvals = run.series("val/loss")
    assert vsteps == list(range(0, N_ROWS, 10))
    assert vvals == [2.0 / (i + 1) for i in vsteps]
    assert run.series("no/such/key") == ([], [])

    # summary: explicit values + last history values, nested, no _wandb
    assert run.summary["best/val_loss"] == 0.125
    assert run.summary["final"] == {"acc": 0.99}
    assert run.summary["train/loss/place_0"] == _loss(N_ROWS - 1, 0)
    assert run.summary["_step"] == N_ROWS - 1
    assert "_wandb" not in run.summary


def test_failed_run_exit_code(runs):
    run = read_run(runs["fail"])
    assert run.exit_code == 1
    assert run.name == "run-fail"
    assert run.group == "grp-b"
    assert len(run.history) == N_ROWS


def test_multi_block_reassembly(runs):
    path = _the_file(runs["big"])
    data = path.read_bytes()
    assert len(data) > 4 * wo.BLOCK_LEN
    chunk_types = {ctype for _, ctype, _ in wo._iter_chunks(data, path, strict=True)}
    assert {wo.FULL, wo.FIRST, wo.MIDDLE, wo.LAST} <= chunk_types

    run = read_run(path, strict=True)
    assert run.exit_code == 0
    assert len(run.history) == N_ROWS
    steps, blobs = run.series("blob")
    assert steps == [5, 150]
    assert blobs == [LONG + "5", LONG + "150"]
    assert run.series("train/loss/place_2")[1] == [_loss(i, 2) for i in range(N_ROWS)]


def test_iter_records_kinds(runs):
    kinds = [r.WhichOneof("record_type") for r in iter_records(_the_file(runs["ok"]), strict=True)]
    assert kinds.count("history") == N_ROWS
    assert kinds.count("run") == 1
    assert kinds.count("exit") == 1
    assert kinds[0] == "header"


def test_truncated_file_reads_prefix(runs, tmp_path):
    src = _the_file(runs["big"])
    full = read_run(src)
    data = src.read_bytes()
    cut = tmp_path / src.name
    cut.write_bytes(data[: len(data) // 2 + 3])  # cut mid-chunk

    with pytest.warns(WandbLogWarning, match="truncated|ends inside"):
        part = read_run(cut)
    assert part.run_id == full.run_id
    assert part.name == "run-big"
    assert part.exit_code is None  # never saw the exit record
    assert 0 < len(part.history) < len(full.history)
    assert part.history == full.history[: len(part.history)]
    assert part.config["model"] == CONFIG["model"]

    with pytest.raises(WandbLogError):
        read_run(cut, strict=True)


def test_corrupt_chunk_is_skipped(runs, tmp_path):
    src = _the_file(runs["ok"])
    data = bytearray(src.read_bytes())
    assert len(data) > 3 * wo.BLOCK_LEN
    # flip a payload byte of the first chunk in the second block
    pos = wo.BLOCK_LEN + wo.HEADER_LEN + 2
    data[pos] ^= 0xFF
    bad = tmp_path / src.name
    bad.write_bytes(bytes(data))

    with pytest.warns(WandbLogWarning, match="CRC mismatch"):
        run = read_run(bad)
    full = read_run(src)
    assert run.exit_code == 0  # records after the damaged block still read
    assert 0 < len(run.history) < len(full.history)
    assert {r["_step"] for r in run.history} <= {r["_step"] for r in full.history}
    with pytest.raises(WandbLogError, match="CRC mismatch"):
        list(iter_records(bad, strict=True))


def test_not_a_wandb_file(tmp_path):
    p = tmp_path / "x.wandb"
    p.write_bytes(b"hello world, not wandb")
    with pytest.raises(WandbLogError, match="not a W&B transaction log"):
        list(iter_records(p))


def test_path_resolution(runs, tmp_path):
    f = _the_file(runs["ok"])
    assert read_run(f).path == f  # the .wandb file
    assert read_run(f.parent).path == f  # the offline-run-* folder
    assert read_run(runs["ok"]).path == f  # folder containing wandb/offline-run-*
    assert read_run(runs["ok"] / "wandb").path == f

    # several runs below one folder -> clear error; zero -> clear error
    both = tmp_path / "both"
    for key in ("ok", "fail"):
        shutil.copytree(runs[key], both / key, symlinks=True)
    with pytest.raises(WandbLogError, match="found 2 wandb/offline-run-"):
        read_run(both)
    with pytest.raises(WandbLogError, match="no wandb/offline-run-"):
        read_run(_empty(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "missing")

    found = find_runs(both)
    assert len(found) == 2 and found == sorted(found)
    assert find_runs(both) == sorted(find_runs(both / "ok") + find_runs(both / "fail"))


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    (d / "sub").mkdir(parents=True)
    return d


def test_nan_and_nested_history(tmp_path):
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    try:
        run = wandb.init(project="p", config={"a": {"b": 1}}, dir=str(tmp_path))
        run.log({"x": float("nan"), "nest": {"u": 1, "v": {"w": 2}}}, step=3)
        run.log({"x": 1.5}, step=8)
        run.finish()
    finally:
        wandb.teardown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with warnings.catch_warnings():
        warnings.simplefilter("error", WandbLogWarning)
        r = read_run(tmp_path)
    assert r.name == ""  # no display name given offline
    steps, xs = r.series("x")
    assert steps == [3, 8]
    assert math.isnan(xs[0]) and xs[1] == 1.5
    assert r.history[0]["nest"] == {"u": 1, "v": {"w": 2}}
    assert r.series("nest.v.w") == ([3], [2.0])
