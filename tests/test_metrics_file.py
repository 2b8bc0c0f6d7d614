"""The metrics file: appended at each save, rewritten only for a new key, torn last lines dropped."""

from addrepro.rundir.csv_logger import MetricsCSVLogger
from addrepro.rundir.metrics_file import load_rows


def log(logger: MetricsCSVLogger, step: int, **values: float) -> None:
    logger.log_metrics(values, step=step)


def test_rows_are_appended_and_the_file_rewritten_only_for_new_keys(tmp_path):
    logger = MetricsCSVLogger(tmp_path)
    path = tmp_path / "csv" / "metrics.csv"
    log(logger, 0, **{"val/loss": 2.5})
    logger.save()
    inode = path.stat().st_ino
    log(logger, 10, **{"val/loss": 2.0})
    logger.save()
    assert path.stat().st_ino == inode  # appended in place
    assert path.read_text() == "step,val/loss\n0,2.5\n10,2.0\n"
    log(logger, 10, **{"train/loss": 1.5})  # a new key: the header changes, the file is rewritten
    logger.save()
    assert path.stat().st_ino != inode
    assert path.read_text() == "step,train/loss,val/loss\n0,,2.5\n10,,2.0\n10,1.5,\n"
    log(logger, 20, **{"train/loss": 1.0, "val/loss": 1.25})
    logger.save()
    assert load_rows(tmp_path) == [
        {"step": 0, "val/loss": 2.5},
        {"step": 10, "val/loss": 2.0},
        {"step": 10, "train/loss": 1.5},
        {"step": 20, "train/loss": 1.0, "val/loss": 1.25},
    ]


def test_a_torn_last_line_is_dropped_and_a_resume_keeps_rows_before_its_step(tmp_path):
    logger = MetricsCSVLogger(tmp_path)
    for step in (0, 10, 20):
        log(logger, step, **{"val/loss": 3.0 - step / 10})
    logger.save()
    path = tmp_path / "csv" / "metrics.csv"
    with path.open("a") as f:
        f.write("30,0.12")  # killed mid-append: "30,0.1234\n" was being written
    assert [r["step"] for r in load_rows(tmp_path)] == [0, 10, 20]
    resumed = MetricsCSVLogger(tmp_path, keep_before_step=20)  # resumed from the step-20 checkpoint
    log(resumed, 20, **{"val/loss": 0.5})
    resumed.save()
    assert path.read_text() == "step,val/loss\n0,3.0\n10,2.0\n20,0.5\n"
