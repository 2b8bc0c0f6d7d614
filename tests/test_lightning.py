"""The LightningModule as Lightning users know it: ``global_step`` counts optimiser steps, ``max_steps``
ends training, evaluations reach ``trainer.callback_metrics``, and callbacks come from the config."""

import shutil
from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch
from test_ensemble import config

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train
from addrepro.training.config import ConfigError, validate

PROBE = "+callbacks.probe._target_=test_lightning.StepProbe"


class StepProbe(pl.Callback):
    """A user's callback (made by Hydra from the config): what it sees, kept on the class."""

    seen: ClassVar[list[tuple]] = []

    def on_train_start(self, trainer, pl_module):
        StepProbe.seen.append(("start", trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        StepProbe.seen.append(("batch", trainer.global_step, batch))

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        StepProbe.seen.append(("epoch", trainer.global_step, metrics))

    def on_train_end(self, trainer, pl_module):
        StepProbe.seen.append(("end", trainer.global_step))


def run(job_dir, *overrides, resume_from=None):
    cfg = config(*overrides)  # not validated: on a CPU, trainer.cuda_graph=true runs the step uncaptured here
    plan = JobPlan(cfg, job_dir, job_dir.name, "g", False, resume_from=resume_from)
    job_dir.mkdir(exist_ok=True)
    StepProbe.seen = []
    finals = train([plan])
    return finals[0], load_rows(job_dir)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda_graph"])
def test_a_user_callback_sees_the_optimiser_step_at_every_batch_end_and_at_the_end(tmp_path, one_thread, cuda_graph):
    # 7 does not divide the 20 steps between evaluations: the tick before each evaluation is shorter.
    # On a CPU trainer.cuda_graph runs the same step uncaptured (a GPU captures it).
    overrides = [PROBE, "trainer.steps_per_call=7", "trainer.ckpt_every_n_steps=20"]
    final, rows = run(tmp_path / "job", *overrides, f"trainer.cuda_graph={str(cuda_graph).lower()}")
    seen = StepProbe.seen
    assert seen[0] == ("start", 0) and seen[-1] == ("end", 40)
    assert [s[1:] for s in seen if s[0] == "batch"] == [(7, 7), (14, 7), (20, 6), (27, 7), (34, 7), (40, 6)]
    epochs = [s for s in seen if s[0] == "epoch"]
    assert [e[1] for e in epochs] == [20, 40]  # an epoch ends at each evaluation
    for _, step, metrics in epochs:  # ... and its metrics are the evaluation's, in callback_metrics
        val = next(r for r in rows if r["step"] == step and "val/loss" in r)
        assert metrics["val/loss"] == pytest.approx(val["val/loss"], rel=1e-6)
        assert metrics["val/acc/place_0"] == pytest.approx(val["val/acc/place_0"], rel=1e-6)
        train_row = next(r for r in rows if r["step"] == step - 5 and "train/loss" in r)
        assert metrics["train/loss"] == pytest.approx(train_row["train/loss"], rel=1e-6)  # the last logged
    assert final["step"] == 40

    # A resumed run's global_step starts at its checkpoint's step.
    shutil.copytree(tmp_path / "job", tmp_path / "resumed")
    middle = tmp_path / "resumed" / "checkpoints" / "step_20.ckpt"
    run(tmp_path / "resumed", *overrides, f"resume={middle}", resume_from=middle)
    assert StepProbe.seen[0] == ("start", 20) and StepProbe.seen[-1] == ("end", 40)
    assert [s[1] for s in StepProbe.seen if s[0] == "batch"] == [27, 34, 40]
    assert load_rows(tmp_path / "resumed") == rows


def run_with_early_stopping(job, *overrides):
    """A run that no evaluation can improve by 10 nats: early stopping with patience 1 ends it at the
    second check of its monitor; ModelCheckpoint keeps the best under ``checkpoints/lightning``."""
    return run(
        job,
        "callbacks=[early_stopping,model_checkpoint]",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=10",
        "trainer.max_steps=100",
        "trainer.val_every_n_steps=10",
        *overrides,
    )


def test_early_stopping_stops_a_run_and_model_checkpoint_keeps_the_best(tmp_path, one_thread):
    final, rows = run_with_early_stopping(tmp_path / "job", PROBE)
    assert StepProbe.seen[-1] == ("end", 20)
    assert max(r["step"] for r in rows) == 20 and final["step"] == 20
    last = torch.load(tmp_path / "job" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["step"] == 20 and last["optimizer"]["step_count"] == 20
    (best,) = (tmp_path / "job" / "checkpoints" / "lightning").glob("best-*.ckpt")
    losses = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r and r["step"] in (10, 20)}
    assert best.name == f"best-step={min(losses, key=losses.get)}.ckpt"


def test_early_stopping_on_the_train_loss_and_a_checkpoint_on_a_science_key(tmp_path, one_thread):
    # Keys the config check cannot list (train keys at logging steps, shelf-science keys) work as monitors.
    final, rows = run_with_early_stopping(
        tmp_path / "job",
        "callbacks.early_stopping.monitor=train/loss",
        "callbacks.model_checkpoint.monitor=val/naive/place_1/plus_0",
        "callbacks.model_checkpoint.mode=max",
        "metrics.every_n_steps=10",
    )
    assert max(r["step"] for r in rows) == final["step"] < 100  # stopped by the train loss
    assert list((tmp_path / "job" / "checkpoints" / "lightning").glob("best-*.ckpt"))


def test_the_learning_rate_monitor_logs_the_warmup(tmp_path, one_thread):
    _, rows = run(
        tmp_path / "job", "callbacks=lr_monitor", "optimizer.warmup_steps=20", "optimizer.lr=2e-3",
        "trainer.steps_per_call=5",
    )  # fmt: skip
    logged = {r["step"]: r["lr-StackedAdamW"] for r in rows if "lr-StackedAdamW" in r}
    assert sorted(logged) == list(range(0, 40, 5))  # once per tick, at its first step
    for step, lr in logged.items():
        assert lr == pytest.approx(2e-3 * min(step / 20, 1.0), rel=1e-12, abs=0)
        ours = next(r["train/lr"] for r in rows if r["step"] == step and "train/lr" in r)
        assert lr == pytest.approx(ours, rel=1e-6)  # the device's learning rate, as logged by addrepro


@pytest.mark.parametrize(
    "override,message",
    [
        ("+callbacks.x._target_=nosuchmodule.Thing", "callbacks.x._target_='nosuchmodule.Thing' is invalid"),
        ("+callbacks.x._target_=pytorch_lightning.callbacks.NoSuch", "has no class NoSuch"),
        ("+callbacks.x._target_=Thing", "must name a callback class"),
        ("+callbacks.x.monitor=val/loss", "callbacks.x._target_=None is invalid"),
    ],
)
def test_a_bad_callback_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        validate(config(override))
    assert message in str(info.value)
