"""The progress bar, in optimiser steps.

Lightning counts its own steps, and each runs ``trainer.steps_per_call`` optimiser steps, so its bar
would read 300/300 for a 3000-step run. This bar counts optimiser steps, starts where a resumed run
stopped and redraws about once per logging step (a redraw costs more than a step of these models).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar, module = self.train_progress_bar, trainer.lightning_module
        step = module.opt.step_count
        # Lightning's reset above restarted the bar's clock; a resumed run starts at its checkpoint's step
        # (never drawn at 0 first), and its speed is measured from there.
        bar.total = module.settings.trainer.max_steps
        bar.set_description("step", refresh=False)
        bar.initial = bar.n = bar.last_print_n = step
        self._show(step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        batch_idx = args[-1]
        step, total = pl_module.opt.step_count, self.train_progress_bar.total
        if (batch_idx + 1) % self.refresh_rate == 0 or step >= total:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self._show(step)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None:
            metrics["loss"] = f"{loss:.4g}"
        return metrics

    def _show(self, step: int) -> None:
        bar = self.train_progress_bar
        bar.n = step
        if not bar.disable:
            bar.refresh()
