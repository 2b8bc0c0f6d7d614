"""What a run records, member by member: rows, confusion matrices, spikes, shelf exits and failures.

The recorder turns ``(K,)`` device metrics into host rows in one transfer, sends member k's row to
member k's loggers, keeps host copies for the end-of-run reports, feeds the spike and shelf-exit
detectors, and applies the failure policy: a member whose numbers turn non-finite is stopped (its
numbers never mix with the others', so the rest train on); a single run, or the last member left,
raises ``Divergence``. It writes no files: the callbacks do, from what it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger

from addrepro.rundir.loggers import close_loggers
from addrepro.shelves.atlas import atlas_by_place, shelf_atlas
from addrepro.shelves.exits import ShelfExit, ShelfExitMonitor
from addrepro.shelves.spikes import Spike, SpikeMonitor
from addrepro.task.spec import TaskSpec
from addrepro.training.config import MetricsConfig


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


class Recorder:
    """The rows of ``members``, continuing from ``history`` and ``confusions`` (per member, what a resumed
    run had logged before ``start_step``). ``on_failed(k, message)`` is told when member k is stopped."""

    def __init__(
        self,
        members: list[Member],
        spec: TaskSpec,
        metrics: MetricsConfig,
        start_step: int = 0,
        history: list[list[dict]] | None = None,
        confusions: list[list[tuple[int, Any]]] | None = None,
        on_failed: Callable[[int, str], None] = lambda k, message: None,
    ):
        self.members, self.start_step, self.on_failed = members, start_step, on_failed
        self.history: list[dict] = []  # host copies of logged rows, each with its "member"
        self.confusions: list[tuple[int, torch.Tensor]] = []  # (step, (K, n+1, base, base)) on the host
        self.spike_monitors = [
            SpikeMonitor(
                metrics.spike_window, metrics.spike_factor, metrics.spike_min_excess, metrics.spike_ratio_alone
            )
            for _ in members
        ]
        levels = atlas_by_place(shelf_atlas(spec.n_digits, spec.base, spec.order, spec.task))
        self.exit_monitors = [ShelfExitMonitor(levels) for _ in members]
        # Members of an ensemble that diverged: member -> why. They train on but log and save nothing more.
        self.failed: dict[int, str] = {}
        self.restore(history or [[] for _ in members], confusions or [[] for _ in members])

    def restore(self, history: list[list[dict]], confusions: list[list[tuple[int, Any]]]) -> None:
        """Rows and confusion matrices logged before the resume step; the detectors continue over them."""
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

    # -- rows --------------------------------------------------------------------------------
    def emit(self, metrics: dict[str, torch.Tensor], step: int, first_nonfinite: torch.Tensor) -> dict | None:
        """Copy ``(K,)`` metrics (and ``first_nonfinite``, the step of each member's first non-finite
        loss) to the host in one transfer; send member k's row to its loggers. Returns member 0's row
        (None once it has failed)."""
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float() for k in keys] + [first_nonfinite.float()])
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
                self.fail(
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
        return first_row

    def add_confusion(self, step: int, confusion: torch.Tensor) -> None:
        self.confusions.append((step, confusion))

    def rows(self, k: int) -> list[dict]:
        """Member k's rows, as its metrics file has them."""
        return [{key: v for key, v in r.items() if key != "member"} for r in self.history if r["member"] == k]

    def final_row(self, k: int) -> dict:
        """Member k's last held-out row ({} if none)."""
        return next((r for r in reversed(self.history) if r["member"] == k and "val/loss" in r), {})

    # -- detectors ---------------------------------------------------------------------------
    def check_spikes(self, step: int) -> list[tuple[int, Spike]]:
        """Feed each member's train loss at a logging step to its spike detector; the new spikes."""
        found = []
        for k, monitor in enumerate(self.spike_monitors):
            if k not in self.failed:
                spike = monitor.update(step, self._row(k, step)["train/loss"])
                if spike is not None:
                    found.append((k, spike))
        return found

    def check_exits(self, step: int) -> list[tuple[int, ShelfExit]]:
        """Feed each member's per-place train losses at a logging step to its shelf-exit monitor."""
        found = []
        for k, monitor in enumerate(self.exit_monitors):
            if k not in self.failed:
                found += [(k, e) for e in monitor.update(step, place_losses(self._row(k, step)))]
        return found

    def _row(self, k: int, step: int) -> dict:
        return next(r for r in reversed(self.history) if r["member"] == k and r["step"] == step)

    @property
    def shelf_exits(self) -> list[tuple[int, ShelfExit]]:
        """``(member, exit)`` for every shelf a place has left so far."""
        return [(k, e) for k, m in enumerate(self.exit_monitors) if k not in self.failed for e in m.exits]

    @property
    def spikes(self) -> list[tuple[int, Spike]]:
        """``(member, spike)`` for every spike so far (a resumed run's earlier ones included), each at its peak."""
        return [(k, s) for k, m in enumerate(self.spike_monitors) if k not in self.failed for s in m.spikes]

    # -- failures and the end ------------------------------------------------------------------
    def fail(self, k: int, message: str) -> None:
        """Stop member k (or the run, if it is alone or the last one left): ``Divergence(message)``."""
        if len(self.members) == 1 or len(self.failed) + 1 == len(self.members):
            raise Divergence(message)
        self.failed[k] = message
        self.on_failed(k, message)

    def close(self, exit_code: int = 0, preempting: bool = False) -> None:
        """Close every member's loggers (W&B runs, TensorBoard writers); a member that diverged alone
        closes as failed."""
        for k, member in enumerate(self.members):
            code = 1 if k in self.failed and exit_code == 0 else exit_code
            close_loggers(member.loggers, code, preempting)


def place_losses(row: dict) -> dict[int, float]:
    """``place -> train loss`` of a logged row."""
    prefix = "train/loss/place_"
    return {int(key[len(prefix) :]): v for key, v in row.items() if key.startswith(prefix)}
