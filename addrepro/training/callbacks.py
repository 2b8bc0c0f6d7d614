"""The callbacks that write a run's files; the LightningModule only computes and emits.

Besides Lightning's hooks they answer the module's own, called at the optimiser step they concern
(several optimiser steps run inside one Lightning step):

* ``on_optimizer_step_end(trainer, module, step)`` — after the update that made ``step``;
* ``on_train_log_step(trainer, module, step, weights, new_spikes, new_exits)`` — at a logging step,
  with the stacked weights from before its update (those that gave the logged losses), the spikes
  and shelf exits found there;
* ``on_validation_rows(trainer, module, step)`` — after the held-out rows of ``step`` were emitted;
* ``on_confusion(trainer, module, step, confusion)`` — confusion matrices ``(K, n+1, base, base)``;
* ``on_member_failed(trainer, module, k, message)`` — member k of a stack diverged and stops;
* at the end of a run, in this order (``AdditionModule.on_train_end``), after the final evaluation:
  ``on_last_checkpoint(trainer, module)`` (``last.ckpt``), then ``on_end_of_run_files(trainer, module)``
  (plots and reports, drawn from what the checkpoint covers).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from addrepro.rundir.atomic import atomic_write_text
from addrepro.rundir.checkpoints import save_checkpoint
from addrepro.rundir.confusion import confusion_row, save_confusion
from addrepro.rundir.loggers import log_final_hparams
from addrepro.shelves.spikes import Spike
from addrepro.training.devices import cpu_cores
from addrepro.training.module import AdditionModule
from addrepro.training.stack import member_weights

log = logging.getLogger("addrepro")


def flush_loggers(module: AdditionModule) -> None:
    """Write every member's metrics file now (rows logged so far)."""
    for m in module.members:
        for logger in m.loggers:
            logger.save()


class RunFiles:
    """``confusion.npz``, ``spikes.json`` and ``shelf_exits.json`` of every member, as they stand.

    Written before every checkpoint (and the JSON files, when they changed, at every evaluation), so a
    killed run keeps them up to its last checkpoint, and a resumed run — which reads the confusion
    matrices back and replays the detectors over its rows — ends with an uninterrupted run's files.
    """

    def __init__(self) -> None:
        self.written: dict[Path, str] = {}  # what each JSON file holds now: unchanged ones are not rewritten

    def write(self, module: AdditionModule, confusion: bool = True) -> None:
        window = 5 * module.config.trainer.log_every_n_steps
        for k, member in enumerate(module.members):
            if k in module.recorder.failed:
                continue
            if confusion:
                save_confusion(member.job_dir, [(step, c[k]) for step, c in module.recorder.confusions])
            spikes = [s for member_k, s in module.recorder.spikes if member_k == k]
            if spikes:
                rows = [r for r in module.recorder.history if r["member"] == k and "train/grad_norm/global" in r]
                spikes = [spike_record(s, rows, window) for s in spikes]
            exits = [e.as_dict() for member_k, e in module.recorder.shelf_exits if member_k == k]
            self.write_json(member.job_dir / "spikes.json", json.dumps(spikes, indent=1, sort_keys=True))
            self.write_json(member.job_dir / "shelf_exits.json", json.dumps(exits, indent=1))

    def write_json(self, path: Path, text: str) -> None:
        if self.written.get(path) != text:
            atomic_write_text(path, text)
            self.written[path] = text


def spike_record(spike: Spike, rows: list[dict], window: int) -> dict:
    """A spike with the per-place train losses at its peak and the gradient norms around it (to tell
    an optimiser blow-up from a data fluke)."""
    at = next((r for r in rows if r["step"] == spike.step), {})
    return {
        **spike.as_dict(),
        "place_loss": {key.rsplit("_", 1)[1]: v for key, v in at.items() if key.startswith("train/loss/place_")},
        "grad_norms": [
            {key: v for key, v in r.items() if key == "step" or key.startswith("train/grad_norm/")}
            for r in rows
            if abs(r["step"] - spike.step) <= window
        ],
    }


