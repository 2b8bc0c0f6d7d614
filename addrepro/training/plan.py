"""Plan a Hydra job before anything trains: its folder, W&B identity and resume point, checked.

Everything here runs before Lightning is imported, and before torch unless a checkpoint is read, so a
bad value or a folder in use is refused in about half a second with one line, a bad checkpoint in about
two (``addrepro.training.run`` does the training).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from addrepro.rundir.atomic import atomic_write_text, remove_stale_temporaries
from addrepro.rundir.checkpoint_paths import CheckpointError, find_resume_checkpoint
from addrepro.rundir.confusion import load_confusion
from addrepro.rundir.job import remove_refused_job_dir
from addrepro.rundir.lock import LockError, acquire, release
from addrepro.rundir.metrics_file import RunFileError, load_rows
from addrepro.rundir.names import grid_keys, run_name, swept_keys, swept_tags, wandb_group
from addrepro.rundir.status import write_status
from addrepro.training.config import CONFIG_KEY_OF, ConfigError, architecture, task_spec, validate
from addrepro.training.summary import WritableOutput

log = logging.getLogger("addrepro")

# Writes a job's reports from its rows at the end of training, PNGs too when asked; returns the files.
Draw = Callable[[Path, list[dict], dict, bool], list[Path]]  # (job folder, rows, resolved config, plots)


@dataclass
class JobPlan:
    """One job of a run or sweep, ready to train: its config, folder and W&B identity."""

    cfg: DictConfig
    job_dir: Path
    name: str
    group: str
    multirun: bool
    resume_from: Path | None = None
    slot: int = 0  # the job number in a sweep (which GPU it takes), the stack number in an ensemble
    jobs_at_once: int = 1  # jobs of the sweep running side by side on this machine (they share its cores)
    tags: list[str] = field(default_factory=list)  # the job's swept values, as W&B tags
    # False: resume_from is a checkpoint kept outside any job folder, continued in this job's own folder
    # (a new W&B run; no earlier rows).
    own_checkpoint: bool = True


def job_plan(cfg: DictConfig) -> JobPlan:
    """The current Hydra job's folder, W&B run name and group; validation happens separately."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    group_dir = Path(hc.sweep.dir) if multirun else job_dir
    swept = swept_keys(sweep_overrides(group_dir)) | set(grid_keys(hc.sweeper.get("params"))) if multirun else None
    overrides = list(hc.overrides.task)
    slot = int(hc.job.num) if multirun and hc.job.get("num") is not None else 0
    return JobPlan(
        cfg,
        job_dir,
        run_name(overrides, swept),
        wandb_group(group_dir, multirun),
        multirun,
        slot=slot,
        jobs_at_once=jobs_at_once(hc.launcher),
        tags=swept_tags(overrides, swept),
    )


def jobs_at_once(launcher: DictConfig) -> int:
    """How many jobs of a sweep the launcher runs side by side in this machine (``parallel``: n_jobs)."""
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    if n_jobs >= 0:
        return n_jobs
    from addrepro.training.devices import cpu_cores  # noqa: PLC0415 - torch loads after the plan is checked

    return cpu_cores()


