"""One device per job, thread shares, precision settings, and Lightning's cluster detection kept out."""

import dataclasses
import logging
import math

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from test_ensemble import config

from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.rundir.metrics_file import load_rows
from addrepro.task.spec import TaskSpec
from addrepro.task.streams import InfiniteBatches
from addrepro.train import JobPlan, train
from addrepro.training.config import ConfigError
from addrepro.training.devices import ONE_THREAD_BELOW, job_devices, job_threads, step_work
from addrepro.training.plan import jobs_at_once


def test_jobs_are_spread_over_the_visible_gpus():
    # a faked node of 4 GPUs: jobs (or ensemble stacks) 0..5 take GPUs 0, 1, 2, 3, 0, 1
    assert [job_devices("auto", None, slot, 4) for slot in range(6)] == [("gpu", [g]) for g in (0, 1, 2, 3, 0, 1)]
    assert job_devices("gpu", None, 7, 1) == ("gpu", [0])  # a Slurm task sees the one GPU it was given
    assert job_devices("auto", [2], 5, 4) == ("gpu", [2])  # trainer.devices names one
    with pytest.raises(ConfigError, match=r"trainer.devices=\[4\] is invalid: 4 GPU\(s\) visible: an index in 0..3"):
        job_devices("auto", [4], 0, 4)
    assert job_devices("cpu", None, 3, 0) == ("cpu", 1)  # no GPU: the accelerator's one device
    assert job_devices("auto", [1], 3, 0) == ("auto", 1)


def test_jobs_side_by_side_share_the_cores():
    assert job_threads(None, 1, 2) is None  # one job: torch's default
    assert job_threads(None, 2, 2) == 1
    assert job_threads(None, 4, 16) == 4
    assert job_threads(None, 3, 2) == 1  # never below one thread
    assert job_threads(3, 2, 2) == 3  # trainer.threads wins


def test_auto_threads_are_one_for_a_small_model_and_the_cores_for_a_large_one():
    default = step_work(width=128, depth=1, d_mlp=None, batch=64, positions=16, members=1)
    assert default == 64 * 16 * (4 * 128**2 + 2 * 128 * 512)  # attention 4 d^2, MLP 2 d d_mlp per position
    large = step_work(width=512, depth=1, d_mlp=None, batch=256, positions=16, members=1)
    assert default < ONE_THREAD_BELOW < large
    assert job_threads("auto", 1, 2, default) == 1
    assert job_threads("auto", 4, 16, default) == 1
    assert job_threads("auto", 1, 16, large) == 16  # the cores this process may use
    assert job_threads("auto", 4, 16, large) == 4  # shared out between jobs running at once
    assert step_work(128, 1, None, 64, 16, members=16) == 16 * default  # a stack is K models' work


