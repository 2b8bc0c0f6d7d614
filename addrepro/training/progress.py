"""The progress bar: optimiser steps out of ``trainer.max_steps``, one bar for the whole run.

Lightning's own bar counts batches per epoch; here a batch is a tick of several optimiser steps and
an epoch the stretch between two evaluations, so it would restart at every evaluation. This is a
Lightning ``ProgressBar`` of its own instead: it reads ``trainer.global_step``, starts where a resumed
run stopped and redraws once per ``refresh_steps`` (a redraw costs more than a step of these models).
"""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar
from tqdm import tqdm


class StepProgressBar(ProgressBar):
    def __init__(self, refresh_steps: int = 10):
        super().__init__()
        self.refresh_steps = refresh_steps
        self.enabled = True
        self.bar: tqdm | None = None
        self.drawn_at = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self.drawn_at = trainer.global_step
        self.bar = tqdm(
            total=trainer.max_steps,
            initial=step,  # a resumed run starts at its checkpoint's step, and its speed is measured from there
            desc="step",
            disable=not self.enabled,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0.1,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.bar is not None and (step - self.drawn_at >= self.refresh_steps or step >= trainer.max_steps):
            self.bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.bar.update(step - self.drawn_at)
            self.drawn_at = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # a failed or pre-empted run leaves no half-drawn bar behind

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The last logged train loss (member 0's, for a stack), from ``trainer.callback_metrics``."""
        loss = trainer.callback_metrics.get("train/loss")
        return {"loss": f"{float(loss):.4g}"} if loss is not None else {}
