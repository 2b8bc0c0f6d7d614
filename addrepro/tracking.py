"""Where metrics go: W&B runs (offline by default) and Lightning's CSV file, inside the job folder."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger


def run_name(overrides: list[str]) -> str:
    """A W&B run name made from the job's overrides, e.g. ``model.width=32,seed=1``."""
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.", "logger."))]
    return ",".join(kept) or "default"


def wandb_mode(cfg: DictConfig) -> str:
    """The config decides, unless ``WANDB_MODE`` is set, the usual environment switch."""
    return os.environ.get("WANDB_MODE") or cfg.logger.wandb.mode


def make_loggers(
    cfg: DictConfig, job_dir: Path, name: str, group: str, run_id: str | None = None
) -> list[Logger]:
    """The loggers of one model: CSV at ``<job>/csv/metrics.csv`` and W&B under ``<job>/wandb``."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(job_dir), name="csv", version=""))
    wb = cfg.logger.wandb
    mode = wandb_mode(cfg)
    if wb.enabled and mode != "disabled":
        loggers.append(
            WandbLogger(
                save_dir=str(job_dir),
                project=wb.project,
                entity=wb.entity,
                group=wb.group or group,
                name=wb.name or name,
                tags=list(wb.tags),
                id=run_id,
                resume="allow" if run_id else None,
                mode=mode,
                config=OmegaConf.to_container(cfg, resolve=True),
                settings=_wandb_settings(),
            )
        )
    return loggers


def _wandb_settings():
    import wandb

    # Never wait for input (no login prompt) and give up on an unreachable server quickly.
    return wandb.Settings(silent=True, init_timeout=60, console="off")


def finish_wandb_run(exit_code: int) -> None:
    """Close the live W&B run, so the next job of a multirun gets its own (Lightning reuses a live one)."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
