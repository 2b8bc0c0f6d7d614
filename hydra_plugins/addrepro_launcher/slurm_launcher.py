"""``hydra/launcher=slurm`` and ``hydra/launcher=slurm_ensemble``: a multirun as one Slurm job array.

Both submit through submitit. ``slurm`` (``max_members: 1``) makes each job one array task.
``slurm_ensemble`` packs the jobs first, exactly as ``hydra/launcher=ensemble`` does (jobs that differ
only in seeds, learning rate and weight decay share a stack of at most ``max_members``), and each
stack is one array task: a 256-job seed × lr sweep is ⌈256 / max_members⌉ tasks, each paying the
start-up once. Every job keeps its own folder, W&B run, metrics and status either way.

A task that ends without a result (its time limit with no requeue left, ``scancel``, a node failure)
fails its jobs: each job's ``status.json`` says so — its folder is made, with Hydra's saved configs,
if the job never started — so the sweep summary names them and the sweep exits non-zero. (submitit
would raise in the submitting process and lose the summary.)
"""

import copy
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from addrepro.training.summary import note_skipped
from hydra_plugins.addrepro_launcher.ensemble_launcher import check_max_members, train_as_stacks

try:  # the cluster extra; the modules, not their classes, so Hydra's plugin scan finds those once
    from hydra_plugins.hydra_submitit_launcher import config as submitit_config
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as submitit_plugin
except ImportError:  # without it, hydra/launcher=slurm names the missing submitit_slurm config
    submitit_config = submitit_plugin = None

log = logging.getLogger("addrepro")
Job = tuple[int, list[str]]  # a job's number in the sweep and its overrides


@dataclass
class AddreproSlurmConf(submitit_config.SlurmQueueConf if submitit_config else object):
    _target_: str = "hydra_plugins.addrepro_launcher.slurm_launcher.SlurmLauncher"
    max_members: int = 1  # jobs per array task: 1 runs each job alone, more packs them into stacks


if submitit_config is not None:
    ConfigStore.instance().store(
        group="hydra/launcher", name="addrepro_slurm", node=AddreproSlurmConf, provider="addrepro"
    )


