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

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from addrepro.checkpoints import checkpoint_steps, save_checkpoint
from addrepro.data import FiniteBatches, InfiniteBatches, TaskSpec, encode, sample_operands, split_train_heldout
from addrepro.grad_norms import grad_norm_keys, grad_norms
from addrepro.model import ModelConfig, Transformer
from addrepro.optim import StackedAdamW
from addrepro.place_metrics import place_metric_dict, place_stats


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


@dataclass
class TrainSettings:
    max_steps: int = 3000
    batch_size: int = 64
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


class AdditionModule(pl.LightningModule):
    def __init__(self, spec: TaskSpec, model_cfg: ModelConfig, members: list[Member], settings: TrainSettings):
        super().__init__()
        self.automatic_optimization = False
        self.spec, self.model_cfg, self.members, self.settings = spec, model_cfg, members, settings
        self.model = Transformer(model_cfg, seeds=[m.seed for m in members])
        self.grad_keys = grad_norm_keys(self.model)
        self.streams: list[InfiniteBatches] = []
        self.val_tokens: torch.Tensor | None = None
        self.ckpt_steps = set(settings.ckpt_steps)
        self.history: list[dict] = []  # host copies of logged rows, for plots at the end

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

    @property
    def opt(self) -> StackedAdamW:
        return self.optimizers().optimizer

    # -- the hot loop ------------------------------------------------------------------------
    def training_step(self, batch: int, batch_idx: int) -> None:
        remaining = self.settings.max_steps - self.opt.step_count
        for _ in range(min(self.settings.steps_per_call, remaining)):
            self.train_one_step()

    def next_batch(self) -> torch.Tensor:
        return torch.stack([stream.next() for stream in self.streams])  # (K, B, T)

    def train_one_step(self) -> None:
        s, step = self.settings, self.opt.step_count
        if step % s.val_every_n_steps == 0:
            self.validate(step)
        stats = place_stats(self.model, self.next_batch(), self.spec)
        lightning_opt = self.optimizers()
        lightning_opt.zero_grad(set_to_none=True)
        # Summing member losses keeps every member's gradient exactly its own mean loss's gradient.
        self.manual_backward(stats.loss.sum())
        logging = step % s.log_every_n_steps == 0
        if logging:
            metrics = place_metric_dict(stats, "train")
            metrics.update({f"train/{k}": v for k, v in grad_norms(self.model, self.grad_keys).items()})
            metrics["train/lr"] = self.opt.current_lr()
        lightning_opt.step()
        if logging:
            self.emit(metrics, step)
        if step + 1 in self.ckpt_steps:
            self.save_checkpoints(f"step_{step + 1}.ckpt", step + 1)

    @torch.no_grad()
    def validate(self, step: int) -> None:
        stats = place_stats(self.model, self.val_tokens, self.spec)
        self.emit(place_metric_dict(stats, "val"), step)

    def on_train_end(self) -> None:
        self.validate(self.opt.step_count)
        self.save_checkpoints("last.ckpt", self.opt.step_count)
        for m in self.members:
            for logger in m.loggers:
                logger.save()

    # -- leaving the device ------------------------------------------------------------------
    def emit(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Copy ``(K,)`` metrics to the host in one transfer and send member k's values to its loggers."""
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float() for k in keys]).cpu().tolist()  # (M, K)
        for k, member in enumerate(self.members):
            row = {key: values[i][k] for i, key in enumerate(keys)}
            bad = [key for key, v in row.items() if not math.isfinite(v)]
            if bad:
                raise Divergence(f"step {step}: non-finite {bad[0]}={row[bad[0]]} (member seed {member.seed})")
            self.history.append({"member": k, "step": step, **row})
            for logger in member.loggers:
                logger.log_metrics(row, step=step)
        if "train/loss" in metrics:
            self.log("loss", values[keys.index("train/loss")][0], prog_bar=True, logger=False)

    def save_checkpoints(self, filename: str, step: int) -> None:
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
                    "task": asdict(self.spec),
                    "model_config": self.model_cfg.to_dict(),
                    "config": m.config,
                    "step": step,
                    "model": {n: t.cpu() for n, t in self.model.member_state_dict(k).items()},
                    "optimizer": {"step_count": self.opt.step_count, "moments": moments},
                    "data": self.streams[k].state_dict(),
                    "wandb_run_id": m.wandb_run_id,
                },
            )


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
        steps_per_call=t.get("steps_per_call", 1),
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