def resume_plan(plan: JobPlan) -> JobPlan:
    """Continue the run a checkpoint belongs to: its config (plus this command's overrides), its folder."""
    path = find_resume_checkpoint(str(plan.cfg.resume), plan.job_dir)
    if path is None:  # resume=auto on a first start
        return plan
    from addrepro.rundir.checkpoints import check_compatible, check_resumable, load_checkpoint  # noqa: PLC0415 - torch loads only to resume

    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path)
    # A key added to addrepro after the checkpoint was written takes this job's value (its default).
    current = OmegaConf.create(OmegaConf.to_container(plan.cfg, resolve=False))
    try:
        cfg = OmegaConf.merge(current, OmegaConf.create(ckpt["config"]))
    except Exception as e:  # noqa: BLE001 - OmegaConf raises many kinds for a stored config edited out of shape
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"resume={path}: its stored config does not fit a run's config ({reason})") from None
    # This command's overrides win over the stored config; their values are taken from this job's
    # composed config, so group overrides (logger=csv) bring their whole group.
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~").replace("/", ".")
        value = OmegaConf.select(plan.cfg, key, default=None)
        if key in ("resume", "experiment") or key.startswith("hydra") or value is None:
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.resume = str(path)
    validate(cfg)
    if ckpt["step"] > cfg.trainer.max_steps:  # it would end at once, its config saying fewer steps than it has
        raise ConfigError(
            "trainer.max_steps",
            cfg.trainer.max_steps,
            f"is below the step of {path} ({ckpt['step']}): give at least that",
        )
    spec = task_spec(cfg.data)
    check_compatible(ckpt, asdict(spec), architecture(cfg.model, spec).to_dict(), path, names=CONFIG_KEY_OF)
    owner = owning_job_dir(path)
    if owner is None:  # a checkpoint kept elsewhere (downloaded, copied): its run continues in this job's folder
        log.info("resuming %s from step %d in a new run folder %s", path, ckpt["step"], plan.job_dir)
        return dataclasses.replace(plan, cfg=cfg, resume_from=path, own_checkpoint=False)
    name, group = ckpt.get("wandb_name") or plan.name, ckpt.get("wandb_group") or plan.group
    log.info("resuming %s from step %d", path, ckpt["step"])
    return dataclasses.replace(plan, cfg=cfg, job_dir=owner, name=name, group=group, resume_from=path)


RUN_FOLDERS = ("csv", ".hydra", "checkpoints", "wandb", "tensorboard", "analysis")
RUN_FILES = (
    "train.log",
    "status.json",
    "end_of_run.json",
    "confusion.npz",
    "spikes.json",
    "spikes.md",
    "shelf_exits.json",
    "timeline.md",
    "csv/metrics.csv",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    ".hydra/hydra.yaml",
    ".hydra/resumes.yaml",
)


def check_run_files(plan: JobPlan) -> None:
    """The files a resume reads back (metrics, confusion matrices) must be readable: ``RunFileError``."""
    if plan.resume_from is None or not plan.own_checkpoint:
        return
    for name in RUN_FOLDERS:  # a linked folder would lead every file written into it out of the job
        path = plan.job_dir / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise RunFileError(f"{path} is not a folder of the job (a link or a file); a run writes only its own files")
    for name in RUN_FILES:  # a resume appends to and rewrites these: a link could lead out of the job
        path = plan.job_dir / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise RunFileError(
                f"{path} is not a regular file (a link or a special file); a run writes only its own files"
            )
    resumes = plan.job_dir / ".hydra" / "resumes.yaml"
    if resumes.is_file():
        try:
            earlier = OmegaConf.load(resumes)
        except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many kinds for a damaged file
            raise RunFileError(
                f"{resumes} cannot be read ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
            ) from None
        if not OmegaConf.is_list(earlier):
            raise RunFileError(f"{resumes} is not the list of earlier resumes addrepro writes")
    if (plan.job_dir / "csv" / "metrics.csv").exists():
        load_rows(plan.job_dir)
    load_confusion(plan.job_dir)


def owning_job_dir(checkpoint: Path) -> Path | None:
    """The job folder a checkpoint belongs to: ``<job>/checkpoints/<file>``; None for a checkpoint
    anywhere else (a run never writes outside its own folder, nor into a filesystem's root)."""
    checkpoint = Path(checkpoint).absolute()
    job = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and job != Path(job.anchor):
        return job
    return None


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The multirun's own command-line overrides, as Hydra saved them (jobs run by submitit see no argv)."""
    saved = sweep_dir / "multirun.yaml"
    if saved.exists():
        return list(OmegaConf.load(saved).hydra.overrides.task)
    return sys.argv[1:]