class SlurmLauncher(submitit_plugin.BaseSubmititLauncher if submitit_plugin else object):
    _EXECUTOR = "slurm"

    def __init__(self, max_members: int = 1, **params: Any) -> None:
        check_max_members(max_members)
        super().__init__(**params)
        self.max_members = max_members

    # -- on the submitting machine ---------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        jobs = [(initial_job_idx + offset, list(overrides)) for offset, overrides in enumerate(job_overrides)]
        returns: dict[int, JobReturn] = {}  # by job number: Hydra gets them back in the sweep's order
        left = []
        for number, overrides in jobs:
            done = self.finished_before(number, overrides)
            if done is None:
                left.append((number, overrides))
                continue
            note_skipped(done.name)
            returns[number] = self.completed(number, overrides)
        if left:
            returns.update(self.submit(left))
        return [returns[number] for number, _ in jobs]

    def submit(self, jobs: list[Job]) -> dict[int, JobReturn]:
        """Runs ``jobs`` as one Slurm array and waits for it: each job's return, by its number."""
        tasks = [[job] for job in jobs] if self.max_members == 1 else self.stacks(jobs)
        executor = self.executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Slurm array of %d task(s) for %d job(s); sweep folder %s", len(tasks), len(jobs), sweep_dir)
        for number, task in enumerate(tasks):
            log.info("\ttask %d: job(s) %s", number, ", ".join(str(job) for job, _ in task))
        submitted = executor.map_array(self, tasks, [Singleton.get_state()] * len(tasks))
        returns: dict[int, JobReturn] = {}
        for job, task in zip(submitted, tasks, strict=True):
            try:
                results = job.results()[0]
            except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError, FailedJobError, …
                state = re.search(r"\(state: ([^)]*)\)", str(e))
                reason = f"state {state.group(1)}" if state else type(e).__name__
                message = f"Slurm job {job.job_id} ended without a result ({reason}; log in {job.paths.stderr})"
                returns.update({number: self.failed(number, overrides, message) for number, overrides in task})
                continue
            for (number, overrides), ret in zip(task, results, strict=True):
                returns[number] = (
                    ret
                    if ret.status == JobStatus.COMPLETED
                    else self.failed(number, overrides, f"Slurm job {job.job_id}: {raised(ret)}")
                )
        return returns

    def executor(self) -> Any:  # noqa: ANN401 - a submitit AutoExecutor
        """submitit's executor with this launcher's settings, as the submitit plugin builds it."""
        import submitit  # noqa: PLC0415 - plugin discovery stays fast

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]},
        )
        base = set(OmegaConf.structured(submitit_config.BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        return executor

    def job_config(self, number: int, overrides: list[str]) -> DictConfig:
        """A job's full config (``hydra`` included), as its task will compose it."""
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = number
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{number}"
        return sweep_config

    def job_folder(self, number: int, overrides: list[str]) -> tuple[DictConfig, Path]:
        """A job's config and the folder its task writes into."""
        config = self.job_config(number, overrides)
        HydraConfig.instance().set_config(config)  # the folder name resolves through hydra.job.*
        return config, Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)

    def finished_before(self, number: int, overrides: list[str]) -> Path | None:
        """The job's folder when an earlier run of this sweep finished it with these same overrides
        (re-running a sweep into its folder re-submits only what is left)."""
        from addrepro.rundir.status import read_status_file  # noqa: PLC0415

        config, job_dir = self.job_folder(number, overrides)
        saved = job_dir / str(config.hydra.output_subdir) / "overrides.yaml"
        if read_status_file(job_dir / "status.json")["status"] != "ok" or not saved.is_file():
            return None
        try:
            same = list(OmegaConf.load(saved)) == list(config.hydra.overrides.task)
        except Exception:  # noqa: BLE001 - a damaged file: the job runs again
            return None
        return job_dir if same else None

    def stacks(self, jobs: list[Job]) -> list[list[Job]]:
        """The jobs packed as ``hydra/launcher=ensemble`` packs them, from their configs alone."""
        from addrepro.training.ensemble import pack, packing_key  # noqa: PLC0415 - not at plugin discovery

        keys = []
        for number, overrides in jobs:
            task_cfg = copy.deepcopy(self.job_config(number, overrides))
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            keys.append(packing_key(task_cfg))
        return pack(jobs, keys, self.max_members)

    def failed(self, number: int, overrides: list[str], message: str) -> JobReturn:
        """A job whose task ended without a result: ``status.json`` failed (unless it says ok)."""
        from addrepro.rundir.status import read_status_file, write_status  # noqa: PLC0415

        config, job_dir = self.job_folder(number, overrides)
        hydra_dir = job_dir / str(config.hydra.output_subdir)
        if not hydra_dir.is_dir():  # never started: saved as Hydra would, so the summary counts it
            hydra_dir.mkdir(parents=True)
            task_cfg = copy.deepcopy(config)
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            OmegaConf.save(task_cfg, hydra_dir / "config.yaml")
            OmegaConf.save(config.hydra.overrides.task, hydra_dir / "overrides.yaml")
        previous = read_status_file(job_dir / "status.json")
        # "preempted" stays: it names the checkpoint that resume=auto continues from.
        if previous["status"] not in ("ok", "preempted"):
            write_status(job_dir, "failed", f"{message}; last status {previous['status']}", step=previous.get("step"))
        log.info("job %s: %s", job_dir.name, message)
        # Completed for Hydra: its sweeper would raise at a failed return and skip the sweep summary,
        # which reads status.json and is what exits non-zero.
        return self.completed(number, overrides)

    def completed(self, number: int, overrides: list[str]) -> JobReturn:
        config = self.job_config(number, overrides)
        ret = JobReturn(overrides=overrides, cfg=config, hydra_cfg=config, working_dir=os.getcwd())
        ret.status, ret.return_value = JobStatus.COMPLETED, None
        return ret

    # -- in each array task ----------------------------------------------------------------------
    def __call__(self, task: list[Job], singleton_state: dict[type, Singleton]) -> list[JobReturn]:
        import submitit  # noqa: PLC0415

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        slurm_id = submitit.JobEnvironment().job_id
        if self.max_members == 1:
            ((number, overrides),) = task
            sweep_config = self.job_config(number, overrides)
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = slurm_id
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            return [ret]
        return train_as_stacks(self.hydra_context, self.config, task, len(task), job_id=lambda _cfg, _num: slurm_id)


def raised(ret: JobReturn) -> str:
    """The first line of what a failed job raised (e.g. submitit's "timed-out too many times" in its
    signal handler). Read from the private field: the public ``return_value`` raises it again and
    prints a line of its own, once per failed job, before the sweep summary that names them all."""
    error = ret._return_value  # noqa: SLF001
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
