"""``python -m addrepro.train [-m] [overrides]``: train on addition, log per-place metrics.

Each job writes into its own folder: ``.hydra/`` (configs), ``csv/metrics.csv``, ``wandb/``,
``checkpoints/`` (periodic and ``last.ckpt``), PNG plots and ``status.json``.
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from addrepro.config_check import ConfigError, validate
from addrepro.sweep import write_status

log = logging.getLogger("addrepro")

# One random id per process: a run folder never collides with one started in the same second,
# and every job of one multirun (one process) resolves the same sweep folder.
_PROCESS_ID = secrets.token_hex(3)
if not OmegaConf.has_resolver("uid"):
    OmegaConf.register_new_resolver("uid", lambda: _PROCESS_ID)


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returns `None`.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


def train(cfg: DictConfig, job_dir: Path, name: str, group: str) -> dict:
    """Train one job; returns the final metrics row of member 0."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    from addrepro.lit_module import (
        AdditionModule,
        Member,
        model_config_from_config,
        settings_from_config,
        task_spec_from_config,
    )
    from addrepro.tracking import make_loggers

    _quiet_lightning()
    spec = task_spec_from_config(cfg)
    model_cfg = model_config_from_config(cfg, spec)
    settings = settings_from_config(cfg)
    loggers = make_loggers(cfg, job_dir, name=name, group=group)
    member = Member(
        seed=cfg.seed,
        data_seed=cfg.data.seed,
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        job_dir=job_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        loggers=loggers,
        wandb_run_id=_wandb_id(loggers),
    )
    module = AdditionModule(spec, model_cfg, [member], settings)
    trainer = pl.Trainer(
        max_steps=settings.max_steps,
        max_epochs=1,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.progress_bar,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(job_dir),
        # Redrawing the bar every step costs more than a training step of these tiny models.
        callbacks=[TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps // settings.steps_per_call))]
        if cfg.trainer.progress_bar
        else [],
    )
    ticks = range(math.ceil(settings.max_steps / settings.steps_per_call))
    trainer.fit(module, train_dataloaders=ticks)
    finish_job(job_dir, module, cfg)
    return next((r for r in reversed(module.history) if "val/loss" in r), {})


def finish_job(job_dir: Path, module, cfg: DictConfig) -> None:  # noqa: ANN001
    """Files that outlive the run: confusion arrays, spikes, plots; and the same to W&B."""
    import json

    from addrepro.report import draw_job, save_confusion

    save_confusion(job_dir, module.confusions)
    spikes = [{"member": k, **s.as_dict()} for k, s in module.spikes]
    (job_dir / "spikes.json").write_text(json.dumps(spikes, indent=1))
    paths = draw_job(job_dir, rows=module.history) if cfg.trainer.plots else []
    _log_files_to_wandb(module.members[0].loggers, paths, job_dir)


def _log_files_to_wandb(loggers: list, paths: list[Path], job_dir: Path) -> None:
    import json

    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        payload = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        shelves_path = job_dir / "shelves_detected.json"
        if shelves_path.exists():
            shelves = json.loads(shelves_path.read_text())
            columns = ["place", "start_step", "end_step", "level", "atlas_level", "atlas_loss"]
            payload["shelves"] = wandb.Table(columns=columns, data=[[s.get(c) for c in columns] for s in shelves])
        if payload:
            logger.experiment.log(payload)


def _wandb_id(loggers: list) -> str | None:
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment.id
    return None


def job_identity(cfg: DictConfig) -> tuple[Path, str, str, bool]:
    """Job folder, W&B run name, W&B group and whether this job is part of a multirun."""
    from addrepro.tracking import run_name, swept_keys

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    group_dir = Path(hc.sweep.dir) if multirun else job_dir
    group = f"{'sweep' if multirun else 'run'}-{group_dir.parent.name}_{group_dir.name}"
    swept = swept_keys(sys.argv[1:]) if multirun else None
    return job_dir, run_name(list(hc.overrides.task), swept), group, multirun


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    job_dir, name, group, multirun = job_identity(cfg)
    try:
        validate(cfg)
    except ConfigError as e:
        write_status(job_dir, "failed", f"config: {e}")
        print(f"addrepro: config error: {e}", file=sys.stderr)
        if multirun:
            return
        sys.exit(2)
    write_status(job_dir, "running")
    try:
        final = train(cfg, job_dir, name, group)
    except Exception as e:
        from addrepro.tracking import finish_wandb_run

        finish_wandb_run(exit_code=1)
        write_status(job_dir, "failed", f"{type(e).__name__}: {e}")
        print(f"addrepro: job failed: {type(e).__name__}: {e}", file=sys.stderr)
        if multirun:
            log.exception("job failed")
            return
        raise
    from addrepro.tracking import finish_wandb_run

    finish_wandb_run(exit_code=0)
    write_status(job_dir, "ok", final_val_loss=final.get("val/loss"), final_val_acc=final.get("val/acc"))
    log.info("done: %s (val loss %.4f)", job_dir, final.get("val/loss", float("nan")))


if __name__ == "__main__":
    main()
