import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The files whose tests start training commands in fresh processes, as a user does (real Hydra runs and
# multiruns, W&B runs read back, signals, kills): each command spends ~5-9 s importing torch, Lightning
# and W&B before it trains, which is most of the suite's time. They are marked slow (`-m "not slow"`
# leaves them out for a quick check) and run first, longest first, so that with one worker per core the
# workers end together (pytest-xdist keeps this order: --no-loadscope-reorder in pyproject.toml).
SLOW_FILES = (
    "test_slurm.py",
    "test_resume.py",
    "test_reliability.py",
    "test_sweeps.py",
    "test_train_cli.py",
    "test_interp_cli.py",
    "test_dashboard.py",
    "test_analyze.py",
    "test_spike_window.py",
    "test_llc.py",
    "test_bad_input.py",
    "test_reference.py",
    "test_ensemble.py",
    "test_report.py",
    "test_devices.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# Short runs: log and evaluate often enough that every key appears, write few checkpoints.
FAST = [
    "trainer.progress_bar=false",
    "trainer.val_every_n_steps=25",
    "trainer.log_every_n_steps=5",
    "metrics.every_n_steps=25",
    "metrics.carry_set_size=16",
    "metrics.chain_set_size=8",
    "data.val_size=256",
    "trainer.ckpt_schedule=linear",  # no log-spaced weights: a fsync each, ~1.5 s of a short test run
]


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # The commands' own bytecode is cached (written by the first of them): without it, each of the
    # suite's ~50 command starts compiles addrepro again (~0.7 s).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` the way a user would, in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def cli(tmp_path):
    def _run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return run_cli(module, list(args), tmp_path, timeout)

    return _run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny tensors train up to 10x faster on shared CPUs, and runs that must be
    bitwise equal (ensemble vs single, resume vs uninterrupted) need the same reduction order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fit_bare(module, max_steps: int, root: Path | None = None) -> None:  # noqa: ANN001 - an AdditionModule
    """Train ``module`` with a bare Trainer: no loggers, checkpoints, progress bar or callbacks."""
    import pytorch_lightning as pl  # noqa: PLC0415 - only the tests that train in-process pay for Lightning

    from addrepro.training.run import quiet_lightning  # noqa: PLC0415

    quiet_lightning()
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root) if root else None,
    )
    trainer.fit(module)
