"""The LightningModule: the adapter between Lightning and a stack, its evaluations and its recorder.

* ``training.stack.Stack`` holds the K models, the optimiser, the data streams, the evaluation sets and
  the training step (``training.step.TrainStep``: one function, run as it is or replayed as a CUDA
  graph); ``training.evaluation.evaluate`` measures a model on held-out sets (pure);
  ``training.recorder.Recorder`` turns metrics into each member's rows and loggers, runs the spike and
  shelf-exit detectors and applies the failure policy.
* A Lightning batch is a tick of ``trainer.steps_per_call`` optimiser steps (``Ticks``): these models
  are so small that Lightning's per-batch overhead would cost more than a step. Batches are drawn on
  the device inside the step, so there is no DataLoader.
* ``trainer.global_step`` counts optimiser steps on every path and ``max_steps`` ends training; an
  epoch ends at each held-out evaluation, whose metrics (member 0's) are in ``trainer.callback_metrics``,
  so Lightning's ``EarlyStopping`` and ``ModelCheckpoint(monitor=...)`` work as documented.
* Steps are counted in optimiser steps: the metrics at step t describe the model after t updates.

The module writes no files. What it computes reaches the outside through the members' loggers and
through the hooks of ``addrepro.training.callbacks`` (checkpoints, spike snapshots, confusion arrays,
plots), which it calls at the exact optimiser step they concern: several steps run inside one
Lightning batch, so Lightning's own batch hooks cannot say which.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl

from addrepro.model.optim import StackedAdamW
from addrepro.model.transformer import ModelConfig, Transformer
from addrepro.task.spec import TaskSpec
from addrepro.training.config import ConfigError, TrainConfig
from addrepro.training.evaluation import evaluate
from addrepro.training.recorder import Member, Recorder
from addrepro.training.stack import Stack

# The train values published to ``trainer.callback_metrics`` at each logging step (every evaluation
# publishes all of its values): a few keys, since each ``self.log`` costs more than a GPU step.
PUBLISHED_TRAIN_KEYS = ("train/loss", "train/acc")


class AdditionModule(pl.LightningModule):
    def __init__(
        self,
        spec: TaskSpec,
        model_cfg: ModelConfig,
        members: list[Member],
        config: TrainConfig,
        resume_states: list[dict | None] | None = None,
        history: list[list[dict]] | None = None,
        confusions: list[list[tuple[int, Any]]] | None = None,
    ):
        """``history`` and ``confusions`` (per member, ``(step, (n+1, base, base))``): what a resumed
        run had logged before its checkpoint's step, so the detectors and files continue."""
        super().__init__()
        self.automatic_optimization = False
        self.spec, self.model_cfg, self.config = spec, model_cfg, config
        self.model = Transformer(model_cfg, seeds=[m.seed for m in members])
        self.stack = Stack(self.model, spec, config, members)
        self.resume_states = resume_states if resume_states and any(resume_states) else None
        self.start_step = self.resume_states[0]["step"] if self.resume_states else 0
        self.recorder = Recorder(
            members,
            spec,
            config.metrics,
            self.start_step,
            history,
            confusions,
            on_failed=lambda k, message: self.call_hooks("on_member_failed", k, message),
        )
        self.finished = False
        self.monitors_checked = False  # see check_monitors
        self.last_evaluated: int | None = None  # the step of the last held-out evaluation
        self.publishing = False  # inside training_step: evaluations reach trainer.callback_metrics

    @property
    def members(self) -> list[Member]:
        return self.recorder.members

    @property
    def opt(self) -> StackedAdamW:
        return self.optimizers().optimizer

    # -- Lightning's hooks ---------------------------------------------------------------------
    def configure_optimizers(self) -> StackedAdamW:
        return self.stack.optimizer()

    def train_dataloader(self) -> Ticks:
        return Ticks(self)

    def on_fit_start(self) -> None:
        self.stack.build(self.opt, self.device, self.resume_states)
        self.opt.param_groups[0]["lr"] = self.opt.host_lr(self.start_step)
        lightning_steps(self.trainer, self.start_step)

    def on_train_end(self) -> None:
        """The end of a run, in this order: the final evaluation (where a callback stopped training
        before ``max_steps``), ``last.ckpt``, then the end-of-run files drawn from what it covers.
        Lightning calls this after the callbacks' own ``on_train_end`` (the progress bar closes first)."""
        self.finish()
        self.call_hooks("on_last_checkpoint")
        self.call_hooks("on_end_of_run_files")

    def on_fit_end(self) -> None:
        self.stack.release()

    def training_step(self, batch: int, batch_idx: int) -> None:
        """``batch`` optimiser steps (a tick, see ``Ticks``)."""
        self.publishing = True  # Lightning takes self.log here, not in the hooks where finish() may run
        try:
            if self.last_evaluated is None:
                self.evaluate_if_due(self.global_step)  # the model as training starts (or resumes)
            for _ in range(batch):
                self.optimizer_step_once()
        finally:
            self.publishing = False
        # Lightning counts one batch for its loggers' step after this; it is made the optimiser step.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step - 1

    # -- one optimiser step and what follows it --------------------------------------------------
    def optimizer_step_once(self) -> None:
        """One optimiser step of the stack, then its rows, the callbacks' hooks and any evaluation due."""
        t, step = self.config.trainer, self.global_step
        logging = step % t.log_every_n_steps == 0
        # One copy per stacked tensor (not per member), for the spike snapshots of callbacks: the weights
        # that gave this step's logged losses.
        weights = self.stack.weights() if logging and self.wants("on_train_log_step") else None
        metrics = self.stack.step(logging)
        lightning_steps(self.trainer, step + 1)
        self.opt.param_groups[0]["lr"] = self.opt.host_lr(step + 1)  # what Lightning's LearningRateMonitor reads
        if metrics is not None:
            row = self.recorder.emit(metrics, step, self.stack.first_nonfinite)
            if row is not None:
                self.publish({key: row[key] for key in PUBLISHED_TRAIN_KEYS if key in row})
            new_spikes, new_exits = self.recorder.check_spikes(step), self.recorder.check_exits(step)
            self.call_hooks("on_train_log_step", step, weights, new_spikes, new_exits)
        self.call_hooks("on_optimizer_step_end", step + 1)
        if step + 1 == t.max_steps:
            self.finish()
        else:
            self.evaluate_if_due(step + 1)

    def evaluate_if_due(self, step: int) -> None:
        if step % self.config.trainer.val_every_n_steps == 0 or step % self.config.metrics.every_n_steps == 0:
            self.validate(step)

    def validate(self, step: int, final: bool = False) -> None:
        """Evaluate the stack at ``step`` (held-out and shelf-science metrics as their cadence says, or
        both when ``final``); emit the rows and tell the callbacks."""
        t, mc = self.config.trainer, self.config.metrics
        self.last_evaluated = step
        held_out, science = step % t.val_every_n_steps == 0 or final, step % mc.every_n_steps == 0 or final
        result = evaluate(self.model, self.spec, self.stack.sets, held_out, science, mc.mechanism)
        if result.held_out is not None:
            self.publish(self.recorder.emit(result.held_out, step, self.stack.first_nonfinite))
            self.call_hooks("on_validation_rows", step)
        if result.science is not None:
            self.publish(self.recorder.emit(result.science, step, self.stack.first_nonfinite))
            self.recorder.add_confusion(step, result.confusion)
            self.call_hooks("on_confusion", step, result.confusion)
        if held_out and science and not self.monitors_checked:
            self.check_monitors()

    def check_monitors(self) -> None:
        """A callback's ``monitor`` must be a key this run publishes. The held-out and train keys are
        checked with the config; the shelf-science keys depend on the task, so they are checked here, at
        the first evaluation that published both, in one line instead of Lightning's error."""
        if not self.publishing or self._trainer is None:
            return
        self.monitors_checked = True
        published = self.trainer.callback_metrics
        for cb in self.trainer.callbacks:
            key = getattr(cb, "monitor", None)
            # train keys are published at logging steps (checked with the config); the evaluations' here
            if isinstance(key, str) and key.startswith("val/") and key not in published:
                near = difflib.get_close_matches(key, list(published), n=3, cutoff=0.6)
                raise ConfigError(
                    f"{type(cb).__name__}.monitor",
                    key,
                    "is not a key this run logs at its evaluations"
                    + (f"; did you mean {', '.join(near)}?" if near else " (see the metrics file's columns)"),
                )

    def publish(self, row: dict[str, float] | None) -> None:
        """Member 0's values into ``trainer.callback_metrics`` (for EarlyStopping, ModelCheckpoint and the
        progress bar), not to the loggers: they already have them."""
        if self.publishing and row:
            self.log_dict(row, on_step=True, on_epoch=False, logger=False, batch_size=1)

    def finish(self) -> None:
        """The final evaluation, once: at ``max_steps``, or where a callback stopped training (callbacks'
        end-of-run files come after it)."""
        if not self.finished:
            if self.last_evaluated != self.global_step:
                self.validate(self.global_step, final=True)
            self.finished = True

    # -- hooks to the callbacks that write files -----------------------------------------------
    def wants(self, hook: str) -> bool:
        return self._trainer is not None and any(hasattr(cb, hook) for cb in self.trainer.callbacks)

    def call_hooks(self, hook: str, *args: Any) -> None:
        """Call ``hook(trainer, module, *args)`` on every callback that has it (as Lightning does for its own)."""
        if self._trainer is None:
            return
        for cb in self.trainer.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self.trainer, self, *args)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_header(self, k: int, step: int) -> dict:
        member = self.members[k]
        return {
            "task": asdict(self.spec),
            "model_config": self.model_cfg.to_dict(),
            "config": member.config,
            "step": step,
            "wandb_run_id": member.wandb_run_id,
            "wandb_name": member.wandb_name,
            "wandb_group": member.wandb_group,
        }

    def resumable_states(self, step: int) -> list[dict | None]:
        """Everything member k needs to continue exactly: weights, optimiser moments, data stream.

        A member whose weights or optimiser moments are not all finite is failed (a single run raises
        ``Divergence``) and gets ``None``: a diverged model never replaces the last good checkpoint (one
        host sync, at checkpoint steps only).
        """
        failed = self.recorder.failed
        for k, bad in enumerate(self.stack.first_nonfinite_tensor()):
            if bad is not None and k not in failed:
                member = self.members[k]
                where = f" (seed {member.seed}, {member.job_dir.name})" if len(self.members) > 1 else ""
                self.recorder.fail(k, f"step {step}: non-finite {bad}{where}; the last good checkpoint is kept")
        alive = [k for k in range(len(self.members)) if k not in failed]
        states = self.stack.member_states(step, alive)
        return [
            {**self.checkpoint_header(k, step), **states[k]} if k in states else None for k in range(len(self.members))
        ]


class Ticks:
    """Lightning's batches: each is a number of optimiser steps to take, ``trainer.steps_per_call`` or
    fewer before an evaluation or the end. An epoch ends at each held-out evaluation
    (``trainer.val_every_n_steps``), so Lightning's epoch-end callbacks see its metrics."""

    def __init__(self, module: AdditionModule):
        self.module = module

    def __iter__(self) -> Iterator[int]:
        t = self.module.config.trainer
        step = self.module.global_step
        end = min((step // t.val_every_n_steps + 1) * t.val_every_n_steps, t.max_steps)
        while step < end:
            n = min(t.steps_per_call, end - step)
            yield n
            step += n


def lightning_steps(trainer: pl.Trainer, step: int) -> None:
    """Make ``trainer.global_step`` ``step``.

    Lightning advances it when its optimiser wrapper steps; here the AdamW update is inside the step
    function that a CUDA graph replays, so the same counter is set after each step, and once at the
    start of a resumed run (Lightning restores it only from its own checkpoint format; addrepro's
    checkpoints are one per member).
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total
    progress.ready = progress.completed = step
