"""The LightningModule: K stacked models trained on addition, with per-place metrics.

Each Lightning "batch" is a tick that runs ``steps_per_call`` optimiser steps; batches are drawn on
the device inside the step, so there is no DataLoader. Metrics stay on the device as ``(K,)``
tensors and are copied to the host once per logging step, so steps that do not log never
synchronise with the device. Steps are counted in optimiser steps: the metrics at step t describe
the model after t updates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from addrepro.metrics.carry import carry_metric_dict
from addrepro.metrics.confusion import confusion_matrices
from addrepro.metrics.grad_norms import grad_norm_keys, grad_norms
from addrepro.metrics.naive_sum import naive_sum_metric_dict
from addrepro.metrics.place import compiled_place_stats, place_metric_dict, place_stats
from addrepro.model.optim import StackedAdamW
from addrepro.model.transformer import ModelConfig, Transformer
from addrepro.rundir.checkpoints import checkpoint_steps, save_checkpoint
from addrepro.shelves.spikes import Spike, SpikeMonitor
from addrepro.task.encoding import encode, sample_operands
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec
from addrepro.task.streams import FiniteBatches, InfiniteBatches, split_train_heldout, stacked_batch


class Divergence(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step and the quantity."""


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
class TrainSettings:
    max_steps: int = 3000
    batch_size: int | None = 64  # None: full batch (finite data only)
    train_size: int | None = None
    val_size: int = 2048
    val_seed: int = 1000003
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 10
    log_every_n_steps: int = 10
    val_every_n_steps: int = 100
    ckpt_steps: tuple[int, ...] = ()
    steps_per_call: int = 1
    compile: bool = False  # torch.compile the training forward and backward (CUDA graphs on CUDA)
    metrics_every_n_steps: int = 100  # naive-sum, carry-conditioned and confusion metrics
    carry_set_size: int = 128
    chain_set_size: int = 64
    spike_window: int = 50
    spike_factor: float = 3.0


