"""``hydra/launcher=ensemble``: run the shape-compatible jobs of a multirun as stacked ensembles.

Each job still goes through Hydra's ``run_job`` (its folder, saved configs and logging are exactly
those of the basic launcher), but the task function only checks and records the job; training
happens afterwards, one process-wide stack per group of compatible jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger("addrepro")


def check_max_members(max_members: Any) -> None:  # noqa: ANN401 - checked here
    """A value from a config file (the command line's is checked before Hydra starts): one line."""
    if not (isinstance(max_members, int) and not isinstance(max_members, bool) and max_members >= 1):
        allowed = "must be an integer >= 1"
        print(
            f"addrepro: config error: hydra.launcher.max_members={max_members!r} is invalid: {allowed}", file=sys.stderr
        )
        sys.exit(2)


class EnsembleLauncher(Launcher):
    def __init__(self, max_members: int = 64) -> None:
        check_max_members(max_members)
        self.max_members = max_members
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [(initial_job_idx + offset, list(overrides)) for offset, overrides in enumerate(job_overrides)]
        return train_as_stacks(self.hydra_context, self.config, jobs, self.max_members)


def train_as_stacks(
    hydra_context: HydraContext,
    config: DictConfig,
    jobs: Sequence[tuple[int, Sequence[str]]],
    max_members: int,
    job_id: Callable[[DictConfig, int], str] | None = None,
) -> list[JobReturn]:
    """Check each ``(job number, overrides)`` in its own folder through Hydra's ``run_job``, then train
    the compatible ones as stacks of at most ``max_members``, one stack after another. ``job_id``:
    Hydra's ``hydra.job.id`` of a job (default ``<job name>_<number>``)."""
    # Hydra imports every plugin at start-up, whatever the launcher: training loads only when used.
    from addrepro.train import checked_plan, run_plans  # noqa: PLC0415
    from addrepro.training.ensemble import pack, plan_key  # noqa: PLC0415

    returns, plans = [], []
    for idx, overrides in jobs:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = job_id(sweep_config, idx) if job_id else f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        state = Singleton.get_state()
        ret = run_job(
            hydra_context=hydra_context,
            task_function=checked_plan,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        Singleton.set_state(state)
        returns.append(ret)
        if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
            plans.append(ret.return_value)
    stacks = pack(plans, [plan_key(p) for p in plans], max_members)
    for number, stack in enumerate(stacks):
        log.info("training %d job(s) as one stack: %s", len(stack), ", ".join(p.job_dir.name for p in stack))
        # Stack s takes GPU s mod count (one after another: a node's GPUs serve the stacks in turn).
        run_plans([dataclasses.replace(p, slot=number) for p in stack])
    for ret in returns:
        if ret.status == JobStatus.COMPLETED:
            ret.return_value = None  # trained; a Slurm task sends its returns back pickled, small
    return returns
