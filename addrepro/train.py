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
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from addrepro.rundir.status import write_status
from addrepro.training.config import ConfigError, validate

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
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class JobPlan:
    """One job of a run or sweep, ready to train: its config, folder and W&B identity."""

    cfg: DictConfig
    job_dir: Path
    name: str
    group: str
    multirun: bool
    resume_from: Path | None = None


def train(plans: list[JobPlan]) -> list[dict]:
    """Train the jobs of ``plans`` as one stack of models (one job: a single run).

    The jobs must agree on everything but their seeds, learning rate and weight decay (see
    ``addrepro.training.ensemble.packing_key``). Returns each job's final validation row.
    """
    import pytorch_lightning as pl

    from addrepro.rundir.loggers import make_loggers, wandb_run_id
    from addrepro.training.module import (
        AdditionModule,
        Member,
        model_config_from_config,
        settings_from_config,
        task_spec_from_config,
    )
    from addrepro.training.progress import StepProgressBar

    _quiet_lightning()
    cfg = plans[0].cfg
    spec = task_spec_from_config(cfg)
    model_cfg = model_config_from_config(cfg, spec)
    settings = settings_from_config(cfg)
    from addrepro.rundir.checkpoints import load_checkpoint

    members, resume_states = [], []
    for plan in plans:
        state = load_checkpoint(plan.resume_from) if plan.resume_from else None
        resume_states.append(state)
        loggers = make_loggers(
            plan.cfg,
            plan.job_dir,
            name=plan.name,
            group=plan.group,
            run_id=state.get("wandb_run_id") if state else None,
            resume_step=state["step"] if state else None,
        )
        members.append(
            Member(
                seed=plan.cfg.seed,
                data_seed=plan.cfg.data.seed,
                lr=plan.cfg.optimizer.lr,
                weight_decay=plan.cfg.optimizer.weight_decay,
                job_dir=plan.job_dir,
                config=OmegaConf.to_container(plan.cfg, resolve=True),
                loggers=loggers,
                wandb_run_id=wandb_run_id(loggers),
                wandb_name=plan.name,
                wandb_group=plan.group,
            )
        )
    module = AdditionModule(spec, model_cfg, members, settings, resume_states=resume_states)
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
        default_root_dir=str(plans[0].job_dir),
        # Redrawing the bar every step costs more than a training step of these tiny models.
        callbacks=[StepProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps // settings.steps_per_call))]
        if cfg.trainer.progress_bar
        else [],
    )
    ticks = range(math.ceil(max(settings.max_steps - module.start_step, 0) / settings.steps_per_call))
    trainer.fit(module, train_dataloaders=ticks)
    finals = []
    for k, plan in enumerate(plans):
        rows = [r for r in module.history if r["member"] == k]
        finish_job(plan, module, k, rows)
        finals.append(next((r for r in reversed(rows) if "val/loss" in r), {}))
    return finals


def finish_job(plan: JobPlan, module, k: int, rows: list[dict]) -> None:  # noqa: ANN001
    """Files that outlive the run: confusion arrays, spikes, plots; and the same to W&B."""
    import json

    from addrepro.reports.job import draw_job
    from addrepro.rundir.confusion import save_confusion

    save_confusion(plan.job_dir, [(step, c[k]) for step, c in module.confusions])
    window = 5 * plan.cfg.trainer.log_every_n_steps
    spikes = [
        {
            **s.as_dict(),
            # The gradient norms around the spike, to tell an optimiser blow-up from a data fluke.
            "grad_norms": [
                {key: v for key, v in r.items() if key == "step" or key.startswith("train/grad_norm/")}
                for r in rows
                if "train/grad_norm/global" in r and abs(r["step"] - s.step) <= window
            ],
        }
        for member, s in module.spikes
        if member == k
    ]
    (plan.job_dir / "spikes.json").write_text(json.dumps(spikes, indent=1))
    paths = draw_job(plan.job_dir, rows=rows) if plan.cfg.trainer.plots else []
    _log_files_to_wandb(module.members[k].loggers, paths, plan.job_dir)


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