def try_status(job_dir: Path, status: str, message: str = "", **extra: object) -> None:
    """``write_status`` where the folder may be unwritable: the error line is reported anyway."""
    try:
        write_status(job_dir, status, message, **extra)
    except OSError:
        pass


def checked_plan(cfg: DictConfig) -> JobPlan | None:
    """The job's plan with its run folder locked, or None after reporting in one line why it cannot
    run: a bad config or checkpoint, a folder in use, an unwritable folder (exit 2 outside a sweep)."""
    plan = job_plan(cfg)
    try:
        validate(cfg)
        if cfg.resume:
            plan = resume_plan(plan)
            check_run_files(plan)
        acquire(plan.job_dir)
    except (ConfigError, CheckpointError) as e:
        kind = "config" if isinstance(e, ConfigError) else "checkpoint"
        if plan.multirun:  # the sweep's summary names the failed job
            try_status(plan.job_dir, "failed", f"{kind}: {e}")
        else:  # nothing of the refused run is left behind
            remove_refused_run()
        return refused(plan, f"{kind} error: {e}")
    except LockError as e:  # the folder's status belongs to the process that holds it
        if not plan.multirun:  # the folder Hydra made for this command, if it made one
            remove_refused_run()
        return refused(plan, f"run folder error: {e}")
    except RunFileError as e:  # a run file a resume reads back, torn or not written by a run
        if not plan.multirun:
            remove_refused_run()
        return refused(plan, f"run file error: {e}")
    except OSError as e:
        return refused(plan, f"storage error: {e}")
    try:
        removed = remove_stale_temporaries(plan.job_dir)  # left by a killed run; we hold the lock
        if removed:
            log.info("removed %d temporary file(s) of an interrupted run", len(removed))
        write_status(plan.job_dir, "running")
    except OSError as e:
        release(plan.job_dir)
        return refused(plan, f"storage error: {e}")
    hydra_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
    if plan.job_dir.absolute() != hydra_dir and not plan.multirun:
        continue_in_job_dir(plan, hydra_dir)
    log.info("run folder: %s", plan.job_dir)
    return plan


def continue_in_job_dir(plan: JobPlan, hydra_dir: Path) -> None:
    """A resume of another job folder writes there only: its config becomes the resumed one (the earlier
    ones and this command's overrides are kept in ``.hydra/resumes.yaml``), this command's log goes to the
    job's ``train.log``, and the folder Hydra made for this command is removed (it holds only Hydra's files)."""
    hc = HydraConfig.get()
    hydra = plan.job_dir / (hc.output_subdir or ".hydra")
    resumes_path = hydra / "resumes.yaml"
    resumes = OmegaConf.to_container(OmegaConf.load(resumes_path)) if resumes_path.is_file() else []
    previous = (
        OmegaConf.to_container(OmegaConf.load(hydra / "config.yaml")) if (hydra / "config.yaml").is_file() else None
    )
    resumes.append(
        {
            "time": datetime.now().isoformat(timespec="seconds"),
            "overrides": list(hc.overrides.task),
            "previous_config": previous,
        }
    )
    atomic_write_text(resumes_path, OmegaConf.to_yaml(OmegaConf.create(resumes)))
    atomic_write_text(hydra / "config.yaml", OmegaConf.to_yaml(plan.cfg))
    remove_refused_job_dir(hydra_dir, hc.output_subdir, f"{hc.job.name}.log", WritableOutput.created)
    handler = logging.FileHandler(plan.job_dir / f"{hc.job.name}.log", mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    log.info("resumed with %s", " ".join(hc.overrides.task))


def remove_refused_run() -> None:
    """The folder Hydra made for this single run, which was refused before it wrote anything."""
    hc = HydraConfig.get()
    remove_refused_job_dir(Path(hc.runtime.output_dir), hc.output_subdir, f"{hc.job.name}.log", WritableOutput.created)


def refused(plan: JobPlan, line: str) -> None:
    print(f"addrepro: {line}", file=sys.stderr)
    if not plan.multirun:
        sys.exit(2)
