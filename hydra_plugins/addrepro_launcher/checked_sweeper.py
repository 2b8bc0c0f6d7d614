"""The sweeper of ``python -m addrepro.train -m``: Hydra's basic sweeper, with every job's config
checked before the first job starts.

Hydra composes every job's config before launching (to catch composition errors); here each is also
checked as a run would check it (``addrepro.training.config.validate``), so a value that is wrong in
one job only (``seed=0,1,abc``, a width that ``n_heads`` does not divide) stops the sweep in one line
naming the job, before any job trains, and leaves no folder this command made.
"""

import copy
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: PLC2701 - Hydra exports it only there
from omegaconf import open_dict, read_write

MAX_JOBS = 10_000


class CheckedSweeper(BasicSweeper):
    def split_arguments(self, overrides: list, max_batch_size: int | None) -> list[list[list[str]]]:
        from addrepro.training.summary import WritableOutput  # noqa: PLC0415 - not at plugin discovery

        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        if not any(batches):  # e.g. glob(...) over a key matched no option
            assert self.config is not None
            print("addrepro: config error: the sweep has no jobs (a glob(...) that matched nothing?)", file=sys.stderr)
            remove_sweep_folder(Path(str(self.config.hydra.sweep.dir)), WritableOutput.created)
            sys.exit(2)
        jobs = sum(len(batch) for batch in batches)
        resume = next((str(o.value()) for o in overrides if o.key_or_group == "resume" and not o.is_delete()), None)
        problem = None
        if jobs > MAX_JOBS:  # each job's config is composed and checked before any starts
            problem = f"the sweep has {jobs} jobs: at most {MAX_JOBS} in one command (split it into several)"
        elif jobs > 1 and resume not in (None, "auto", "None", ""):
            problem = (
                f"resume={resume} names one run, but the sweep has {jobs} jobs: give resume=auto (each job continues "
                "its own folder) or drop -m"
            )
        if problem is not None:
            assert self.config is not None
            print(f"addrepro: config error: {problem}", file=sys.stderr)
            remove_sweep_folder(Path(str(self.config.hydra.sweep.dir)), WritableOutput.created)
            sys.exit(2)
        return batches

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from addrepro.training.config import ConfigError, validate  # noqa: PLC0415 - not at plugin discovery
        from addrepro.training.summary import WritableOutput  # noqa: PLC0415

        assert self.hydra_context is not None and self.config is not None
        for number, overrides in enumerate(batch):
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                task = copy.deepcopy(config)
                with read_write(task), open_dict(task):
                    del task["hydra"]
                validate(task)
                continue
            except ConfigError as e:
                reason = f"config error: {e}"
            except Exception as e:  # noqa: BLE001 - Hydra's composition errors, many kinds
                reason = "config error: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
            job = " ".join(o for o in overrides if o.partition("=")[0] in swept_keys(batch)) or " ".join(overrides)
            print(
                f"addrepro: {reason} (in job {self.batch_index - 1 + number}: {job}; no job was started)",
                file=sys.stderr,
            )
            remove_sweep_folder(Path(str(self.config.hydra.sweep.dir)), WritableOutput.created)
            sys.exit(2)


def swept_keys(batch: Sequence[Sequence[str]]) -> set[str]:
    """The keys whose value differs between the jobs of ``batch``."""
    values: dict[str, set[str]] = {}
    for overrides in batch:
        for override in overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}


def remove_sweep_folder(sweep_dir: Path, created: Path | None) -> None:
    """The sweep folder this command made, when it holds nothing but Hydra's ``multirun.yaml``."""
    if created is None or not sweep_dir.is_dir():
        return
    if {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(created if sweep_dir.absolute().is_relative_to(created) else sweep_dir)