def job_plan(cfg: DictConfig) -> JobPlan:
    """The current Hydra job's folder, W&B run name and group; validation happens separately."""
    from addrepro.rundir.loggers import run_name, swept_keys

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    group_dir = Path(hc.sweep.dir) if multirun else job_dir
    group = f"{'sweep' if multirun else 'run'}-{group_dir.parent.name}_{group_dir.name}"
    swept = swept_keys(_sweep_overrides(group_dir)) if multirun else None
    return JobPlan(cfg, job_dir, run_name(list(hc.overrides.task), swept), group, multirun)


def resume_plan(plan: JobPlan) -> JobPlan:
    """Continue the run a checkpoint belongs to: its config (plus this command's overrides), its folder."""
    from addrepro.rundir.checkpoints import check_compatible, find_resume_checkpoint, load_checkpoint
    from addrepro.training.module import model_config_from_config, task_spec_from_config

    path = find_resume_checkpoint(str(plan.cfg.resume), plan.job_dir)
    if path is None:  # resume=auto on a first start
        return plan
    ckpt = load_checkpoint(path)
    # A key added to addrepro after the checkpoint was written takes this job's value (its default).
    current = OmegaConf.create(OmegaConf.to_container(plan.cfg, resolve=False))
    cfg = OmegaConf.merge(current, OmegaConf.create(ckpt["config"]))
    # This command's overrides win over the stored config; their values are taken from this job's
    # composed config, so group overrides (logger=csv) bring their whole group.
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~").replace("/", ".")
        value = OmegaConf.select(plan.cfg, key, default=None)
        if key in ("resume", "experiment") or key.startswith("hydra") or value is None:
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.resume = str(path)
    validate(cfg)
    spec = task_spec_from_config(cfg)
    check_compatible(ckpt, asdict(spec), model_config_from_config(cfg, spec).to_dict(), path)
    name, group = ckpt.get("wandb_name") or plan.name, ckpt.get("wandb_group") or plan.group
    log.info("resuming %s from step %d", path, ckpt["step"])
    return JobPlan(cfg, path.parent.parent, name, group, plan.multirun, resume_from=path)


def _sweep_overrides(sweep_dir: Path) -> list[str]:
    """The multirun's own command-line overrides, as Hydra saved them (jobs run by submitit see no argv)."""
    saved = sweep_dir / "multirun.yaml"
    if saved.exists():
        return list(OmegaConf.load(saved).hydra.overrides.task)
    return sys.argv[1:]


def checked_plan(cfg: DictConfig) -> JobPlan | None:
    """The job's plan, or None after reporting a bad config in one line (exit 2 outside a sweep)."""
    from addrepro.rundir.checkpoints import CheckpointError

    plan = job_plan(cfg)
    try:
        validate(cfg)
        if cfg.resume:
            plan = resume_plan(plan)
    except (ConfigError, CheckpointError) as e:
        kind = "config" if isinstance(e, ConfigError) else "checkpoint"
        write_status(plan.job_dir, "failed", f"{kind}: {e}")
        print(f"addrepro: {kind} error: {e}", file=sys.stderr)
        if plan.multirun:
            return None
        sys.exit(2)
    write_status(plan.job_dir, "running")
    return plan


def run_plans(plans: list[JobPlan]) -> bool:
    """Train ``plans`` together, record each job's status and close its W&B run; True if all went well."""
    from addrepro.rundir.loggers import finish_wandb_runs
    from addrepro.training.module import Divergence

    try:
        finals = train(plans)
    except Exception as e:
        finish_wandb_runs(exit_code=1)
        for plan in plans:
            write_status(plan.job_dir, "failed", f"{type(e).__name__}: {e}")
        if isinstance(e, Divergence):  # an expected way for a run to end: one line, no traceback
            print(f"addrepro: diverged: {e}", file=sys.stderr)
            if not plans[0].multirun:
                sys.exit(1)
            return False
        print(f"addrepro: job failed: {type(e).__name__}: {e}", file=sys.stderr)
        if not plans[0].multirun:
            raise
        log.exception("job failed")
        return False
    finish_wandb_runs(exit_code=0)
    for plan, final in zip(plans, finals, strict=True):
        write_status(plan.job_dir, "ok", final_val_loss=final.get("val/loss"), final_val_acc=final.get("val/acc"))
        log.info("done: %s (val loss %.4f)", plan.job_dir, final.get("val/loss", float("nan")))
    return True


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    plan = checked_plan(cfg)
    if plan is not None:
        run_plans([plan])


if __name__ == "__main__":
    main()
