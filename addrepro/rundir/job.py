"""Job folders: a sweep's job folders and a job folder's saved config."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from addrepro.rundir.metrics_file import RunFileError


def is_job_dir(path: Path) -> bool:
    """A job folder: one Hydra wrote its ``.hydra/`` configs into."""
    return Path(path).is_dir() and (Path(path) / ".hydra").is_dir()


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders directly inside ``sweep_dir``: numbered ones (a multirun's ``0_seed=0``,
    ``1_seed=1``, … or ``0, 1, …``) in job order, then the others (a W&B sweep's run ids) by name;
    ``[]`` when it is no folder."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    jobs = [p for p in sweep_dir.iterdir() if is_job_dir(p)]
    return sorted(jobs, key=job_order)


def job_number(job_dir: Path) -> int | None:
    """A multirun job's number, from its folder name (``3_model.width=256`` or ``3``); None otherwise."""
    head = Path(job_dir).name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def job_order(job_dir: Path) -> tuple[int, int, str]:
    number = job_number(job_dir)
    return (0, number, "") if number is not None else (1, 0, Path(job_dir).name)


def job_config(job_dir: Path):  # noqa: ANN201 - DictConfig
    path = Path(job_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{job_dir} is not a job folder: no .hydra/config.yaml")
    if not path.is_file():  # a pipe would block, a device never end
        raise RunFileError(f"{path} is not a regular file")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many kinds for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{path} cannot be read as a run's config ({reason})") from None
    if not OmegaConf.is_dict(cfg) or not OmegaConf.is_dict(cfg.get("data")):
        raise RunFileError(f"{path} is not a run's config: it has no data section")
    try:  # what a run writes has every value resolved; an edited ${...} may name nothing
        OmegaConf.resolve(cfg)
    except Exception as e:  # noqa: BLE001 - OmegaConf raises many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{path} cannot be read as a run's config ({reason})") from None
    return cfg


def make_folder(folder: Path) -> Path | None:
    """``mkdir -p folder``; the topmost folder it created (None if ``folder`` existed)."""
    folder = Path(folder).absolute()
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def remove_refused_job_dir(job_dir: Path, hydra_subdir: str | None, log_name: str, created: Path | None) -> bool:
    """Remove the folder Hydra made for a single run that was refused before it wrote anything.

    Hydra saves the configs and opens the job's log before addrepro sees the config, so a refused run
    would leave a folder that looks like a run. Only folders this command created go (``created``:
    the topmost one, see ``make_folder``), and only when Hydra's files and the status are all they
    hold. Returns whether anything was removed.
    """
    job_dir = Path(job_dir).absolute()
    if created is None or not job_dir.is_dir() or (job_dir != created and created not in job_dir.parents):
        return False
    allowed = {log_name, "status.json"}
    if hydra_subdir:
        allowed |= {f"{hydra_subdir}/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    files = [p for p in job_dir.rglob("*") if not p.is_dir()]
    if any(p.relative_to(job_dir).as_posix() not in allowed for p in files):
        return False
    _close_log_files(job_dir)
    for p in files:
        p.unlink()
    for folder in sorted((p for p in job_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        folder.rmdir()
    folder = job_dir
    while not any(folder.iterdir()):
        folder.rmdir()
        if folder == created:
            break
        folder = folder.parent
    return True


def _close_log_files(folder: Path) -> None:
    """Close and detach the logging handlers that write into ``folder`` (Hydra's job log)."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in list(lg.handlers):
            path = getattr(handler, "baseFilename", None)
            if path and folder in Path(path).parents:
                handler.close()
                lg.removeHandler(handler)
