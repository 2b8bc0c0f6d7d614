"""Where a job runs: its device (one GPU per job), its torch threads and its numeric precision.

A sweep's jobs are spread over the visible GPUs by job number (job i on GPU ``i mod count``), so
the ``parallel`` and ``local`` launchers use every GPU of a node and a Slurm task uses the one GPU
it was given. Jobs that run side by side on a CPU share its cores instead of each taking all of them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from addrepro.training.config import ConfigError

GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def visible_gpus(accelerator: str) -> int:
    """CUDA devices this job may use (0 when the accelerator is not a GPU or none is visible)."""
    return torch.cuda.device_count() if accelerator in GPU_ACCELERATORS else 0


def job_devices(accelerator: str, devices: list[int] | None, slot: int, n_gpus: int) -> tuple[str, Any]:
    """Lightning's ``(accelerator, devices)`` for a job: always one device.

    ``devices`` (the config's ``trainer.devices``) names a GPU; otherwise job ``slot`` takes GPU
    ``slot mod n_gpus``. Without a GPU the job runs on the configured accelerator's one device.
    """
    if n_gpus == 0:
        return accelerator, 1
    if devices is not None:
        (index,) = devices
        if index >= n_gpus:
            raise ConfigError("trainer.devices", list(devices), f"{n_gpus} GPU(s) visible: an index in 0..{n_gpus - 1}")
        return "gpu", [index]
    return "gpu", [slot % n_gpus]


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a Slurm allocation), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Multiply-adds of one training step below which one torch thread is the fastest setting. Measured on a
# 2-core AMD EPYC (torch 2.13 CPU build): the default model (width 128, batch 64, ~2e8) ran 10% faster
# with one thread than with two on a quiet machine, and 2.5x faster beside a busy process (two threads
# spin-wait on a shared core); a width-512 batch-256 model (~1.3e10) ran 1.7x faster with two on a quiet
# machine. The boundary between them was not measured more finely.
ONE_THREAD_BELOW = 2e9


def step_work(width: int, depth: int, d_mlp: int | None, batch: int, positions: int, members: int) -> float:
    """Multiply-adds of one forward pass of a stack: ``members`` models of ``depth`` blocks (attention
    4·width², MLP 2·width·d_mlp per position) over ``batch`` sequences of ``positions`` tokens."""
    per_position = depth * (4 * width * width + 2 * width * (d_mlp if d_mlp is not None else 4 * width))
    return float(members * batch * positions * per_position)


def job_threads(threads: int | str | None, jobs_at_once: int, cores: int, work: float = 0.0) -> int | None:
    """Torch threads for one job (None: leave torch's default).

    ``threads``: an integer is taken as it is; ``"auto"`` is one thread when the step's ``work``
    (``step_work``) is below ``ONE_THREAD_BELOW``, else a fair share of the cores; ``None`` (torch's
    default) is also shared out when several jobs run at once. Two jobs that each use every core
    spin-wait on each other's cores and together finish less work than one job alone.
    """
    if isinstance(threads, int):
        return threads
    if threads == "auto" and work < ONE_THREAD_BELOW:
        return 1
    if jobs_at_once <= 1:
        return None if threads is None else cores
    return max(1, cores // jobs_at_once)


def apply_settings(threads: int | None, matmul_precision: str) -> None:
    """Process-wide settings of a job: thread count and float32 matmul precision (TF32 with ``high``)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(matmul_precision)