@pytest.mark.parametrize("launcher,n_jobs,expected", [("parallel", 3, 3), ("ensemble", None, 1), ("local", None, 1)])
def test_jobs_at_once_is_read_from_the_launcher(launcher, n_jobs, expected):
    overrides = [f"hydra/launcher={launcher}"] + ([f"hydra.launcher.n_jobs={n_jobs}"] if n_jobs else [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    assert jobs_at_once(cfg.hydra.launcher) == expected


SLURM_TASK = {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "sweep", "SLURM_NODELIST": "node1", "SLURM_JOB_ID": "7",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip


def test_training_inside_a_multi_task_slurm_allocation(tmp_path, one_thread, monkeypatch):
    # Inside `sbatch --ntasks=4` Lightning's Slurm detection would refuse to start a one-process job.
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    plan = JobPlan(config("trainer.max_steps=10", "trainer.accelerator=cpu"), tmp_path / "job", "j", "g", False)
    plan.job_dir.mkdir()
    (final,) = train([plan])
    assert final["step"] == 10


def test_bf16_training_runs_finite_and_records_its_precision(cli, tmp_path):
    proc = cli("addrepro.train", "data.n_digits=2", "model.width=32", "trainer.max_steps=30", "trainer.plots=false",
               "trainer.precision=bf16-mixed", "trainer.matmul_precision=high", "trainer.progress_bar=false",
               "trainer.log_every_n_steps=5", "trainer.val_every_n_steps=10", "metrics.every_n_steps=10",
               "data.val_size=64", "metrics.carry_set_size=8", "metrics.chain_set_size=4", "logger=csv",
               f"hydra.run.dir={tmp_path / 'job'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = load_checkpoint(tmp_path / "job")["config"]  # the run's config, as W&B also records it
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["trainer"]["matmul_precision"] == "high"
    rows = load_rows(tmp_path / "job")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)  # logged at steps 0, 5 .. 25
    assert all(math.isfinite(r["val/loss"]) for r in rows if "val/loss" in r)


def test_bf16_autocast_reaches_the_model(tmp_path, one_thread, monkeypatch):
    """The matrix products of the hot loop run in bfloat16 under trainer.precision=bf16-mixed."""
    seen = set()
    original = torch.bmm

    def bmm(a, b, **kw):
        seen.add(a.dtype if not torch.is_autocast_enabled("cpu") else torch.get_autocast_dtype("cpu"))
        return original(a, b, **kw)

    monkeypatch.setattr(torch, "bmm", bmm)
    plan = JobPlan(config("trainer.max_steps=5", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"),
                   tmp_path / "job", "j", "g", False)  # fmt: skip
    plan.job_dir.mkdir()
    (final,) = train([plan])
    assert torch.bfloat16 in seen and math.isfinite(final["val/loss"])


def test_stream_saved_on_another_device_type_continues_with_a_notice():
    spec = TaskSpec(n_digits=3)
    stream = InfiniteBatches(spec, 8, seed=5)
    stream.next()
    saved = stream.state_dict()
    assert saved["device"] == "cpu"
    expected = stream.next()
    again = InfiniteBatches(spec, 8, seed=5)
    assert again.load_state_dict(saved, step=1) is None and torch.equal(again.next(), expected)
    old_format = InfiniteBatches(spec, 8, seed=5)  # checkpoints written before the device was recorded
    assert old_format.load_state_dict({"generator": saved["generator"]}, step=1) is None
    assert torch.equal(old_format.next(), expected)
    cuda_state = {"generator": torch.zeros(16, dtype=torch.uint8)}  # a Philox state: seed and offset
    for state in (cuda_state, {**cuda_state, "device": "cuda"}):
        moved = InfiniteBatches(spec, 8, seed=5)
        notice = moved.load_state_dict(state, step=40)
        assert notice == (
            "the data stream was saved on cuda and continues on cpu from a new seed (seed 5, step 40): "
            "data after step 40 differ from an uninterrupted run"
        )
        reseeded = InfiniteBatches(spec, 8, seed=(5 * 1_000_003 + 40))
        assert torch.equal(moved.next(), reseeded.next())  # reproducible


def test_resuming_a_checkpoint_from_another_device_type(tmp_path, one_thread, caplog):
    cfg = config("trainer.max_steps=20", "trainer.ckpt_every_n_steps=10")
    first = JobPlan(cfg, tmp_path / "job", "j", "g", False)
    first.job_dir.mkdir()
    train([first])
    path = first.job_dir / "checkpoints" / "step_10.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["data"] = {"generator": torch.arange(16, dtype=torch.uint8), "device": "cuda"}  # as written on a GPU
    torch.save(ckpt, path)
    resumed = dataclasses.replace(first, resume_from=path)
    with caplog.at_level(logging.WARNING, logger="addrepro"):
        (final,) = train([resumed])
    assert final["step"] == 20 and math.isfinite(final["val/loss"])
    notices = [r.getMessage() for r in caplog.records if "data stream" in r.getMessage()]
    assert notices == ["resuming: the data stream was saved on cuda and continues on cpu from a new seed "
                       "(seed 0, step 10): data after step 10 differ from an uninterrupted run"]  # fmt: skip