class AdditionModule(pl.LightningModule):
    def __init__(
        self,
        spec: TaskSpec,
        model_cfg: ModelConfig,
        members: list[Member],
        settings: TrainSettings,
        resume_states: list[dict | None] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.spec, self.model_cfg, self.members, self.settings = spec, model_cfg, members, settings
        self.model = Transformer(model_cfg, seeds=[m.seed for m in members])
        self.grad_keys = grad_norm_keys(self.model)
        self.streams: list[InfiniteBatches] = []
        self.val_tokens: torch.Tensor | None = None
        self.ckpt_steps = set(settings.ckpt_steps)
        self.history: list[dict] = []  # host copies of logged rows, for plots at the end
        self.confusions: list[tuple[int, torch.Tensor]] = []  # (step, (K, n+1, base, base)) on the host
        self.spike_monitors = [SpikeMonitor(settings.spike_window, settings.spike_factor) for _ in members]
        self.spikes: list[tuple[int, Spike]] = []  # (member, spike)
        self._snapshot: tuple[int, dict] | None = None  # stacked weights at the previous logging step
        self._spikes_awaiting_after: list[tuple[int, int]] = []  # (member, spike step)
        self.resume_states = resume_states if resume_states and any(resume_states) else None
        self.start_step = self.resume_states[0]["step"] if self.resume_states else 0

    # -- setup -------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.settings
        return StackedAdamW(
            self.model.parameters(),
            lr=[m.lr for m in self.members],
            weight_decay=[m.weight_decay for m in self.members],
            betas=s.betas,
            eps=s.eps,
            warmup_steps=s.warmup_steps,
        )

    def on_fit_start(self) -> None:
        s, device = self.settings, self.device
        self.streams, val_sets = [], []
        for m in self.members:
            if s.train_size is None:
                self.streams.append(InfiniteBatches(self.spec, s.batch_size, m.data_seed, device))
                g = torch.Generator().manual_seed(s.val_seed)
                val_sets.append(encode(*sample_operands(self.spec, s.val_size, g), self.spec))
            else:
                train, heldout = split_train_heldout(self.spec, s.train_size, s.val_size, m.data_seed)
                self.streams.append(FiniteBatches(train.to(device), s.batch_size, m.data_seed, self.spec))
                val_sets.append(heldout)
        self.val_tokens = torch.stack(val_sets).to(device)  # (K, V, T)
        self.first_nonfinite = torch.full((len(self.members),), -1, dtype=torch.long, device=device)
        self.carry_sets = CarrySets.build(self.spec, s.carry_set_size, s.chain_set_size).to(device)
        self.train_stats = (
            compiled_place_stats(self.model, self.spec)
            if s.compile
            else lambda tokens: place_stats(self.model, tokens, self.spec)
        )
        if self.resume_states:
            self.load_resume_states(self.resume_states)
        elif 0 in self.ckpt_steps:
            self.save_checkpoints("step_0.ckpt", 0)

    @torch.no_grad()
    def load_resume_states(self, states: list[dict]) -> None:
        """Continue exactly where the checkpoints stopped: weights, optimiser moments, data streams, history."""
        from addrepro.rundir.confusion import load_confusion
        from addrepro.rundir.metrics_file import load_rows

        params = dict(self.model.named_parameters())
        for name, p in params.items():
            p.copy_(torch.stack([st["model"][name] for st in states]).to(p.device))
            moments = [st["optimizer"]["moments"].get(name) for st in states]
            if all(m is not None for m in moments):
                self.opt.state[p] = {
                    key: torch.stack([m[key] for m in moments]).to(p.device) for key in ("exp_avg", "exp_avg_sq")
                }
        self.opt.step_count = states[0]["optimizer"]["step_count"]
        for stream, st in zip(self.streams, states, strict=True):
            stream.load_state_dict(st["data"])
        start = self.start_step
        for k, m in enumerate(self.members):
            rows = [r for r in load_rows(m.job_dir) if r["step"] < start]
            self.history += [{"member": k, **r} for r in rows]
            for r in rows:  # the spike detector continues with the same window
                if "train/loss" in r:
                    self.spike_monitors[k].update(r["step"], r["train/loss"])
            confusion = load_confusion(m.job_dir)
            if confusion is not None and k == 0:
                self.confusions = [
                    (int(step), torch.stack([torch.from_numpy(c)] * len(self.members)))
                    for step, c in zip(*confusion, strict=True)
                    if step < start
                ]

    @property
    def opt(self) -> StackedAdamW:
        return self.optimizers().optimizer

    # -- the hot loop ------------------------------------------------------------------------
    def training_step(self, batch: int, batch_idx: int) -> None:
        remaining = self.settings.max_steps - self.opt.step_count
        for _ in range(min(self.settings.steps_per_call, remaining)):
            self.train_one_step()

    def next_batch(self) -> torch.Tensor:
        return stacked_batch(self.streams)  # (K, B, T)

    def train_one_step(self) -> None:
        s, step = self.settings, self.opt.step_count
        if step % s.val_every_n_steps == 0 or step % s.metrics_every_n_steps == 0:
            self.validate(step)
        stats = self.train_stats(self.next_batch())
        lightning_opt = self.optimizers()
        lightning_opt.zero_grad(set_to_none=True)
        # Summing member losses keeps every member's gradient exactly its own mean loss's gradient.
        self.manual_backward(stats.loss.sum())
        # Remember, on the device, the first step whose loss was not finite (reported at the next log).
        bad = ~stats.loss.detach().isfinite()
        self.first_nonfinite = torch.where(bad & (self.first_nonfinite < 0), step, self.first_nonfinite)
        logging = step % s.log_every_n_steps == 0
        if logging:
            metrics = place_metric_dict(stats, "train")
            metrics.update({f"train/{k}": v for k, v in grad_norms(self.model, self.grad_keys).items()})
            metrics["train/lr"] = self.opt.current_lr()
            # One copy per stacked tensor (not per member): members are sliced only if a spike needs them.
            candidate = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        # With trainer.compile on CUDA the gradients live in the CUDA graph's memory: everything that
        # reads them (grad norms above, the optimiser here) must do so before the next forward pass.
        lightning_opt.step()
        if logging:
            self.emit(metrics, step)
            self.check_spikes(step, candidate)
        if step + 1 in self.ckpt_steps:
            self.save_checkpoints(f"step_{step + 1}.ckpt", step + 1)

    @torch.no_grad()
    def validate(self, step: int, final: bool = False) -> None:
        s = self.settings
        stats = place_stats(self.model, self.val_tokens, self.spec)
        if step % s.val_every_n_steps == 0 or final:
            self.emit(place_metric_dict(stats, "val"), step)
            self.flush_metrics()
        if step % s.metrics_every_n_steps == 0 or final:
            metrics = naive_sum_metric_dict(stats, self.val_tokens, self.spec, "val")
            metrics.update(carry_metric_dict(self.model, self.carry_sets, self.spec))
            self.emit(metrics, step)
            confusion = confusion_matrices(stats).cpu()
            self.confusions.append((step, confusion))
            self.log_confusion_images(step, confusion)

    def log_confusion_images(self, step: int, confusion: torch.Tensor) -> None:
        """Confusion matrices as one W&B image per member (places side by side, carry-out first)."""
        from pytorch_lightning.loggers import WandbLogger

        for k, m in enumerate(self.members):
            for logger in m.loggers:
                if isinstance(logger, WandbLogger):
                    import wandb

                    image = confusion_image(confusion[k])
                    logger.experiment.log(
                        {"val/confusion": wandb.Image(image, caption=f"step {step}: rows true digit, cols predicted; "
                                                      "places carry-out .. units"),
                         "trainer/global_step": step}
                    )

    def check_spikes(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        """Keep the weights just before, at and just after a loss spike (logging steps), to study it later."""
        for k, spike_step in self._spikes_awaiting_after:
            self.save_weights(k, f"spike_{spike_step}_after.ckpt", step, member_weights(weights, k))
        self._spikes_awaiting_after = []
        for k, monitor in enumerate(self.spike_monitors):
            row = next(r for r in reversed(self.history) if r["member"] == k and r["step"] == step)
            spike = monitor.update(step, row["train/loss"])
            if spike is not None:
                self.spikes.append((k, spike))
                if self._snapshot is not None:
                    before_step, before = self._snapshot
                    self.save_weights(k, f"spike_{step}_before.ckpt", before_step, member_weights(before, k))
                self.save_weights(k, f"spike_{step}_at.ckpt", step, member_weights(weights, k))
                self._spikes_awaiting_after.append((k, step))
        self._snapshot = (step, weights)

    def on_train_end(self) -> None:
        self.validate(self.opt.step_count, final=True)
        self.save_checkpoints("last.ckpt", self.opt.step_count)
        self.flush_metrics()

    def flush_metrics(self) -> None:
        """Write the metrics file now, so a killed run keeps its metrics up to the last evaluation."""
        for m in self.members:
            for logger in m.loggers:
                logger.save()

    # -- leaving the device ------------------------------------------------------------------
    def emit(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Copy ``(K,)`` metrics to the host in one transfer and send member k's values to its loggers."""
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float() for k in keys] + [self.first_nonfinite.float()])
        values = values.cpu().tolist()  # (M + 1, K)
        for k, member in enumerate(self.members):
            row = {key: values[i][k] for i, key in enumerate(keys)}
            bad = [key for key, v in row.items() if not math.isfinite(v)]
            first = int(values[-1][k])
            if bad or first >= 0:
                what = f"{bad[0]}={row[bad[0]]}" if bad else "train/loss"
                since = f", first non-finite loss at step {first}" if first >= 0 else ""
                raise Divergence(
                    f"step {step}: non-finite {what}{since} (seed {member.seed}, {member.job_dir.name}); "
                    "the last good checkpoint is kept"
                )
            self.history.append({"member": k, "step": step, **row})
            for logger in member.loggers:
                logger.log_metrics(row, step=step)
        if "train/loss" in metrics and self._trainer is not None:  # the progress bar
            self.log("loss", values[keys.index("train/loss")][0], prog_bar=True, logger=False)

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

    def save_weights(self, k: int, filename: str, step: int, weights: dict) -> None:
        """A weights-only checkpoint (enough for analysis, not for resuming)."""
        payload = {**self.checkpoint_header(k, step), "model": {n: t.cpu() for n, t in weights.items()}}
        save_checkpoint(self.members[k].job_dir / "checkpoints" / filename, payload)

    def save_checkpoints(self, filename: str, step: int) -> None:
        # A diverged model must never replace the last good checkpoint (one sync, at save steps only).
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        if not bool(finite):
            bad = next(n for n, p in self.model.named_parameters() if not p.detach().isfinite().all())
            raise Divergence(f"step {step}: non-finite weights in {bad}; not saving {filename}")
        opt_state = self.opt.state
        params = dict(self.model.named_parameters())
        for k, m in enumerate(self.members):
            moments = {
                name: {key: opt_state[p][key][k].detach().cpu().clone() for key in ("exp_avg", "exp_avg_sq")}
                for name, p in params.items()
                if p in opt_state
            }
            save_checkpoint(
                m.job_dir / "checkpoints" / filename,
                {
                    **self.checkpoint_header(k, step),
                    "model": {n: t.cpu() for n, t in self.model.member_state_dict(k).items()},
                    "optimizer": {"step_count": self.opt.step_count, "moments": moments},
                    "data": self.streams[k].state_dict(),
                },
            )


def member_weights(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Member k of stacked weights, as a single model's state dict."""
    return {name: t[k].clone() for name, t in stacked.items()}  # a clone: a saved view would store all K


def settings_from_config(cfg) -> TrainSettings:  # noqa: ANN001 - a DictConfig
    t = cfg.trainer
    return TrainSettings(
        max_steps=t.max_steps,
        batch_size=cfg.data.batch_size,
        train_size=cfg.data.train_size,
        val_size=cfg.data.val_size,
        val_seed=cfg.data.val_seed,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        warmup_steps=cfg.optimizer.warmup_steps,
        log_every_n_steps=t.log_every_n_steps,
        val_every_n_steps=t.val_every_n_steps,
        ckpt_steps=tuple(checkpoint_steps(t.max_steps, t.ckpt_schedule, t.ckpt_every_n_steps, t.ckpt_log_count)),
        steps_per_call=t.steps_per_call,
        compile=t.compile,
        metrics_every_n_steps=cfg.metrics.every_n_steps,
        carry_set_size=cfg.metrics.carry_set_size,
        chain_set_size=cfg.metrics.chain_set_size,
        spike_window=cfg.metrics.spike_window,
        spike_factor=cfg.metrics.spike_factor,
    )


def task_spec_from_config(cfg) -> TaskSpec:  # noqa: ANN001
    d = cfg.data
    return TaskSpec(n_digits=d.n_digits, base=d.base, order=d.order, task=d.task)


def model_config_from_config(cfg, spec: TaskSpec) -> ModelConfig:  # noqa: ANN001
    m = cfg.model
    return ModelConfig(
        d_vocab=spec.d_vocab,
        d_vocab_out=spec.base,
        n_ctx=spec.seq_len - 1,
        d_model=m.width,
        n_layers=m.depth,
        n_heads=m.n_heads,
        d_head=m.d_head or m.width // m.n_heads,
        d_mlp=m.d_mlp or 4 * m.width,
        act_fn=m.act_fn,
        normalization=m.normalization,
        attn_only=m.attn_only,
        init=m.init,
        init_std=m.init_std,
    )


def confusion_image(confusion: torch.Tensor, scale: int = 8) -> np.ndarray:
    """Greyscale tiles of ``(n+1, base, base)`` probabilities, carry-out first; NaN rows drawn mid-grey."""
    import numpy as np

    tiles = []
    for j in range(confusion.shape[0] - 1, -1, -1):
        tile = confusion[j].nan_to_num(0.5).clamp(0, 1).numpy()
        tile = np.kron(1.0 - tile, np.ones((scale, scale)))  # dark = high probability
        tiles += [tile, np.ones((tile.shape[0], scale))]
    return (np.concatenate(tiles[:-1], axis=1) * 255).astype(np.uint8)
