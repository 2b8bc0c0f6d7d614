"""Job folders: a sweep's job folders and a job folder's saved config."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def is_job_dir(path: Path) -> bool:
    """A job folder: one Hydra wrote its ``.hydra/`` configs into."""
    return Path(path).is_dir() and (Path(path) / ".hydra").is_dir()


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders directly inside ``sweep_dir``: numbered ones (a multirun's ``0, 1, ...``) in
    numeric order, then the others (a W&B sweep's run ids) by name; ``[]`` when it is no folder."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    jobs = [p for p in sweep_dir.iterdir() if is_job_dir(p)]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def job_config(job_dir: Path):  # noqa: ANN201 - DictConfig
    path = Path(job_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{job_dir} is not a job folder: no .hydra/config.yaml")
    return OmegaConf.load(path)
