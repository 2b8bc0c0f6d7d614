"""Turn planned jobs into trained models: train a stack, record each job's status, close its W&B run.

A *plan* (``training.plan``) is one job of a run or sweep. ``train`` trains plans that agree on
everything but their seeds, learning rate and weight decay as one stack of models (see
``training.ensemble``); a single run is a stack of one.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from addrepro.rundir.atomic import atomic_write
from addrepro.rundir.checkpoint_paths import LAST
from addrepro.rundir.checkpoints import checkpoint_steps, load_checkpoint, log_spaced_steps
from addrepro.rundir.confusion import load_confusion
from addrepro.rundir.lock import release
from addrepro.rundir.loggers import close_loggers, make_loggers, previous_wandb_run_id, wandb_run_id
from addrepro.rundir.metrics_file import load_rows
from addrepro.rundir.status import write_status
from addrepro.training.callbacks import (
    Checkpoints,
    ConfusionImages,
    EndOfRunFiles,
    Preempted,
    Preemption,
    ShelfExitSnapshots,
    SpikeSnapshots,
    end_of_run_files_complete,
    log_files_to_wandb,
    mark_end_of_run_files,
)
from addrepro.training.config import ConfigError, TrainConfig, architecture, task_spec, typed
from addrepro.training.devices import apply_settings, cpu_cores, job_devices, job_threads, step_work, visible_gpus
from addrepro.training.module import AdditionModule
from addrepro.training.plan import Draw, JobPlan, try_status
from addrepro.training.progress import StepProgressBar
from addrepro.training.recorder import Divergence, Member

log = logging.getLogger("addrepro")


def quiet_lightning() -> None:
    """Lightning's INFO lines off (addrepro prints its own), and two warnings hidden: Lightning itself
    calls a torch API that newer torch deprecates, which nothing in a run can change; and on a machine
    with Slurm it advises starting every run under ``srun``, which addrepro's one process per job (its
    cluster detection is off, see ``cluster_plugins``) does not need."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


def earlier_history(plan: JobPlan) -> list[dict]:
    """The rows a resumed job logged before (none if it kept no metrics file)."""
    try:
        return load_rows(plan.job_dir)
    except FileNotFoundError:
        return []


def earlier_confusion(plan: JobPlan) -> list[tuple[int, Any]]:
    """The confusion matrices a resumed job saved before, as ``(step, (n+1, base, base))``."""
    saved = load_confusion(plan.job_dir)
    return list(zip(saved[0].tolist(), saved[1], strict=True)) if saved is not None else []


def train(plans: list[JobPlan], draw: Draw | None = None) -> list[dict]:
    """Train the jobs of ``plans`` as one stack of models (one job: a single run).

    The jobs must agree on everything but their seeds, learning rate and weight decay (see
    ``addrepro.training.ensemble.packing_key``). ``draw(job_dir, rows)`` draws a job's plots at the
    end. Returns each job's final validation row (``{"diverged": why}`` for a member that diverged
    alone). The jobs' W&B runs and TensorBoard writers are closed when it returns or raises.
    """
    quiet_lightning()
    cfg = plans[0].cfg
    config = typed(cfg)  # the one typed form of the config that every stage below reads
    spec, t = task_spec(config.data), config.trainer
    d, m = config.data, config.model
    work = step_work(m.width, m.depth, m.d_mlp, d.batch_size or d.train_size, spec.seq_len - 1, len(plans))
    apply_settings(job_threads(t.threads, plans[0].jobs_at_once, cpu_cores(), work), t.matmul_precision)
    accelerator, devices = job_devices(t.accelerator, t.devices, plans[0].slot, visible_gpus(t.accelerator))
    resume_states = [load_checkpoint(plan.resume_from) if plan.resume_from else None for plan in plans]
    # Earlier rows live in the checkpoint's own job folder; a checkpoint from elsewhere brings none.
    continued = [state if plan.own_checkpoint else None for plan, state in zip(plans, resume_states, strict=True)]
    history = [earlier_history(plan) if state else [] for plan, state in zip(plans, continued, strict=True)]
    members: list[Member] = []
    try:
        for plan, state in zip(plans, continued, strict=True):  # one by one: those made are closed on failure
            members.append(make_member(plan, state))
        module = AdditionModule(
            spec,
            architecture(config.model, spec),
            members,
            config,
            resume_states=resume_states,
            history=history,
            confusions=[earlier_confusion(p) if state else [] for p, state in zip(plans, continued, strict=True)],
        )
        if module.start_step >= t.max_steps:  # resumed after finishing
            log.info("already trained to step %d of %d", module.start_step, t.max_steps)
            keep_as_last(plans)
            finish_end_of_run_files(plans, members, history, draw, t.plots, module.start_step)
            finals = [next((r for r in reversed(rows) if "val/loss" in r), {}) for rows in history]
        else:
            trainer = make_trainer(cfg, config, plans, module, draw, accelerator, devices)
            log.info("training steps %d to %d (%d job(s) in this process)", module.start_step, t.max_steps, len(plans))
            try:
                trainer.fit(module)
            finally:
                module.stack.release()
            failed = module.recorder.failed
            finals = [
                {"diverged": failed[k]} if k in failed else module.recorder.final_row(k) for k in range(len(plans))
            ]
    except Preempted as e:
        for member in members:
            close_loggers(member.loggers, exit_code=e.exit_code, preempting=True)
        raise
    except BaseException:
        for member in members:
            close_loggers(member.loggers, exit_code=1)
        raise
    module.recorder.close()
    return finals