class Checkpoints(pl.Callback):
    """Resumable checkpoints ``step_<N>.ckpt`` at ``steps`` and ``last.ckpt`` at the end, one file per
    member; weights-only ``weights_<N>.ckpt`` at ``weight_steps`` (for analyses over training).

    The metrics file is written first, so a checkpoint never covers rows that are not on disk.
    """

    def __init__(self, steps: list[int], weight_steps: list[int] = ()):
        self.steps, self.weight_steps = set(steps), set(weight_steps) - set(steps)
        self.files = RunFiles()

    def on_train_start(self, trainer: pl.Trainer, module: AdditionModule) -> None:
        if not module.resume_states:
            self.on_optimizer_step_end(trainer, module, 0)

    def on_optimizer_step_end(self, trainer: pl.Trainer, module: AdditionModule, step: int) -> None:
        # The last step's checkpoint waits for the final evaluation (``on_last_checkpoint``): resuming a
        # finished run evaluates nothing again, so what it resumes from must cover that evaluation.
        if step in self.steps and step < module.config.trainer.max_steps:
            self.save(module, f"step_{step}.ckpt", step)
        elif step in self.weight_steps:
            weights = {name: t.detach().cpu() for name, t in module.model.state_dict().items()}
            for k in range(len(module.members)):
                if k not in module.recorder.failed:
                    save_weights(module, k, f"weights_{step}.ckpt", step, member_weights(weights, k))

    def on_validation_rows(self, trainer: pl.Trainer, module: AdditionModule, step: int) -> None:
        flush_loggers(module)  # a killed run keeps its metrics up to the last evaluation
        self.files.write(module, confusion=False)

    def on_member_failed(self, trainer: pl.Trainer, module: AdditionModule, k: int, message: str) -> None:
        for logger in module.members[k].loggers:  # its rows up to the divergence
            logger.save()

    def on_last_checkpoint(self, trainer: pl.Trainer, module: AdditionModule) -> None:
        step = module.global_step
        if step in self.steps and step >= module.config.trainer.max_steps:
            self.save(module, f"step_{step}.ckpt", step)
        self.save(module, "last.ckpt", step)

    def save(self, module: AdditionModule, filename: str, step: int) -> None:
        states = module.resumable_states(step)
        flush_loggers(module)
        self.files.write(module)
        for member, state in zip(module.members, states, strict=True):
            if state is not None:  # None: a member that diverged
                save_checkpoint(member.job_dir / "checkpoints" / filename, state)


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped where it was asked to
    """The run was asked to stop (SIGTERM, SIGUSR1, Ctrl-C's SIGINT) and wrote a resumable checkpoint first."""

    def __init__(self, signum: int, step: int, filename: str, previous_handler: object = None):
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}; resumable checkpoint checkpoints/{filename} written")
        self.signum, self.step, self.filename, self.previous_handler = signum, step, filename, previous_handler
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal

    def chain(self) -> None:
        """Let the handler that was installed before training see the signal (submitit's requeue); not
        Python's own for Ctrl-C, which would only raise KeyboardInterrupt after the checkpoint."""
        if callable(self.previous_handler) and self.previous_handler is not signal.default_int_handler:
            self.previous_handler(self.signum, None)

    @property
    def verb(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "preempted"


def preemption_signals() -> list[int]:
    """SIGTERM (Slurm's pre-emption and time limit), SIGUSR1 (``sbatch --signal``), and the signal
    submitit requeues on when a submitit job installed its handler for it."""
    signals = [signal.SIGTERM, signal.SIGUSR1]
    submitit = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if submitit is not None and callable(signal.getsignal(submitit)):
        signals.append(submitit)
    return signals


class Preemption(pl.Callback):
    """On a pre-emption signal, or Ctrl-C: finish the optimiser step under way, write ``step_<N>.ckpt``
    (metrics file first, as every checkpoint) and stop by raising ``Preempted``.

    The handlers replace Lightning's for the duration of training (Lightning restores the earlier
    ones afterwards); they only take note, the work happens at the next optimiser step's end. A second
    Ctrl-C stops at once, without a checkpoint (Python's own handler is back after the first).
    """

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.received: int | None = None
        self.signals = [*preemption_signals(), signal.SIGINT]
        self.previous = {s: signal.getsignal(s) for s in self.signals}  # before Lightning's

    def handle(self, signum: int, frame: object) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(
                "addrepro: Ctrl-C: stopping after this step with a checkpoint (again to stop at once)", file=sys.stderr
            )

    def on_train_start(self, trainer: pl.Trainer, module: AdditionModule) -> None:
        if trainer.received_sigterm:  # arrived while Lightning's handler was in place
            self.received = signal.SIGTERM
        for s in self.signals:
            signal.signal(s, self.handle)

    def on_optimizer_step_end(self, trainer: pl.Trainer, module: AdditionModule, step: int) -> None:
        if self.received is None:
            return
        filename = f"step_{step}.ckpt"
        if step not in self.checkpoints.steps:  # else the Checkpoints callback wrote it just now
            self.checkpoints.save(module, filename, step)
        raise Preempted(self.received, step, filename, self.previous.get(self.received))


class SpikeSnapshots(pl.Callback):
    """The weights just before, at and just after a loss spike (at logging steps), to study it later.

    Each is a weights-only checkpoint ``spike_<step>_{before,at,after}.ckpt`` of the spiking member,
    with Adam's second moments (``second_moments``: each weight's ``exp_avg_sq`` once that logging
    step's update had taken it in), for the spike report's view of the optimiser.
    """

    def __init__(self) -> None:
        self.previous: tuple[int, dict, dict] | None = None  # stacked weights and moments at the previous log
        self.awaiting_after: list[tuple[int, int]] = []  # (member, spike step)

    def on_train_start(self, trainer: pl.Trainer, module: AdditionModule) -> None:
        """A resumed run still saves the ``after`` weights of a spike at the last log before its checkpoint
        (the weights at the next log are the same bits as in an uninterrupted run). The ``before``
        weights of a spike at the first log after the checkpoint are not in it, and are not saved."""
        if not module.resume_states:
            return
        for k, monitor in enumerate(module.recorder.spike_monitors):
            rows = [r["step"] for r in module.recorder.history if r["member"] == k and "train/loss" in r]
            if monitor.spikes and rows and monitor.spikes[-1].first_step == max(rows):
                self.awaiting_after.append((k, monitor.spikes[-1].first_step))

    def on_train_log_step(
        self, trainer: pl.Trainer, module: AdditionModule, step: int, weights: dict, new_spikes: list, new_exits: list
    ) -> None:
        moments = second_moments(module)
        for k, spike_step in self.awaiting_after:
            self.save(module, k, f"spike_{spike_step}_after.ckpt", step, weights, moments)
        self.awaiting_after = []
        for k, spike in new_spikes:
            if self.previous is not None:
                before_step, before, before_moments = self.previous
                self.save(module, k, f"spike_{spike.step}_before.ckpt", before_step, before, before_moments)
            self.save(module, k, f"spike_{spike.step}_at.ckpt", step, weights, moments)
            self.awaiting_after.append((k, spike.step))
        self.previous = (step, weights, moments)

    @staticmethod
    def save(module: AdditionModule, k: int, filename: str, step: int, weights: dict, moments: dict) -> None:
        save_weights(module, k, filename, step, member_weights(weights, k), member_weights(moments, k))


def second_moments(module: AdditionModule) -> dict[str, torch.Tensor]:
    """A copy of Adam's ``exp_avg_sq`` of every stacked weight ``(K, ...)`` (none before the first update,
    or before the stack is built)."""
    opt = module.stack.opt
    if opt is None:
        return {}
    return {
        name: opt.state[p]["exp_avg_sq"].detach().clone()
        for name, p in module.model.named_parameters()
        if p in opt.state and "exp_avg_sq" in opt.state[p]
    }


def save_weights(
    module: AdditionModule, k: int, filename: str, step: int, weights: dict, moments: dict | None = None
) -> None:
    """A weights-only checkpoint of member k (for analyses; it cannot be resumed), with Adam's second
    moments when given. Weights that are not all finite (a member diverging before its next logged loss
    says so) are not saved."""
    model = {n: t.cpu() for n, t in weights.items()}
    bad = next((n for n, t in model.items() if not bool(t.isfinite().all())), None)
    if bad is not None:
        log.warning(
            "not saved: checkpoints/%s of %s (non-finite weights in %s)", filename, module.members[k].job_dir, bad
        )
        return
    extra = {"second_moments": {n: t.cpu() for n, t in moments.items()}} if moments else {}
    save_checkpoint(
        module.members[k].job_dir / "checkpoints" / filename,
        {**module.checkpoint_header(k, step), "model": model, **extra},
    )


class ShelfExitSnapshots(pl.Callback):
    """The weights of the last log on a shelf and of the log where the place had clearly left it:
    ``shelf_exit_<step>_place<j>_{before,after}.ckpt`` (weights only), where ``<step>`` is the exit's."""

    def __init__(self) -> None:
        self.on_shelf: dict[tuple[int, int], dict] = {}  # (member, place) -> stacked weights at its last log on a shelf

    def on_train_log_step(
        self, trainer: pl.Trainer, module: AdditionModule, step: int, weights: dict, new_spikes: list, new_exits: list
    ) -> None:
        for k, e in new_exits:
            before = self.on_shelf.pop((k, e.place), None)
            if before is not None and before[0] == e.last_on_shelf:
                name = f"shelf_exit_{e.step}_place{e.place}_before.ckpt"
                save_weights(module, k, name, e.last_on_shelf, member_weights(before[1], k))
            save_weights(module, k, f"shelf_exit_{e.step}_place{e.place}_after.ckpt", step, member_weights(weights, k))
        for k, monitor in enumerate(module.recorder.exit_monitors):
            for j, rest in monitor.resting.items():
                if rest is not None and rest[2] == step and k not in module.recorder.failed:
                    self.on_shelf[(k, j)] = (step, weights)  # a reference: one copy per step for all places


class ConfusionImages(pl.Callback):
    """Confusion matrices as one W&B image per member (places side by side, carry-out first)."""

    def on_confusion(self, trainer: pl.Trainer, module: AdditionModule, step: int, confusion: torch.Tensor) -> None:
        for k, m in enumerate(module.members):
            for logger in m.loggers if k not in module.recorder.failed else []:
                if isinstance(logger, WandbLogger):
                    logger.experiment.log(confusion_row(confusion[k], step))


class EndOfRunFiles(pl.Callback):
    """The reports drawn from a member's files at the end (after ``last.ckpt``), their W&B copies and
    TensorBoard's HParams summary.

    ``draw(job_dir, rows, config, plots) -> paths`` writes the text reports, and the PNG plots when
    ``plots`` (the reports layer passes it in).
    """

    def __init__(
        self, job_dirs: list[Path], draw: Callable[[Path, list[dict], dict, bool], list[Path]] | None, plots: bool
    ):
        self.job_dirs, self.draw, self.plots = job_dirs, draw, plots

    def on_end_of_run_files(self, trainer: pl.Trainer, module: AdditionModule) -> None:
        members = [k for k in range(len(self.job_dirs)) if k not in module.recorder.failed]
        for k in members:
            log_final_hparams(module.members[k].loggers, module.members[k].config, module.recorder.final_row(k))
        if self.draw is None:
            return
        jobs = [
            (
                self.job_dirs[k],
                module.recorder.rows(k),
                module.members[k].config,
                self.plots,
            )
            for k in members
        ]
        # Text reports alone take a fraction of a second: not worth starting processes for.
        workers = cpu_cores() if self.plots else 1
        for k, paths in zip(members, draw_jobs(self.draw, jobs, workers), strict=True):
            log_files_to_wandb(module.members[k].loggers, paths, self.job_dirs[k])
            mark_end_of_run_files(self.job_dirs[k], module.global_step, paths)


END_OF_RUN = "end_of_run.json"  # written last: a job folder without it has not finished its end-of-run files


def mark_end_of_run_files(job_dir: Path, step: int, paths: list[Path]) -> None:
    """Record that the end-of-run files of ``job_dir`` are complete (and which they are)."""
    files = sorted(str(Path(p).relative_to(job_dir)) if Path(p).is_relative_to(job_dir) else str(p) for p in paths)
    atomic_write_text(job_dir / END_OF_RUN, json.dumps({"step": step, "files": files}, indent=1))


def end_of_run_files_complete(job_dir: Path) -> bool:
    """``end_of_run.json`` is there as ``mark_end_of_run_files`` writes it (a damaged one: draw them again)."""
    path = Path(job_dir) / END_OF_RUN
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("files"), list)


