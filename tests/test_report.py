"""Tests for ``python -m addrepro.report``: a real short job redrawn from its files, and hand-written jobs."""

import csv
import json
import math
import shutil
import struct

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from addrepro.report import main
from addrepro.reports.job import REFERENCE_DIR, draw_job, reference_table
from addrepro.rundir.metrics_file import load_rows
from addrepro.task.spec import TaskSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("place_loss.png", "naive_sum.png", "carry_conditioned.png", "confusion.png")
TRAIN_ARGS = [
    "data.n_digits=2",
    "trainer.max_steps=30",
    "logger=csv",
    "trainer.progress_bar=false",
    "trainer.val_every_n_steps=10",
    "metrics.every_n_steps=10",
    "metrics.carry_set_size=8",
    "metrics.chain_set_size=4",
    "data.val_size=128",
    "trainer.plots=false",  # the report draws them; skipping them here keeps the module fast
]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One real 30-step job (CSV logger, W&B offline) shared by the module; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("report_job")
    proc = run_cli("addrepro.train", [*TRAIN_ARGS, "hydra.run.dir=job"], root, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "job"


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    assert data[-8:-4] == b"IEND", path  # complete file
    return struct.unpack(">II", data[16:24])


def test_report_redraws_the_plots_of_a_job(job, tmp_path):
    copy = tmp_path / "job"
    shutil.copytree(job, copy)
    for name in PLOTS:
        (copy / name).unlink(missing_ok=True)
    assert (copy / "confusion.npz").exists() and (copy / "csv" / "metrics.csv").exists()
    proc = run_cli("addrepro.report", [str(copy)], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.split()
    for name in PLOTS:
        path = copy / name
        assert str(path) in printed, name
        width, height = png_size(path)
        assert width > 200 and height > 200, (name, width, height)
        assert path.stat().st_size > 10_000, name
    assert isinstance(json.loads((copy / "shelves_detected.json").read_text()), list)


def test_load_rows_equals_the_csv(job):
    rows = load_rows(job)
    with (job / "csv" / "metrics.csv").open() as f:
        raw = list(csv.DictReader(f))
    assert len(rows) == len(raw) > 0
    for row, line in zip(rows, raw, strict=True):
        want = {k: float(v) for k, v in line.items() if v != ""}
        assert row.keys() == want.keys()
        assert isinstance(row["step"], int) and row["step"] == want["step"]
        for key, value in want.items():
            assert row[key] == value, key
    steps = {r["step"] for r in rows if "val/loss" in r}
    assert steps == {0, 10, 20, 30}
    assert {r["step"] for r in rows if "val/naive/place_1/plus_1" in r} == {0, 10, 20, 30}
    assert all(0 < r["train/loss/place_0"] < 10 for r in rows if "train/loss/place_0" in r)


def test_load_rows_hand_written(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "step,train/loss,val/acc\n"
        "0,2.5,\n"
        "10,,0.25\n"
        ",1.0,\n"  # no step: dropped
        "20,1e-3,1\n"
    )
    assert load_rows(tmp_path) == [
        {"step": 0, "train/loss": 2.5},
        {"step": 10, "val/acc": 0.25},
        {"step": 20, "train/loss": 0.001, "val/acc": 1.0},
    ]
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "nowhere")


def test_reference_table_means_over_the_window():
    spec = TaskSpec(n_digits=1, base=10)
    rows = []
    for step in (0, 10, 20, 30, 40, 50, 60, 70, 75, 76, 100):
        row = {"step": step, "train/loss/place_0": float(step)}
        if step != 40:
            row["train/loss/place_1"] = step + 100.0
        rows.append(row)
    rows.append({"step": 50, "val/loss": 9.0})  # other keys do not count
    reference = {"label": "ref", "steps": [25, 50, 1000], "places": {"0": [1.0, 2.0, 0.5], "1": [3.0, 4.0, 0.25]}}
    # step 25 +- 25: steps 0..50 -> place 0 mean 25; place 1 skips step 40: (0+10+20+30+50)/5 + 100 = 122
    # step 50 +- 25: steps 30..75 -> place 0 (30+40+50+60+70+75)/6 = 54.17; place 1 (30+50+60+70+75)/5 + 100 = 157
    assert reference_table(rows, reference, spec).splitlines() == [
        "| step | place 1 run / ref | place 0 run / ref |",
        "|---|---|---|",
        "| 25 | 122 / 3 | 25 / 1 |",
        "| 50 | 157 / 4 | 54.2 / 2 |",
        "| 1000 | – / 0.25 | – / 0.5 |",  # the run never reached step 1000
    ]
    # a narrower window: step 50 +- 10 -> 40, 50, 60
    narrow = reference_table(rows, reference, spec, window=10).splitlines()
    assert narrow[3] == "| 50 | 155 / 4 | 50 / 2 |"


def test_draw_job_from_hand_written_files(job, tmp_path):
    """A job folder holding only a config (with a reference curve) and a CSV of train losses."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    cfg.reference = "nanda_5digit"
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    keys = [f"train/loss/place_{j}" for j in range(3)]
    lines = ["step," + ",".join(keys)]
    for step in range(0, 1100, 50):
        lines.append(f"{step}," + ",".join(f"{2.3 * math.exp(-step / (300 * (j + 1))):.6f}" for j in range(3)))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")

    paths = draw_job(tmp_path)
    # no naive-sum, carry or confusion data: the loss plot, the shelves, the timeline and the reference table
    assert [p.name for p in paths] == [
        "shelves_detected.json",
        "place_loss.png",
        "timeline.png",
        "timeline.md",
        "spikes.md",
        "reference_comparison.md",
    ]
    assert png_size(tmp_path / "place_loss.png")[0] > 200
    # Without plots, the text reports alone (a run with trainer.plots=false writes these)
    texts = draw_job(tmp_path, plots=False)
    assert [p.name for p in texts] == ["shelves_detected.json", "timeline.md", "spikes.md", "reference_comparison.md"]
    table = (tmp_path / "reference_comparison.md").read_text().splitlines()
    reference = json.loads((REFERENCE_DIR / "nanda_5digit.json").read_text())
    assert table[0] == reference["label"]
    # step 100 +- 25: only the row at step 100; place 0 loss there is 2.3 exp(-1/3)
    row100 = table[4]
    assert row100.startswith("| 100 | – / 0.6 | ")  # the 2-digit run has no place 5
    assert f"{2.3 * math.exp(-100 / 300):.3g} / 2.34 |" in row100
    # step 500 +- 25: only the row at step 500 (rows are 50 steps apart)
    value = float(f"{2.3 * math.exp(-500 / 300):.6f}")
    assert table[5].endswith(f"| {value:.3g} / 2.33 |")


def test_report_on_a_folder_that_is_not_a_job(tmp_path, capsys):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    assert main([str(tmp_path)]) == 2  # the exit code of ``python -m addrepro.report`` (sys.exit(main()))
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("addrepro.report: ") and "not a job folder" in lines[0] and str(tmp_path) in lines[0]
    assert not (tmp_path / "place_loss.png").exists()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_report_on_a_path_that_is_no_folder_says_so(tmp_path, capsys, kind):
    path = tmp_path / "nope"
    if kind == "file":
        path.write_text("")
    assert main([str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    expected = "does not exist" if kind == "missing" else "is not a folder (give a job folder or a sweep folder)"
    assert line == f"addrepro.report: {path} {expected}"
    assert sorted(tmp_path.iterdir()) == ([] if kind == "missing" else [path])  # nothing was created


def test_report_on_a_job_without_csv(job, tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    shutil.copy(job / ".hydra" / "config.yaml", tmp_path / ".hydra" / "config.yaml")
    assert main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "no metrics file" in err, err


def test_report_on_a_non_numeric_metrics_file_names_the_cell(job, tmp_path, capsys, monkeypatch):
    shutil.copytree(job, tmp_path / "job")
    metrics = tmp_path / "job" / "csv" / "metrics.csv"
    header, *rows = metrics.read_text().splitlines()
    column = header.split(",").index("train/loss")
    cells = rows[0].split(",")
    cells[column] = "oops"
    metrics.write_text("\n".join([header, ",".join(cells), *rows[1:]]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["job"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["addrepro.report: job/csv/metrics.csv, line 2: train/loss='oops' is not a number"]


def test_report_usage_without_a_folder(capsys):
    assert main([]) == 2
    assert main(["a", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["usage: python -m addrepro.report <job folder | sweep folder>"] * 2


def test_saved_confusion_matches_what_report_reads(job):
    data = np.load(job / "confusion.npz")
    steps, mats = data["steps"], data["confusion"]
    assert steps.tolist() == [0, 10, 20, 30]
    assert mats.shape == (4, 3, 10, 10)  # (checkpoints, n+1 places, base, base)
    present = ~np.isnan(mats).any(-1)
    np.testing.assert_allclose(mats.sum(-1)[present], 1.0, atol=1e-4)
    assert not present[:, 2, 2:].any()  # the carry-out place only holds 0 and 1
