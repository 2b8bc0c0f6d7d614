"""``python -m addrepro.train [-m] [overrides]``: train on addition, log per-place metrics.

Each job writes into its own folder: ``.hydra/`` (configs), ``csv/metrics.csv``, ``wandb/``,
``checkpoints/`` (periodic and ``last.ckpt``), PNG plots and ``status.json``. The work is done in
``addrepro.training``; this entry adds the plots of ``addrepro.reports`` at the end of each job.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from addrepro.training import plan as planning
from addrepro.training.config import (
    ConfigError,
    check_composition,
    check_override_keys,
    config_dir,
    quote_path_overrides,
    sweep_folder_overrides,
)
from addrepro.training.plan import JobPlan


def draw(job_dir: Path, rows: list[dict], config: dict, plots: bool = True) -> list[Path]:
    from addrepro.reports.job import draw_job  # noqa: PLC0415 - matplotlib loads once a job has trained

    return draw_job(job_dir, rows=rows, plots=plots, config=config)


def checked_plan(cfg: DictConfig) -> JobPlan | None:
    return planning.checked_plan(cfg)


def train(plans: list[JobPlan], draw: planning.Draw | None = None) -> list[dict]:
    """Train ``plans`` as one stack of models; see ``addrepro.training.run.train``."""
    from addrepro.training import run  # noqa: PLC0415 - Lightning (~5 s) loads once a job is known to start

    return run.train(plans, draw)


def run_plans(plans: list[JobPlan]) -> bool:
    from addrepro.training import run  # noqa: PLC0415 - Lightning (~5 s) loads once a job is known to start

    return run.run_plans(plans, draw=draw)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    plan = checked_plan(cfg)
    if plan is not None:
        run_plans([plan])


# Hydra's modes: one per command (it raises a ValueError with a traceback otherwise).
MODES = {"-m": "multirun", "--multirun": "multirun", "-c": "cfg", "--cfg": "cfg", "-i": "info", "--info": "info"}
MODES |= {"--run": "run", "-r": "run", "--shell-completion": "completion", "-sc": "completion"}


def cli() -> None:
    """``python -m addrepro.train``: a key that does not exist is refused in one line before Hydra runs."""
    sys.argv = [sys.argv[0], *quote_path_overrides(sys.argv[1:], ("resume",))]
    modes = [a for a in sys.argv[1:] if a in MODES]
    if len({MODES[a] for a in modes}) > 1:
        print(f"addrepro: {' and '.join(modes)} cannot be combined: give one of them", file=sys.stderr)
        sys.exit(2)
    presets = [a for a in sys.argv[1:] if a.lstrip("+").startswith("sweep=")]
    if presets and not {"-m", "--multirun"} & set(sys.argv[1:]):  # a sweep preset alone would train one job
        print(f"addrepro: config error: {presets[0]} is a sweep: add -m to run its jobs", file=sys.stderr)
        sys.exit(2)
    try:
        check_override_keys(sys.argv[1:])
        check_composition(sys.argv[1:])
    except ConfigError as e:
        print(f"addrepro: config error: {e}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        # Hydra's parser takes -m only before the overrides: `key=value -m key=a,b` would be refused.
        sys.argv = [sys.argv[0], "-m", *(a for a in sys.argv[1:] if a not in ("-m", "--multirun"))]
        sys.argv += sweep_folder_overrides(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
