"""``hydra/launcher=ensemble``: run the shape-compatible jobs of a multirun as stacked ensembles.

Each job still goes through Hydra's ``run_job`` (its folder, saved configs and logging are exactly
those of the basic launcher), but the task function only checks and records the job; training
happens afterwards, one process-wide stack per group of compatible jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger("addrepro")


class EnsembleLauncher(Launcher):
    def __init__(self, max_members: int = 64) -> None:
        if not (isinstance(max_members, int) and not isinstance(max_members, bool) and max_members >= 1):
            # A value from a config file (the command line's is checked before Hydra starts): one line.
            allowed = "must be an integer >= 1"
            print(
                f"addrepro: config error: hydra.launcher.max_members={max_members!r} is invalid: {allowed}",
                file=sys.stderr,
            )
            sys.exit(2)
        self.max_members = max_members
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # Hydra imports every plugin at start-up, whatever the launcher: training loads only when used.
        from addrepro.train import checked_plan, run_plans  # noqa: PLC0415
        from addrepro.training.ensemble import pack, packing_key  # noqa: PLC0415

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns, plans = [], []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            state = Singleton.get_state()
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=checked_plan,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            Singleton.set_state(state)
            returns.append(ret)
            if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
                plans.append(ret.return_value)
        stacks = pack(plans, [packing_key(p.cfg) for p in plans], self.max_members)
        for number, stack in enumerate(stacks):
            log.info("training %d job(s) as one stack: %s", len(stack), ", ".join(p.job_dir.name for p in stack))
            # Stack s takes GPU s mod count (one after another: a node's GPUs serve the stacks in turn).
            run_plans([dataclasses.replace(p, slot=number) for p in stack])
        return returns
