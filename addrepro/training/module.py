"""The LightningModule: K stacked models trained on addition, computing and emitting per-place metrics.

Why it is shaped this way:

* The optimiser step is one function (``training.step.TrainStep``), run as it is or replayed as a
  CUDA graph. Each Lightning "batch" is a tick of ``trainer.steps_per_call`` optimiser steps (see
  ``Ticks``); batches are drawn on the device inside the step, so there is no DataLoader. These models
  are so small that Lightning's per-batch overhead would cost more than a step.
* ``trainer.global_step`` counts optimiser steps on every path and ``max_steps`` ends training; an
  epoch ends at each held-out evaluation, whose metrics (member 0's) are in ``trainer.callback_metrics``,
  so Lightning's ``EarlyStopping`` and ``ModelCheckpoint(monitor=...)`` work as documented.
* The K models of a stack (an ensemble of jobs that differ only in seeds, learning rate and weight
  decay) are one model with a leading K dimension; each member keeps its own loggers and folder.
* Metrics stay on the device as ``(K,)`` tensors and are copied to the host once per logging step.
* Steps are counted in optimiser steps: the metrics at step t describe the model after t updates.

The module writes no files. What it computes reaches the outside through the members' loggers and
through the hooks of ``addrepro.training.callbacks`` (checkpoints, spike snapshots, confusion arrays,
plots), which it calls at the exact optimiser step they concern.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from addrepro.metrics.carry import carry_metric_dict
from addrepro.metrics.confusion import confusion_matrices
from addrepro.metrics.grad_norms import grad_norm_keys
from addrepro.metrics.mechanism import MECHANISM_EXAMPLES, mechanism_metric_dict
from addrepro.metrics.naive_sum import naive_sum_metric_dict
from addrepro.metrics.place import compiled_place_stats, place_metric_dict, place_stats
from addrepro.model.optim import StackedAdamW
from addrepro.model.transformer import ModelConfig, Transformer
from addrepro.shelves.atlas import atlas_by_place, shelf_atlas
from addrepro.shelves.exits import ShelfExit, ShelfExitMonitor
from addrepro.shelves.spikes import Spike, SpikeMonitor
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec
from addrepro.task.streams import FiniteBatches, InfiniteBatches, stacked_batch, validation_tokens
from addrepro.training.config import DataConfig, MetricsConfig, OptimizerConfig, TrainerConfig
from addrepro.training.step import TrainStep

log = logging.getLogger("addrepro")


class Divergence(RuntimeError):
    """A non-finite loss, gradient norm or weight; the message names the step and the quantity."""


@dataclass
class Member:
    """One model of the stack: what distinguishes it from the others, and where its files go."""

    seed: int
    data_seed: int
    lr: float
    weight_decay: float
    job_dir: Path
    config: dict = field(default_factory=dict)  # its resolved run config, stored in checkpoints
    loggers: list[Logger] = field(default_factory=list)
    wandb_run_id: str | None = None
    wandb_name: str = ""
    wandb_group: str = ""


@dataclass
class Settings:
    """The config groups the training loop reads (the schema's dataclasses, see ``training.config``)."""

    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


class AdditionModule(pl.LightningModule):
    def __init__(
        self,
        spec: TaskSpec,
        model_cfg: ModelConfig,
        members: list[Member],
        settings: Settings,
        resume_states: list[dict | None] | None = None,
        history: list[list[dict]] | None = None,
        confusions: list[list[tuple[int, Any]]] | None = None,
    ):
        """``history`` and ``confusions`` (per member, ``(step, (n+1, base, base))``): what a resumed
        run had logged before its checkpoint's step, so the spike detector and files continue."""
        super().__init__()
        self.automatic_optimization = False
        self.spec, self.model_cfg, self.members, self.settings = spec, model_cfg, members, settings
        self.model = Transformer(model_cfg, seeds=[m.seed for m in members])
        self.grad_keys = grad_norm_keys(self.model)
        self.streams: list[InfiniteBatches] = []
        self.val_tokens: torch.Tensor | None = None
        self.history: list[dict] = []  # host copies of logged rows, for plots at the end
        self.confusions: list[tuple[int, torch.Tensor]] = []  # (step, (K, n+1, base, base)) on the host
        m = settings.metrics
        self.spike_monitors = [SpikeMonitor(m.spike_window, m.spike_factor, m.spike_min_excess) for _ in members]
        levels = atlas_by_place(shelf_atlas(spec.n_digits, spec.base, spec.order, spec.task))
        self.exit_monitors = [ShelfExitMonitor(levels) for _ in members]
        self.resume_states = resume_states if resume_states and any(resume_states) else None
        self.start_step = self.resume_states[0]["step"] if self.resume_states else 0
        self.finished = False
        self.last_evaluated: int | None = None  # the step of the last held-out evaluation
        self.publishing = False  # inside training_step: evaluations reach trainer.callback_metrics
        self.train_step: TrainStep | None = None  # made when the fit starts, on the job's device
        self.last_train_loss: float | None = None  # member 0's, shown by the progress bar
        # Members of an ensemble that diverged: member -> why. They train on (their numbers never mix
        # with the others') but log and save nothing more; a single run raises Divergence instead.
        self.failed: dict[int, str] = {}
        self.restore_history(history or [[] for _ in members], confusions or [[] for _ in members])

    # -- setup -------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.settings.optimizer
        return StackedAdamW(
            self.model.parameters(),
            lr=[m.lr for m in self.members],
            weight_decay=[m.weight_decay for m in self.members],
            betas=tuple(o.betas),
            eps=o.eps,
            warmup_steps=o.warmup_steps,
        )

    def on_fit_start(self) -> None:
        self.build_data()
        self.build_step()

    def build_data(self) -> None:
        """The members' training streams, the validation and carry sets, on the module's device."""
        d, device = self.settings.data, self.device
        self.streams, val_sets = [], []
        for m in self.members:
            train, val = validation_tokens(
                self.spec, d.val_size, d.val_seed, d.train_size, m.data_seed, with_train=True
            )
            if train is None:
                self.streams.append(InfiniteBatches(self.spec, d.batch_size, m.data_seed, device))
            else:
                self.streams.append(FiniteBatches(train.to(device), d.batch_size, m.data_seed, self.spec))
            val_sets.append(val)
        self.val_tokens = torch.stack(val_sets).to(device)  # (K, V, T)
        self.first_nonfinite = torch.full((len(self.members),), -1, dtype=torch.long, device=device)
        mc = self.settings.metrics
        self.carry_sets = CarrySets.build(self.spec, mc.carry_set_size, mc.chain_set_size).to(device)

    def build_step(self) -> None:
        """The training step, after the resumed state is loaded; Lightning's step counter set to match."""
        if self.settings.trainer.compile:
            # Compiled code is cached per code object, and every fit compiles the same function for
            # a new model: without a reset, a process that trains more stacks than dynamo's recompile
            # limit (the ensemble launcher, a reused worker, a benchmark) would fail. One process
            # trains one stack at a time, so nothing compiled for an earlier stack is needed again.
            torch._dynamo.reset()
            stats = compiled_place_stats(self.model, self.spec)
        else:
            stats = partial(place_stats, self.model, spec=self.spec)
        if self.resume_states:
            self.load_resume_states(self.resume_states)
        self.opt.param_groups[0]["lr"] = self.opt.host_lr(self.start_step)
        self.train_step = TrainStep(
            self.model,
            stats,
            self.opt,
            self.next_batch,
            [s.generator for s in self.streams],
            self.first_nonfinite,
            self.grad_keys,
            capture=self.settings.trainer.cuda_graph,
        )
        lightning_steps(self.trainer, self.start_step)

    def on_fit_end(self) -> None:
        self.release_step()

    def release_step(self) -> None:
        """Free a CUDA graph and its memory pool now (also after a failed or pre-empted fit), so the next
        stack of a process starts from the memory the previous one found."""
        if self.train_step is not None:
            self.train_step.release()

    def restore_history(self, history: list[list[dict]], confusions: list[list[tuple[int, Any]]]) -> None:
        """Rows and confusion matrices logged before the resume step; the spike detector continues."""
        for k, rows in enumerate(history):
            rows = [r for r in rows if r["step"] < self.start_step]
            self.history += [{"member": k, **r} for r in rows]
            for r in rows:
                if "train/loss" in r:
                    self.spike_monitors[k].update(r["step"], r["train/loss"])
                    self.exit_monitors[k].update(r["step"], place_losses(r))
        # Members evaluate at the same steps; a member without a matrix at a step (none saved) gets NaN.
        by_member = [{int(step): torch.as_tensor(c) for step, c in member} for member in confusions]
        steps = sorted({step for member in by_member for step in member if step < self.start_step})
        for step in steps:
            shape = next(m[step] for m in by_member if step in m).shape
            nan = torch.full(shape, float("nan"))
            self.confusions.append((step, torch.stack([m.get(step, nan) for m in by_member])))

    @torch.no_grad()
    def load_resume_states(self, states: list[dict]) -> None:
        """Continue exactly where the checkpoints stopped: weights, optimiser moments and data streams."""
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            p.copy_(torch.stack([st["model"][name] for st in states]).to(p.device))
            moments = [st["optimizer"]["moments"].get(name) for st in states]
            if all(m is not None for m in moments):
                self.opt.state[p] = {
                    key: torch.stack([m[key] for m in moments]).to(p.device) for key in ("exp_avg", "exp_avg_sq")
                }
        self.opt.step_count = states[0]["optimizer"]["step_count"]  # the device counter
        for stream, st in zip(self.streams, states, strict=True):
            notice = stream.load_state_dict(st["data"], st["step"])
            if notice is not None:
                log.warning("resuming: %s", notice)

    @property
    def opt(self) -> StackedAdamW:
        return self.optimizers().optimizer

    # -- the hot loop ------------------------------------------------------------------------
    def train_dataloader(self) -> Ticks:
        return Ticks(self)

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

    def next_batch(self) -> torch.Tensor:
        return stacked_batch(self.streams)  # (K, B, T)

    def optimizer_step_once(self) -> None:
        """One optimiser step of the stack, then its rows, the callbacks' hooks and any evaluation due."""
        t, step = self.settings.trainer, self.global_step
        logging = step % t.log_every_n_steps == 0
        # One copy per stacked tensor (not per member), for the spike snapshots of callbacks: the weights
        # that gave this step's logged losses.
        weights = self.stacked_weights() if logging and self.wants("on_train_log_step") else None
        metrics = self.train_step(logging)
        lightning_steps(self.trainer, step + 1)
        self.opt.param_groups[0]["lr"] = self.opt.host_lr(step + 1)  # what Lightning's LearningRateMonitor reads
        self.after_update(step, metrics, weights)
        if step + 1 == t.max_steps:
            self.finish()
        else:
            self.evaluate_if_due(step + 1)

    def evaluate_if_due(self, step: int) -> None:
        if step % self.settings.trainer.val_every_n_steps == 0 or step % self.settings.metrics.every_n_steps == 0:
            self.validate(step)

    def after_update(self, step: int, metrics: dict[str, torch.Tensor] | None, weights: dict | None) -> None:
        """After update ``step``: emit its train ``metrics`` (at a logging step) and call the callbacks."""
        if metrics is not None:
            row = self.emit(metrics, step)
            if row is not None:
                self.publish({key: row[key] for key in PUBLISHED_TRAIN_KEYS if key in row})
            new_spikes, new_exits = self.check_spikes(step), self.check_exits(step)
            self.call_hooks("on_train_log_step", step, weights, new_spikes, new_exits)
        self.call_hooks("on_optimizer_step_end", step + 1)

    def publish(self, row: dict[str, float]) -> None:
        """Member 0's values into ``trainer.callback_metrics`` (for EarlyStopping, ModelCheckpoint and the
        progress bar), not to the loggers: they already have them."""
        if self.publishing and row:
            self.log_dict(row, on_step=True, on_epoch=False, logger=False, batch_size=1)

    @torch.no_grad()
    def validate(self, step: int, final: bool = False) -> None:
        t, mc = self.settings.trainer, self.settings.metrics
        self.last_evaluated = step
        stats = place_stats(self.model, self.val_tokens, self.spec)
        if step % t.val_every_n_steps == 0 or final:
            row = self.emit(place_metric_dict(stats, "val"), step)
            if row is not None:
                self.publish(row)
            self.call_hooks("on_validation_rows", step)
        if step % mc.every_n_steps == 0 or final:
            metrics = naive_sum_metric_dict(stats, self.val_tokens, self.spec, "val")
            # One pass over the carry sets serves the carry metrics (its logits) and the probes (its stream).
            resid = None
            if self.carry_sets.slices:  # none for a task without carries
                resid = self.model.residual(self.carry_sets.tokens[:, :-1], last=self.spec.n_places)
                metrics.update(carry_metric_dict(self.model, self.carry_sets, self.spec, self.model.logits(resid)))
            if mc.mechanism:
                sample = self.val_tokens[:, :MECHANISM_EXAMPLES]
                metrics.update(mechanism_metric_dict(self.model, sample, self.carry_sets, self.spec, resid))
            row = self.emit(metrics, step)
            if row is not None:
                self.publish(row)
            confusion = confusion_matrices(stats).cpu()
            self.confusions.append((step, confusion))
            self.call_hooks("on_confusion", step, confusion)

    def check_spikes(self, step: int) -> list[tuple[int, Spike]]:
        """Feed each member's train loss at a logging step to its spike detector; the new spikes."""
        found = []
        for k, monitor in enumerate(self.spike_monitors):
            if k in self.failed:
                continue
            row = next(r for r in reversed(self.history) if r["member"] == k and r["step"] == step)
            spike = monitor.update(step, row["train/loss"])
            if spike is not None:
                found.append((k, spike))
        return found

    def check_exits(self, step: int) -> list[tuple[int, ShelfExit]]:
        """Feed each member's per-place train losses at a logging step to its shelf-exit monitor."""
        found = []
        for k, monitor in enumerate(self.exit_monitors):
            if k not in self.failed:
                row = next(r for r in reversed(self.history) if r["member"] == k and r["step"] == step)
                found += [(k, e) for e in monitor.update(step, place_losses(row))]
        return found

    @property
    def shelf_exits(self) -> list[tuple[int, ShelfExit]]:
        """``(member, exit)`` for every shelf a place has left so far."""
        return [(k, e) for k, m in enumerate(self.exit_monitors) if k not in self.failed for e in m.exits]

    @property
    def spikes(self) -> list[tuple[int, Spike]]:
        """``(member, spike)`` for every spike so far (a resumed run's earlier ones included), each at its peak."""
        return [(k, s) for k, m in enumerate(self.spike_monitors) if k not in self.failed for s in m.spikes]

    def finish(self) -> None:
        """The final evaluation, once: at ``max_steps``, or where a callback stopped training (callbacks'
        end-of-run files come after it)."""
        if not self.finished:
            step = self.global_step
            if self.last_evaluated != step or step == self.settings.trainer.max_steps:
                self.validate(step, final=True)
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

    def fail_member(self, k: int, message: str) -> None:
        """Stop member k (or the run, if it is alone or the last one left): ``Divergence(message)``."""
        if len(self.members) == 1 or len(self.failed) + 1 == len(self.members):
            raise Divergence(message)
        self.failed[k] = message
        self.call_hooks("on_member_failed", k, message)

    # -- leaving the device ------------------------------------------------------------------
    def emit(self, metrics: dict[str, torch.Tensor], step: int) -> dict[str, float] | None:
        """Copy ``(K,)`` metrics to the host in one transfer and send member k's values to its loggers;
        member 0's row (None if it has failed)."""
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float() for k in keys] + [self.first_nonfinite.float()])
        values = values.cpu().tolist()  # (M + 1, K)
        first_row = None
        for k, member in enumerate(self.members):
            if k in self.failed:
                continue
            row = {key: values[i][k] for i, key in enumerate(keys)}
            bad = [key for key, v in row.items() if not math.isfinite(v)]
            first = int(values[-1][k])
            if bad or first >= 0:
                what = f"{bad[0]}={row[bad[0]]}" if bad else "train/loss"
                since = f", first non-finite loss at step {first}" if first >= 0 else ""
                self.fail_member(
                    k,
                    f"step {step}: non-finite {what}{since} (seed {member.seed}, {member.job_dir.name}); "
                    "the last good checkpoint is kept",
                )
                continue
            self.history.append({"member": k, "step": step, **row})
            for logger in member.loggers:
                logger.log_metrics(row, step=step)
            if k == 0:
                first_row = row
        if "train/loss" in metrics:  # for the progress bar, a host value
            self.last_train_loss = values[keys.index("train/loss")][0]
        return first_row

    def stacked_weights(self) -> dict[str, torch.Tensor]:
        """A copy of every stacked tensor ``(K, ...)`` (members are sliced only when one is saved)."""
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def checkpoint_header(self, k: int, step: int) -> dict:
        return {
            "task": asdict(self.spec),
            "model_config": self.model_cfg.to_dict(),
            "config": self.members[k].config,
            "step": step,
            "wandb_run_id": self.members[k].wandb_run_id,
            "wandb_name": self.members[k].wandb_name,
            "wandb_group": self.members[k].wandb_group,
        }

    def resumable_states(self, step: int) -> list[dict | None]:
        """Everything member k needs to continue exactly: weights, optimiser moments, data stream.

        A member whose weights or optimiser moments are not all finite is failed (``fail_member``;
        a single run raises ``Divergence``) and gets ``None``: a diverged model never replaces the last
        good checkpoint (one host sync, at checkpoint steps only).
        """
        opt_state = self.opt.state
        params = dict(self.model.named_parameters())
        checked = [(f"weights in {n}", p) for n, p in params.items()]
        checked += [
            (f"optimizer state {key} of {n}", opt_state[p][key])
            for n, p in params.items()
            if p in opt_state
            for key in ("exp_avg", "exp_avg_sq")
        ]
        finite = torch.stack([t.detach().isfinite().flatten(1).all(1) for _, t in checked]).cpu()  # (tensors, K)
        for k in range(len(self.members)):
            if k not in self.failed and not bool(finite[:, k].all()):
                first = checked[int((~finite[:, k]).nonzero()[0])][0]
                member = self.members[k]
                where = f" (seed {member.seed}, {member.job_dir.name})" if len(self.members) > 1 else ""
                self.fail_member(k, f"step {step}: non-finite {first}{where}; the last good checkpoint is kept")
        # One device-to-host copy per stacked tensor; members are sliced (and cloned) on the host.
        weights = {name: t.detach().cpu() for name, t in self.model.state_dict().items()}
        moments = {
            name: {key: opt_state[p][key].detach().cpu() for key in ("exp_avg", "exp_avg_sq")}
            for name, p in params.items()
            if p in opt_state
        }
        states: list[dict | None] = []
        for k in range(len(self.members)):
            if k in self.failed:
                states.append(None)
                continue
            states.append(
                {
                    **self.checkpoint_header(k, step),
                    "model": member_weights(weights, k),
                    "optimizer": {
                        "step_count": step,
                        "moments": {name: member_weights(m, k) for name, m in moments.items()},
                    },
                    "data": self.streams[k].state_dict(),
                }
            )
        return states


# The train values published to ``trainer.callback_metrics`` at each logging step (every evaluation
# publishes all of its values): a few keys, since each ``self.log`` costs more than a GPU step.
PUBLISHED_TRAIN_KEYS = ("train/loss", "train/acc")


class Ticks:
    """Lightning's batches: each is a number of optimiser steps to take, ``trainer.steps_per_call`` or
    fewer before an evaluation or the end. An epoch ends at each held-out evaluation
    (``trainer.val_every_n_steps``), so Lightning's epoch-end callbacks see its metrics."""

    def __init__(self, module: AdditionModule):
        self.module = module

    def __iter__(self) -> Iterator[int]:
        t = self.module.settings.trainer
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


def place_losses(row: dict) -> dict[int, float]:
    """``place -> train loss`` of a logged row."""
    prefix = "train/loss/place_"
    return {int(key[len(prefix) :]): v for key, v in row.items() if key.startswith(prefix)}


def member_weights(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Member k of stacked weights, as a single model's state dict."""
    return {name: t[k].clone() for name, t in stacked.items()}  # a clone: a saved view would store all K
