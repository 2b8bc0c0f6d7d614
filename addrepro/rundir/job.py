"""A job folder's saved config and the task it trained on."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from addrepro.task.spec import TaskSpec


def job_config(job_dir: Path):  # noqa: ANN201 - DictConfig
    path = Path(job_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{job_dir} is not a job folder: no .hydra/config.yaml")
    return OmegaConf.load(path)


def spec_of(cfg) -> TaskSpec:  # noqa: ANN001
    d = cfg.data
    return TaskSpec(n_digits=d.n_digits, base=d.base, order=d.order, task=d.task)

