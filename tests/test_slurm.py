"""Sweeps on a real Slurm scheduler (``hydra/launcher=slurm``, submitit): jobs, failures, pre-emption.

``.ci/slurm/start.sh`` starts a single-node Slurm with accounting on this machine (``.ci/run`` calls it
before the suite); where no ``sbatch`` exists these tests are skipped, saying so.
"""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, cli_env, run_cli

from addrepro.rundir.job import job_dirs
from addrepro.rundir.metrics_file import load_rows

pytestmark = pytest.mark.slurm

TINY = ["data.n_digits=2", "model.width=16", "logger=csv", "trainer.plots=false", *FAST]
# One CPU and a little memory per job, no GPU: what this single node has.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("no Slurm on this machine (bash .ci/slurm/start.sh installs and starts a local one)")
    up = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30)
    if up.returncode != 0 or "up" not in up.stdout:
        pytest.skip(f"Slurm is installed but not running (bash .ci/slurm/start.sh): {up.stderr.strip()}")


def slurm_jobs(sweep) -> set[str]:  # noqa: ANN001
    """The Slurm job ids of a sweep (submitit keeps a folder per job and per array task)."""
    return {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.is_dir()}


def slurm_states(job_id: str) -> dict[str, str]:
    """``task id -> state`` of a Slurm job (array tasks as ``<id>_<i>``), from accounting."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "--format=JobID,State"], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(line.split("|")[:2] for line in out.splitlines() if line)


def test_a_sweep_runs_as_slurm_array_tasks_and_a_failed_job_is_reported_failed(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "optimizer.lr=1e-3,1e30", *TINY, "trainer.max_steps=30", *LAUNCHER, f"hydra.sweep.dir={sweep}"]
    proc = run_cli("addrepro.train", args, tmp_path, timeout=600)
    # The diverging job fails; Slurm sees a finished task, but the sweep says which job failed and exits non-zero.
    assert proc.returncode != 0, proc.stderr[-2000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (
        summary[job_dirs(sweep)[0].name]["status"] == "ok" and summary[job_dirs(sweep)[1].name]["status"] == "failed"
    ), summary
    assert "Divergence" in summary[job_dirs(sweep)[1].name]["message"]
    assert "1/2 jobs ok" in proc.stderr and "failed" in proc.stderr
    (job_id,) = slurm_jobs(sweep)  # one Slurm job: the array of both
    states = slurm_states(job_id)
    assert sorted(states) == [f"{job_id}_0", f"{job_id}_1"], states
    assert max(r["step"] for r in load_rows(job_dirs(sweep)[0])) == 30


@pytest.mark.parametrize("launcher_name,seeds", [("slurm", [0]), ("slurm_ensemble", [0, 1])], ids=["single", "stacked"])
def test_a_job_preempted_by_a_higher_priority_partition_is_requeued_and_ends_bitwise_equal(
    slurm, tmp_path, launcher_name, seeds
):
    """A real pre-emption: a job of the "high" partition takes the node from the sweep's task, which gets
    submitit's signal, writes a checkpoint per job, is requeued by submitit and continues with
    resume=auto — one job alone, or a stack of two as one task (each job ends as it would alone)."""
    sweep = tmp_path / "sweep"
    # a one-job multirun sweeps nothing: the folder is the job's number alone
    jobs = [sweep / "0"] if len(seeds) == 1 else [sweep / f"{i}_seed={s}" for i, s in enumerate(seeds)]
    steps = 600
    run_args = [*TINY, f"trainer.max_steps={steps}"]
    # submitit takes any signal for a time-out below ~10 minutes of limit; a pre-emption needs more.
    launcher = [*LAUNCHER[1:], f"hydra/launcher={launcher_name}", "hydra.launcher.partition=debug"]
    launcher.append("hydra.launcher.timeout_min=15")
    seed_arg = f"seed={','.join(map(str, seeds))}"
    sweep_proc = start_train(
        ["-m", seed_arg, *run_args, "resume=auto", *launcher, f"hydra.sweep.dir={sweep}"], tmp_path
    )
    try:
        wait_for(lambda: logged_steps(jobs[0]) >= 50, 120, "the sweep's job to train 50 steps")
        high = subprocess.run(
            ["sbatch", "--parsable", "-p", "high", "-c", str(node_cpus()), "-o", "/dev/null", "--wrap", "sleep 3"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert high.returncode == 0, high.stderr
        for job in jobs:
            wait_for(lambda job=job: status(job).get("status") == "preempted", 60, f"{job.name} to be pre-empted")
        preempted = [status(job) for job in jobs]
        out, err = sweep_proc.communicate(timeout=300)
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
    assert sweep_proc.returncode == 0, err[-2000:]
    (job_id,) = slurm_jobs(sweep)
    assert len(slurm_states(job_id)) == 1  # one task, even for the stack
    assert "PREEMPTED" in slurm_history(job_id) or "REQUEUED" in slurm_history(job_id), slurm_history(job_id)
    # The same sweep uninterrupted, here (a stack as a local stack: its global gradient norm is summed in
    # another order than a lone model's), one thread: weights and every metrics row bitwise equal.
    local = "hydra/launcher=ensemble" if len(seeds) > 1 else "hydra/launcher=basic"
    alone = tmp_path / "alone"
    args = ["-m", seed_arg, *run_args, "trainer.threads=1", local, f"hydra.sweep.dir={alone}"]
    proc = run_cli("addrepro.train", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, before in zip(jobs, preempted, strict=True):
        assert before["message"].startswith("SIGUSR2 at step")  # submitit's signal, sent by Slurm at pre-emption
        assert before["step"] < steps and (job / "checkpoints" / before["checkpoint"]).exists()
        assert status(job)["status"] == "ok"
        resumed = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        uninterrupted = torch.load(alone / job.name / "checkpoints" / "last.ckpt", weights_only=True)
        assert resumed["step"] == uninterrupted["step"] == steps
        assert all(torch.equal(resumed["model"][k], v) for k, v in uninterrupted["model"].items())
        moments = uninterrupted["optimizer"]["moments"]
        assert all(torch.equal(resumed["optimizer"]["moments"][k][m], v[m]) for k, v in moments.items() for m in v)
        assert load_rows(job) == load_rows(alone / job.name)  # every metrics row, the gradient norms too


def start_train(args: list[str], cwd) -> subprocess.Popen:  # noqa: ANN001
    """``python -m addrepro.train <args>`` started in the background, as a user's shell would."""
    return subprocess.Popen(
        [sys.executable, "-m", "addrepro.train", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[0])


def slurm_history(job_id: str) -> str:
    """Every state the job's tasks went through (accounting keeps one line per requeue)."""
    return subprocess.run(
        ["sacct", "-n", "-D", "-P", "-j", job_id, "--format=JobID,State"], capture_output=True, text=True, timeout=30
    ).stdout


def status(job_dir) -> dict:  # noqa: ANN001
    try:
        return json.loads((job_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def logged_steps(job_dir) -> int:  # noqa: ANN001
    try:
        return max((r["step"] for r in load_rows(job_dir)), default=0)
    except (OSError, ValueError):
        return 0


def wait_for(condition, seconds: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_a_packed_sweep_runs_in_fewer_array_tasks_and_a_rerun_submits_only_what_is_left(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2", "optimizer.lr=1e-3,3e-3", *TINY, "trainer.max_steps=20", "resume=auto"]
    args += [*LAUNCHER, "hydra/launcher=slurm_ensemble", "hydra.launcher.max_members=4", f"hydra.sweep.dir={sweep}"]
    proc = run_cli("addrepro.train", args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6/6 jobs ok" in proc.stderr
    (job_id,) = slurm_jobs(sweep)
    assert sorted(slurm_states(job_id)) == [f"{job_id}_0", f"{job_id}_1"]  # 6 jobs: stacks of 4 and 2
    jobs = job_dirs(sweep)
    assert len(jobs) == 6 and all(max(r["step"] for r in load_rows(job)) == 20 for job in jobs)
    # Every member trained its own model: no two jobs end with the same weights.
    finals = [torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["model"]["embed.W_E"] for job in jobs]
    assert all(not torch.equal(finals[i], finals[j]) for i in range(6) for j in range(i))
    # The submitting shell died while job 4 ran: the same command again re-submits that job alone.
    (jobs[4] / "status.json").write_text(json.dumps({"status": "running", "pid": 2**22 + 1, "host": "elsewhere"}))
    again = run_cli("addrepro.train", args, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "6/6 jobs ok (5 finished before, not run again)" in again.stderr
    assert len(slurm_jobs(sweep)) == 2
    (new_id,) = slurm_jobs(sweep) - {job_id}
    assert len(slurm_states(new_id)) == 1  # one task (submitit sends a single task as a plain job)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [("skipped" in summary[job.name]) for job in jobs] == [True, True, True, True, False, True]


def test_array_tasks_cancelled_before_they_start_are_failed_jobs_of_the_sweep(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *TINY, "trainer.max_steps=20", *LAUNCHER, f"hydra.sweep.dir={sweep}"]
    args.append("+hydra.launcher.additional_parameters.begin=now+3600")  # held: it never starts
    proc = start_train(args, tmp_path)
    try:
        wait_for(lambda: (sweep / ".submitit").is_dir() and slurm_jobs(sweep), 60, "the array to be submitted")
        (job_id,) = slurm_jobs(sweep)
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "0/2 jobs ok" in err and "Traceback" not in err, err[-2000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    jobs = job_dirs(sweep)
    assert [job.name for job in jobs] == ["0_seed=0", "1_seed=1"]  # made with Hydra's configs, never run
    for job in jobs:
        assert summary[job.name]["status"] == "failed"
        assert summary[job.name]["message"].startswith(f"Slurm job {job_id}_") and "state CANCELLED" in err
        assert (job / ".hydra" / "config.yaml").is_file() and not (job / "csv").exists()


def test_a_job_reaching_its_time_limit_is_requeued_and_ends_bitwise_equal(slurm, tmp_path):
    """A 2-minute limit with the signal 60 s before it: submitit's SIGUSR2 comes while the job trains
    (Slurm checks signal times about once a minute, so it can come earlier), the job checkpoints and is
    requeued as timed out, and continues with resume=auto until it ends."""
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    steps = 24_000  # well over a minute of training on the CPUs this suite runs on (~2 min on a 2-core EPYC)
    run_args = ["seed=0", *TINY, f"trainer.max_steps={steps}", "trainer.ckpt_every_n_steps=4000"]
    # As many requeues as a slow or busy machine needs: each life trains about a minute.
    launcher = [*LAUNCHER, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60"]
    launcher.append("hydra.launcher.max_num_timeout=20")
    sweep_proc = start_train(["-m", *run_args, "resume=auto", *launcher, f"hydra.sweep.dir={sweep}"], tmp_path)
    try:  # the same run uninterrupted, meanwhile (one thread each: bitwise comparable)
        # ~2 min on an idle 2-core machine, beside the Slurm task and another test worker: room for a busy one
        alone = run_cli(
            "addrepro.train", [*run_args, "trainer.threads=1", "hydra.run.dir=alone"], tmp_path, timeout=900
        )
        assert alone.returncode == 0, alone.stderr[-2000:]
        out, err = sweep_proc.communicate(timeout=900)
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
    assert sweep_proc.returncode == 0, err[-2000:]
    log = (job / "train.log").read_text()
    assert "Job has timed out" in log and "resuming" in log, log[-3000:]
    (job_id,) = slurm_jobs(sweep)
    assert "REQUEUED" in slurm_history(job_id), slurm_history(job_id)
    assert status(job)["status"] == "ok"
    assert json.loads((sweep / "sweep_summary.json").read_text())["0"]["status"] == "ok"
    resumed = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
    uninterrupted = torch.load(tmp_path / "alone" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == steps
    assert all(torch.equal(resumed["model"][k], v) for k, v in uninterrupted["model"].items())
    moments = uninterrupted["optimizer"]["moments"]
    assert all(torch.equal(resumed["optimizer"]["moments"][k][m], v[m]) for k, v in moments.items() for m in v)
    assert load_rows(job) == load_rows(tmp_path / "alone")
