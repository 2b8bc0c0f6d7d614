"""The training command as a user runs it, in a subprocess (a multirun read back from W&B: test_sweeps.py)."""

import json
import subprocess
import sys

import torch
from conftest import FAST, cli_env

from addrepro.rundir.checkpoints import log_spaced_steps
from addrepro.rundir.job import job_dirs
from addrepro.rundir.metrics_file import load_rows


def test_short_run_lowers_the_loss(cli, tmp_path):
    proc = cli(
        "addrepro.train",
        "data.n_digits=2",
        "trainer.max_steps=150",
        "model.width=64",
        "optimizer.lr=3e-3",
        "logger=csv",
        "hydra.run.dir=run",
        *FAST,
        "trainer.ckpt_schedule=log",  # the default (FAST turns it off)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Weights-only checkpoints at step 0 and 20 log-spaced steps, resumable ones only at the end
    ckpts = tmp_path / "run" / "checkpoints"
    weights = sorted(int(p.stem.split("_")[1]) for p in ckpts.glob("weights_*.ckpt"))
    assert weights == log_spaced_steps(150, 20) and not list(ckpts.glob("step_*.ckpt"))
    first = torch.load(ckpts / "weights_1.ckpt", weights_only=True)
    assert first["step"] == 1 and "optimizer" not in first and "embed.W_E" in first["model"]
    rows = [r for r in load_rows(tmp_path / "run") if "val/loss" in r]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 150
    assert rows[0]["val/loss"] > 2.0  # the untrained model (seeded init, same on every CPU): near log 10
    # (c) a robust margin: the loss is below 0.6x its start by step ~75 and at 0.20-0.29x by step 150 on
    # every seed tried (seeds 0-3), a far bigger change than another CPU's rounding
    assert rows[-1]["val/loss"] < 0.6 * rows[0]["val/loss"]


def test_weights_at_chosen_steps_are_the_weights_of_a_run_stopped_there(cli, tmp_path):
    common = ["data.n_digits=2", "model.width=16", "logger=csv", "trainer.plots=false", *FAST]
    proc = cli("addrepro.train", *common, "trainer.max_steps=40", "trainer.ckpt_steps=[7,23]", "hydra.run.dir=long")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "long" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("weights_*.ckpt")) == ["weights_23.ckpt", "weights_7.ckpt"]
    proc = cli("addrepro.train", *common, "trainer.max_steps=23", "hydra.run.dir=short")
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = torch.load(ckpts / "weights_23.ckpt", weights_only=True)
    stopped = torch.load(tmp_path / "short" / "checkpoints" / "last.ckpt", weights_only=True)
    assert chosen["step"] == stopped["step"] == 23
    assert chosen["model"].keys() == stopped["model"].keys()
    assert all(torch.equal(chosen["model"][n], stopped["model"][n]) for n in chosen["model"])


def test_runs_started_together_get_separate_folders(tmp_path):
    args = [
        sys.executable,
        "-m",
        "addrepro.train",
        "trainer.max_steps=2",
        "logger=csv",
        "trainer.plots=false",
        "data.n_digits=1",
        *FAST,
    ]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    folders = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(folders) == 2
    assert all((f / "checkpoints" / "last.ckpt").exists() for f in folders)


def test_bad_values_stop_before_training_with_one_line(tmp_path):
    # The whole table of bad values is in test_config_check.py; here, what a user sees.
    cases = {
        "data.base=40": "data.base=40 is invalid: must be an integer in 2..36",
        "model.width=130": "model.width=130 is invalid: must be divisible by model.n_heads=4 (or set model.d_head)",
        "data.task=mul": "data.task='mul' is invalid: must be one of add, digitwise",
        "optimizer.lr=-1": "optimizer.lr=-1 is invalid: must be a finite number > 0.0",
    }
    # The four commands run at once, each in its own folder.
    procs = {
        override: subprocess.Popen(
            [sys.executable, "-m", "addrepro.train", override, f"hydra.run.dir=bad{i}"],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for i, override in enumerate(cases)
    }
    for i, (override, message) in enumerate(cases.items()):
        _, stderr = procs[override].communicate(timeout=300)
        assert procs[override].returncode == 2, (override, stderr[-2000:])
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines == [f"addrepro: config error: {message}"], (override, lines)
        assert not (tmp_path / f"bad{i}" / "checkpoints").exists()


def test_unknown_key_is_refused_without_traceback(cli):
    proc = cli("addrepro.train", "model.widht=64")
    assert proc.returncode != 0
    assert "widht" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bad_value_in_one_job_stops_the_sweep_before_any_job_starts(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("addrepro.train", "-m", "data.base=10,40", "data.n_digits=2", f"hydra.sweep.dir={sweep}", *FAST)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "addrepro: config error: data.base=40 is invalid: must be an integer in 2..36 (in job 1: data.base=40; "
        "no job was started)"
    ]
    assert not sweep.exists()


def test_failing_job_does_not_stop_the_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "addrepro.train",
        "-m",
        "optimizer.lr=1e30,1e-3",  # the first job diverges while it trains (a bad value would stop the sweep)
        "data.n_digits=2",
        "trainer.max_steps=5",
        "logger=csv",
        "trainer.plots=false",
        f"hydra.sweep.dir={sweep}",
        *FAST,
    )
    assert proc.returncode == 1
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (
        summary[job_dirs(sweep)[0].name]["status"] == "failed"
        and "Divergence" in summary[job_dirs(sweep)[0].name]["message"]
    )
    assert summary[job_dirs(sweep)[1].name]["status"] == "ok"
    assert f"job {job_dirs(sweep)[0].name} failed: " in proc.stderr
    assert torch.load(job_dirs(sweep)[1] / "checkpoints" / "last.ckpt", weights_only=True)["step"] == 5


def test_a_sweep_jobs_folder_is_resumed_given_as_it_is_named(cli, tmp_path):
    """``resume=<sweep>/1_optimizer.lr=0.001,seed=1``: the ``=`` and ``,`` of the folder names a sweep gives
    its jobs are Hydra grammar, yet the folder is given as it is."""
    args = ["data.n_digits=2", "model.width=16", "logger=csv", "trainer.plots=false", *FAST]
    first = cli("addrepro.train", *args, "trainer.max_steps=20", "hydra.run.dir=run")
    assert first.returncode == 0, first.stderr[-3000:]
    member = tmp_path / "sweep" / "1_optimizer.lr=0.001,seed=1"
    member.parent.mkdir()
    (tmp_path / "run").rename(member)
    again = cli("addrepro.train", *args, "trainer.max_steps=40", f"resume={member.relative_to(tmp_path)}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(r["step"] for r in load_rows(member)) == 40
