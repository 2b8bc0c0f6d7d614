"""Where metrics go, inside the job folder: W&B runs (offline by default), Lightning's CSV file and,
with ``logger=tensorboard`` or ``logger=many``, TensorBoard event files. Every logger gets the same keys."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger

from addrepro.rundir.confusion import confusion_row, load_confusion
from addrepro.rundir.csv_logger import MetricsCSVLogger
from addrepro.rundir.metrics_file import RunFileError, load_rows
from addrepro.wandb_offline import STEP_KEY, WandbLogError, WandbLogWarning, read_run


def summary_metrics(n_places: int) -> dict[str, str]:
    """The runs table's summary of each key: the best value reached as well as the last one.

    A run's minimum per-place loss says how far it got even when the last value sits on a spike.
    """
    out = {}
    for split in ("train", "val"):
        out[f"{split}/loss"] = "min,last"
        out[f"{split}/acc"] = "max,last"
        for j in range(n_places):
            out[f"{split}/loss/place_{j}"] = "min,last"
            out[f"{split}/acc/place_{j}"] = "max,last"
    return out


def wandb_mode(cfg: DictConfig) -> str:
    """The config decides, unless ``WANDB_MODE`` is set, the usual environment switch."""
    return os.environ.get("WANDB_MODE") or cfg.logger.wandb.mode


def make_loggers(
    cfg: DictConfig,
    job_dir: Path,
    name: str,
    group: str,
    run_id: str | None = None,
    resume_step: int | None = None,
    tags: list[str] | None = None,
    logged_before: int | None = None,
) -> list[Logger]:
    """The loggers of one model: CSV at ``<job>/csv/metrics.csv``, TensorBoard under ``<job>/tensorboard``
    and W&B under ``<job>/wandb``, each as the config switches it on. ``tags`` (the swept values) are
    added to the W&B run's configured tags. ``logged_before``: the step before which a resumed run's
    rows were all logged by its earlier processes (its checkpoint's step, or one past it for a run that
    had finished training and only draws its end-of-run files); default ``resume_step``.

    The W&B run is created here rather than by Lightning, which would reuse any live run: the
    members of an ensemble are trained in one process, each with its own run.
    """
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(MetricsCSVLogger(job_dir, keep_before_step=resume_step))
    if cfg.logger.get("tensorboard", False):
        # A resumed run drops the events its first life logged from the checkpoint's step on (purge_step),
        # as the CSV file does, so the curves do not double back.
        tb = TensorBoardLogger(
            save_dir=str(job_dir), name="tensorboard", version="", default_hp_metric=False, purge_step=resume_step
        )
        loggers.append(tb)
    wb = cfg.logger.wandb
    mode = wandb_mode(cfg)
    if wb.enabled and mode != "disabled":
        # Read before the new part of the run exists: the rows its earlier parts never got.
        before = resume_step if logged_before is None else logged_before
        backfill = missing_wandb_rows(job_dir, before) if run_id and before is not None else []
        init = dict(
            dir=str(job_dir),
            project=wb.project,
            entity=wb.entity,
            group=wb.group or group,
            name=wb.name or name,
            tags=list(dict.fromkeys([*wb.tags, *(tags or [])])),
            id=run_id,
            resume="allow" if run_id else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="create_new",
        )
        run = _init_wandb(init, mode, timeout=wb.get("init_timeout", 30))
        # An exact definition hides the glob Lightning's logger defines (every key against
        # trainer/global_step), so each repeats that x axis.
        for key, summary in summary_metrics(cfg.data.n_digits + 1).items():
            run.define_metric(key, summary=summary, step_metric="trainer/global_step", step_sync=True)
        wandb_logger = WandbLogger(experiment=run)
        backfill_wandb(wandb_logger, job_dir, backfill)
        loggers.append(wandb_logger)
    return loggers


def backfill_wandb(logger: WandbLogger, job_dir: Path, rows: list[dict]) -> None:
    """Log ``rows`` (from ``missing_wandb_rows``) in order, and each evaluation's confusion image (from
    ``confusion.npz``) where the run logged it the first time: after the evaluation's rows, before the
    training row of the same step."""
    if not rows:
        return
    try:
        saved = load_confusion(job_dir)
    except RunFileError:
        saved = None
    images = {int(s): torch.from_numpy(m) for s, m in zip(*saved, strict=True)} if saved is not None else {}
    evaluated: set[int] = set()

    def image_due(step: int) -> None:
        if step in evaluated and step in images:
            logger.experiment.log(confusion_row(images.pop(step), step))

    for i, row in enumerate(rows):
        step = row["step"]
        if any(k.startswith("train/") for k in row):
            image_due(step)
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        if "val/loss" in row:
            evaluated.add(step)
        if i + 1 == len(rows) or rows[i + 1]["step"] != step:
            image_due(step)


def missing_wandb_rows(job_dir: Path, before_step: int) -> list[dict]:
    """The metrics file's rows before ``before_step`` (the step a resumed run restarts at) that the
    job's earlier W&B files lack: rows a SIGKILL caught before the W&B process had written them, or
    whose evaluation's confusion image (one per step of ``confusion.npz``) it had not written yet.

    Returned from the first step with a missing row on, whole steps and in order: the resumed part of
    the run replaces its earlier parts' rows from its own first row's step on, so the W&B history of
    the whole run then holds every row of the metrics file. Nothing when either side cannot be read
    (``logger.csv=false``, an online run's files) — the metrics file stays the record.
    """
    try:
        rows = [r for r in load_rows(job_dir) if r["step"] < before_step]
        with warnings.catch_warnings():  # a killed process's W&B file ends mid-record: its intact prefix is read
            warnings.simplefilter("ignore", WandbLogWarning)
            history = read_run(job_dir).history
    except (OSError, ValueError, WandbLogError):  # no metrics file or no readable W&B file: nothing to compare
        return []
    have: dict[tuple, int] = {}
    for r in history:
        if STEP_KEY in r and r[STEP_KEY] < before_step:
            key = (int(r[STEP_KEY]), frozenset(k for k in r if not k.startswith("_") and k != STEP_KEY))
            have[key] = have.get(key, 0) + 1
    missing = None
    for row in rows:
        key = (row["step"], frozenset(k for k in row if k != "step"))
        if have.get(key, 0) == 0:
            missing = row["step"]
            break
        have[key] -= 1
    imaged = {int(r[STEP_KEY]) for r in history if STEP_KEY in r and "val/confusion" in r}
    try:
        saved = load_confusion(job_dir)
    except RunFileError:  # no images to log again either
        saved = None
    no_image = [int(s) for s in (saved[0] if saved is not None else []) if s < before_step and int(s) not in imaged]
    if no_image and (missing is None or min(no_image) < missing):
        missing = min(no_image)
    return [r for r in rows if r["step"] >= missing] if missing is not None else []


def _init_wandb(init: dict, mode: str, timeout: float):  # noqa: ANN202 - a wandb Run
    """Start a W&B run; an online run that cannot reach its server falls back to offline, never waits."""
    import wandb  # noqa: PLC0415 - a second of start-up that CSV-only runs skip

    def start(mode: str):  # noqa: ANN202
        settings = wandb.Settings(silent=True, init_timeout=timeout, console="off")
        return wandb.init(**init, mode=mode, settings=settings)

    if mode != "online":
        return start(mode)
    try:
        return start("online")
    except Exception as e:  # no network, no API key, server down: keep the run, log offline
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"addrepro: W&B online unavailable ({type(e).__name__}: {reason}); logging offline instead", file=sys.stderr
        )
        return start("offline")


def log_final_hparams(loggers: list[Logger], config: dict, final: dict[str, float]) -> None:
    """TensorBoard's HParams tab: the run's config values beside its final held-out metrics.

    The metrics go under ``final/`` tags: TensorBoard writes them as scalars at step 0, which under
    their own names would put a final value at the start of the training curves.
    """
    params = flat_params(config)
    metrics = {f"final/{key}": value for key, value in final.items() if key.startswith("val/")}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger) and metrics:
            logger.log_hyperparams(params, metrics=metrics)


def flat_params(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"model.width": 128, ...}``: the scalar values of a nested config (lists as text)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def wandb_run_id(loggers: list[Logger]) -> str | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment.id
    return None


def close_loggers(loggers: list[Logger], exit_code: int = 0, preempting: bool = False) -> None:
    """Finish a job's W&B run (marked failed with a non-zero exit code) and close its TensorBoard writer,
    before the next job starts.

    ``preempting``: the run stopped to be resumed later under the same id (W&B shows it as preempted).
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if preempting:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        elif isinstance(logger, TensorBoardLogger):
            logger.finalize("success" if exit_code == 0 else "failed")


def previous_wandb_run_id(job_dir: Path) -> str | None:
    """The id of the latest W&B run in ``<job>/wandb`` (``[offline-]run-<time>-<id>`` folders), if any."""
    runs = sorted(Path(job_dir).glob("wandb/*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    runs = [p for p in runs if p.is_dir() and p.name.startswith(("run-", "offline-run-"))]
    return runs[-1].name.rsplit("-", 1)[1] if runs else None