def draw_jobs(draw: Callable[..., list[Path]], jobs: list[tuple], workers: int) -> list[list[Path]]:
    """``[draw(*job) for job in jobs]``, in up to ``workers`` processes when there are several jobs.

    Drawing a job's plots takes seconds of single-threaded matplotlib, so a stack of 16 members
    would spend over a minute drawing one after the other. The processes are spawned (a fork would
    copy a process holding CUDA and W&B threads); a ``draw`` that cannot be sent to them (not a
    module-level function) runs here.
    """
    workers = min(workers, len(jobs))
    if workers <= 1 or not _picklable(draw):
        return [draw(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return [f.result() for f in [pool.submit(draw, *job) for job in jobs]]


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def log_files_to_wandb(loggers: list, paths: list[Path], job_dir: Path) -> None:
    """The plots as W&B images and the detected shelves as a W&B table."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb  # noqa: PLC0415 - only W&B runs pay for this import

        payload = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        shelves_path = job_dir / "shelves_detected.json"
        if shelves_path.exists():
            shelves = json.loads(shelves_path.read_text())
            columns = ["place", "start_step", "end_step", "level", "atlas_level", "atlas_loss"]
            payload["shelves"] = wandb.Table(columns=columns, data=[[s.get(c) for c in columns] for s in shelves])
        if payload:
            logger.experiment.log(payload)