def is_out_of_memory(e: BaseException) -> bool:
    """torch could not allocate a tensor (host or device memory)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def keep_as_last(plans: list[JobPlan]) -> None:
    """A job stopped after its final ``step_<N>.ckpt`` but before ``last.ckpt``: the checkpoint it resumed
    from is that last state (byte for byte what the end of the run writes), so it becomes ``last.ckpt``."""
    for plan in plans:
        last = plan.job_dir / "checkpoints" / LAST
        if plan.resume_from and not last.exists():
            data = Path(plan.resume_from).read_bytes()
            last.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(last, lambda f, data=data: f.write(data))
            log.info("kept %s as %s: the run had stopped before writing it", Path(plan.resume_from).name, last)


def finish_end_of_run_files(
    plans: list[JobPlan], members: list[Member], history: list[list[dict]], draw: Draw | None, plots: bool, step: int
) -> None:
    """The end-of-run files of a finished job that was stopped while drawing them (no ``end_of_run.json``),
    drawn now from its files; a job whose files are complete is left as it is."""
    for plan, member, rows in zip(plans, members, history, strict=True):
        if draw is None or not rows or end_of_run_files_complete(plan.job_dir):  # no rows: no metrics file to draw
            continue
        log.info("drawing the end-of-run files the run did not finish: %s", plan.job_dir)
        paths = draw(plan.job_dir, rows, member.config, plots)
        log_files_to_wandb(member.loggers, paths, plan.job_dir)
        mark_end_of_run_files(plan.job_dir, step, paths)


def make_member(plan: JobPlan, state: dict | None) -> Member:
    """A job as a member of a stack: its settings, folder and loggers (a resumed job's W&B run continued)."""
    loggers = make_loggers(
        plan.cfg,
        plan.job_dir,
        name=plan.name,
        group=plan.group,
        # A job killed before its first checkpoint starts again under the W&B run it had begun.
        run_id=state.get("wandb_run_id") if state else previous_wandb_run_id(plan.job_dir),
        resume_step=state["step"] if state else None,
        tags=plan.tags,
        # A finished run's final rows (at its last step) are not logged again: the W&B file must have them.
        logged_before=state["step"] + (state["step"] >= plan.cfg.trainer.max_steps) if state else None,
    )
    return Member(
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


def make_trainer(
    cfg: DictConfig,
    config: TrainConfig,
    plans: list[JobPlan],
    module: AdditionModule,
    draw: Draw | None,
    accelerator: str,
    devices: Any,
) -> pl.Trainer:
    """Lightning's Trainer with addrepro's callbacks (they write the run's files) and the config's."""
    t = config.trainer
    log_spaced = log_spaced_steps(t.max_steps, t.ckpt_log_count) if t.ckpt_schedule == "log" else []
    checkpoints = Checkpoints(checkpoint_steps(t.max_steps, t.ckpt_every_n_steps), [*log_spaced, *t.ckpt_steps])
    callbacks: list[pl.Callback] = [
        checkpoints,
        Preemption(checkpoints),
        SpikeSnapshots(),
        ShelfExitSnapshots(),
        ConfusionImages(),
        EndOfRunFiles([p.job_dir for p in plans], draw, t.plots),
    ]
    if t.progress_bar:
        # Redrawing the bar every step would cost more than a training step of these tiny models.
        callbacks.insert(0, StepProgressBar(refresh_steps=t.log_every_n_steps))
    user = user_callbacks(cfg, plans[0].job_dir)
    return pl.Trainer(
        max_steps=t.max_steps,
        max_epochs=-1,  # an epoch is the stretch between two evaluations; max_steps ends training
        accelerator=accelerator,
        devices=devices,
        precision=t.precision,
        plugins=cluster_plugins(),
        # Lightning's own logging (a user's callback, LearningRateMonitor) goes to member 0's loggers,
        # once per tick of trainer.steps_per_call optimiser steps, at the tick's first step.
        logger=module.members[0].loggers or False,
        log_every_n_steps=1,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in user),
        enable_model_summary=False,
        enable_progress_bar=t.progress_bar,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(plans[0].job_dir),
        callbacks=callbacks + user,
    )


def run_plans(plans: list[JobPlan], draw: Draw | None = None) -> bool:
    """Train ``plans`` together, record each job's status and close its W&B run; True if all went well.

    Releases the jobs' folder locks. A pre-empted run exits the process (code 128 + signal number)
    even inside a multirun: the signal asks the whole process to go.
    """
    try:
        return train_and_record(plans, draw)
    finally:
        for plan in plans:
            release(plan.job_dir)


def train_and_record(plans: list[JobPlan], draw: Draw | None) -> bool:
    try:
        finals = train(plans, draw)
    except Preempted as e:
        for plan in plans:
            try_status(plan.job_dir, "preempted", str(e), step=e.step, checkpoint=e.filename)
        print(f"addrepro: {e.verb}: {e}; continue with resume=auto (or resume=<job folder>)", file=sys.stderr)
        e.chain()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (set-up, end-of-run files): no checkpoint now
        message = "interrupted (Ctrl-C) outside the training steps; resume=auto continues from the last checkpoint"
        for plan in plans:
            try_status(plan.job_dir, "failed", message)
        print(f"addrepro: {message}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except Exception as e:
        for plan in plans:
            try_status(plan.job_dir, "failed", f"{type(e).__name__}: {e}")
        if isinstance(e, OSError):  # disk full, read-only folder: one line naming the path
            print(f"addrepro: storage error: {e}", file=sys.stderr)
            if not plans[0].multirun:
                sys.exit(1)
            return False
        if is_out_of_memory(e):  # a config the machine cannot hold: one line naming what sizes it
            c = plans[0].cfg
            print(
                f"addrepro: out of memory: {(str(e).strip().splitlines() or [''])[0]} (data.batch_size="
                f"{c.data.batch_size}, model.width={c.model.width}, model.depth={c.model.depth}, {len(plans)} "
                "member(s)): give smaller sizes",
                file=sys.stderr,
            )
            if not plans[0].multirun:
                sys.exit(1)
            return False
        if isinstance(e, (Divergence, ConfigError)):  # expected ways for a run to end: one line, no traceback
            print(f"addrepro: {'diverged' if isinstance(e, Divergence) else 'config error'}: {e}", file=sys.stderr)
            if not plans[0].multirun:
                sys.exit(1)
            return False
        print(f"addrepro: job failed: {type(e).__name__}: {e}", file=sys.stderr)
        if not plans[0].multirun:
            raise
        log.exception("job failed")
        return False
    for plan, final in zip(plans, finals, strict=True):
        if "diverged" in final:
            try_status(plan.job_dir, "failed", f"Divergence: {final['diverged']}")
            print(f"addrepro: diverged: {final['diverged']}", file=sys.stderr)
    for plan, final in zip(plans, finals, strict=True):
        if "diverged" in final:
            continue
        try:
            write_status(plan.job_dir, "ok", final_val_loss=final.get("val/loss"), final_val_acc=final.get("val/acc"))
        except OSError as e:
            print(f"addrepro: storage error: {e}", file=sys.stderr)
            if not plans[0].multirun:
                sys.exit(1)
            return False
        log.info("done: %s (val loss %.4f)", plan.job_dir, final.get("val/loss", float("nan")))
    if any("diverged" in final for final in finals):
        if not plans[0].multirun:
            sys.exit(1)
        return False
    return True


def user_callbacks(cfg: DictConfig, job_dir: Path) -> list[pl.Callback]:
    """The callbacks of the config's ``callbacks`` node (``+callbacks.<name>._target_=<class>`` or the
    ``callbacks`` group), instantiated in name order. A ``ModelCheckpoint`` without a ``dirpath`` writes
    to ``<job>/checkpoints/lightning`` (Lightning's format, beside addrepro's own checkpoints)."""
    made = []
    for name, node in sorted((cfg.get("callbacks") or {}).items()):
        callback = instantiate(node)
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(job_dir / "checkpoints" / "lightning")
        made.append(callback)
        log.info("callback %s: %s", name, type(callback).__name__)
    return made


def cluster_plugins() -> list:
    """Lightning plugins that pin the cluster environment to a plain single process.

    Each addrepro job trains on one device in one process. Lightning would otherwise detect Slurm
    from the environment inside ``sbatch`` and refuse to start when the allocation has several tasks
    (its ``--ntasks`` check), although the launcher already gave every job its own process.
    """
    return [LightningEnvironment()]
