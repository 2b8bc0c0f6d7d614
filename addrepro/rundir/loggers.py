"""Where metrics go: W&B runs (offline by default) and Lightning's CSV file, inside the job folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from addrepro.rundir.metrics_file import MetricsCSVLogger


def swept_keys(argv: list[str]) -> set[str]:
    """Keys that a multirun command line sweeps over (``model.width=32,64``, ``seed=range(3)`` …)."""
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # a malformed override is reported by Hydra itself
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def run_name(overrides: list[str], swept: set[str] | None = None) -> str:
    """A W&B run name from the job's overrides: the swept values in a sweep, e.g. ``model.width=32``."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.", "logger."))]
    if swept:
        kept = [o for o in kept if o.lstrip("+~").split("=", 1)[0] in swept] or kept
    return ",".join(kept) or "default"


def wandb_mode(cfg: DictConfig) -> str:
    """The config decides, unless ``WANDB_MODE`` is set, the usual environment switch."""
    return os.environ.get("WANDB_MODE") or cfg.logger.wandb.mode


def make_loggers(
    cfg: DictConfig, job_dir: Path, name: str, group: str, run_id: str | None = None, resume_step: int | None = None
) -> list[Logger]:
    """The loggers of one model: CSV at ``<job>/csv/metrics.csv`` and W&B under ``<job>/wandb``.

    The W&B run is created here rather than by Lightning, which would reuse any live run: the
    members of an ensemble are trained in one process, each with its own run.
    """
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(MetricsCSVLogger(job_dir, keep_before_step=resume_step))
    wb = cfg.logger.wandb
    mode = wandb_mode(cfg)
    if wb.enabled and mode != "disabled":
        init = dict(
            dir=str(job_dir),
            project=wb.project,
            entity=wb.entity,
            group=wb.group or group,
            name=wb.name or name,
            tags=list(wb.tags),
            id=run_id,
            resume="allow" if run_id else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="create_new",
        )
        run = _init_wandb(init, mode, timeout=wb.get("init_timeout", 30))
        _live_runs.append(run)
        loggers.append(WandbLogger(experiment=run))
    return loggers


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


_live_runs: list = []  # W&B runs opened by this process and not yet finished


def wandb_run_id(loggers: list[Logger]) -> str | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment.id
    return None


def finish_wandb_runs(exit_code: int, preempting: bool = False, job_dir: Path | None = None) -> None:
    """Close this job's W&B runs (marked failed with a non-zero exit code) before the next job starts.

    ``preempting``: the run stopped to be resumed later under the same id (W&B shows it as preempted).
    ``job_dir``: only the run of that job folder (a member of an ensemble that failed alone).
    """
    wanted = Path(job_dir).resolve() if job_dir is not None else None
    chosen = [r for r in _live_runs if wanted is None or Path(r.settings.root_dir).resolve() == wanted]
    for run in chosen:
        _live_runs.remove(run)
        if preempting:
            run.mark_preempting()
        run.finish(exit_code=exit_code)


def previous_wandb_run_id(job_dir: Path) -> str | None:
    """The id of the latest W&B run in ``<job>/wandb`` (``[offline-]run-<time>-<id>`` folders), if any."""
    runs = sorted(Path(job_dir).glob("wandb/*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    runs = [p for p in runs if p.is_dir() and p.name.startswith(("run-", "offline-run-"))]
    return runs[-1].name.rsplit("-", 1)[1] if runs else None
