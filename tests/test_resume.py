"""Runs that are killed or pre-empted and resumed, against one run trained in one go: the same weights,
optimiser moments, metrics rows, run files and W&B history."""

import json
import random
import shutil
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch
from test_reliability import one_thread_env, train_cmd

from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.rundir.confusion import load_confusion
from addrepro.rundir.metrics_file import load_rows
from addrepro.wandb_offline import find_runs, read_run

# A hair-trigger spike detector: any logged loss above its local trend counts, so the spike files of
# killed and resumed runs have content (a noisy training loss rises above its trend many times).
SPIKY = ["metrics.spike_factor=1.001", "metrics.spike_min_excess=0"]


def kill(proc, until) -> None:
    """SIGKILL ``proc`` once ``until()`` holds (or it ended, or 3 minutes passed)."""
    deadline = time.time() + 180
    while not until() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(uninterrupted, tmp_path):
    """Killed twice without warning: before its first checkpoint, then after one; resumed from elsewhere."""
    env = one_thread_env()
    quiet = {"cwd": tmp_path, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    ckpts = tmp_path / "killed" / "checkpoints"
    # Killed as soon as its W&B run exists: nothing to resume from, so resume=auto starts again, continuing
    # that W&B run; then killed after its first checkpoint.
    kill(subprocess.Popen(train_cmd("hydra.run.dir=killed"), **quiet), lambda: find_runs(tmp_path / "killed"))
    assert find_runs(tmp_path / "killed") and not (ckpts / "step_100.ckpt").exists()
    victim = subprocess.Popen(train_cmd("hydra.run.dir=killed", "resume=auto"), **quiet)
    kill(victim, lambda: (ckpts / "step_100.ckpt").exists())
    assert not (ckpts / "last.ckpt").exists(), "killed too late to test resuming"

    resumed = subprocess.run(
        train_cmd("resume=killed", "hydra.run.dir=resumer"), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(uninterrupted)
    b = load_checkpoint(tmp_path / "killed")  # the resumed run continues in the killed run's folder
    assert a["step"] == b["step"] == 400
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name

    # Metrics continue: every evaluation step once, the same values as the uninterrupted run.
    def val(job):
        return [(r["step"], r["val/loss"]) for r in load_rows(tmp_path / job) if "val/loss" in r]

    assert val("killed") == val(uninterrupted)
    assert [s for s, _ in val("killed")] == list(range(0, 401, 25))
    assert load_rows(tmp_path / "killed") == load_rows(uninterrupted)  # every train row too, once
    # The same W&B run id continues (offline: one run file per process, synced together) and reads back as
    # one run with every row of the uninterrupted run: rows a SIGKILL caught before the W&B process wrote
    # them are logged again, from the metrics file, when the run resumes.
    ids = {read_run(p).run_id for p in find_runs(tmp_path / "killed")}
    assert len(ids) == 1 and len(find_runs(tmp_path / "killed")) == 3
    killed, full = quietly_read(tmp_path / "killed"), read_run(uninterrupted)
    assert len(killed.parts) == 3 and killed.exit_code == 0
    assert comparable(killed) == comparable(full)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: RUN trained in one go, with one thread."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(
        train_cmd(*SPIKY, "hydra.run.dir=full"), cwd=root, env=one_thread_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "full"


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def preempt(tmp_path, env, sig, after_step: int, *args: str) -> int:
    """Start RUN in ``job``, send ``sig`` once ``step_<after_step>.ckpt`` exists; the step it stopped at."""
    victim = subprocess.Popen(
        train_cmd(*SPIKY, "hydra.run.dir=job", *args),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(tmp_path / "job" / "checkpoints" / f"step_{after_step}.ckpt", victim)
    victim.send_signal(sig)
    _, err = victim.communicate(timeout=180)
    assert victim.returncode == 128 + sig, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("addrepro:")]
    if sig == signal.SIGINT:  # Ctrl-C is answered at once, then stops after the step under way
        assert lines[0] == "addrepro: Ctrl-C: stopping after this step with a checkpoint (again to stop at once)"
        lines = lines[1:]
    verb = "interrupted" if sig == signal.SIGINT else "preempted"
    assert len(lines) == 1 and lines[0].startswith(f"addrepro: {verb}: {sig.name} at step "), lines
    assert "Traceback" not in err
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["status"] == "preempted"
    return status["step"]


def test_preemption_signals_checkpoint_where_they_stopped_and_resume_auto_ends_bitwise_equal(uninterrupted, tmp_path):
    """A job pre-empted twice, as SLURM does it (SIGUSR1 before the time limit, SIGTERM on requeue), then
    stopped with Ctrl-C (SIGINT): each time a checkpoint where it stopped, and resume=auto goes on."""
    env = one_thread_env()
    full_rows = load_rows(uninterrupted)
    spikes = json.loads((uninterrupted / "spikes.json").read_text())
    assert len(spikes) >= 2, "no spikes to compare: the detector settings of RUN should find some"
    stops = []
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        after = 100 if not stops else (stops[-1] // 100 + 1) * 100  # the first checkpoint of this part
        assert after < 400, f"the first part stopped at step {stops[-1]}: too late to pre-empt again"
        step = preempt(tmp_path, env, sig, after, *(["resume=auto"] if stops else []))
        stops.append(step)
        assert after <= step < 400
        assert load_checkpoint(tmp_path / "job" / "checkpoints" / f"step_{step}.ckpt")["step"] == step
        assert not (tmp_path / "job" / "checkpoints" / "last.ckpt").exists()
        # Every row up to the checkpoint reached the metrics file, none after it; the confusion matrices
        # and spikes up to it too.
        assert load_rows(tmp_path / "job") == [r for r in full_rows if r["step"] < step]
        saved, full = load_confusion(tmp_path / "job"), load_confusion(uninterrupted)
        assert saved[0].tolist() == [s for s in full[0].tolist() if s < step]
        assert np.array_equal(saved[1], full[1][: len(saved[0])], equal_nan=True)
        before = [s for s in spikes if s["step"] < step - 5 * 5]  # not the last ones: a spike may still rise
        assert json.loads((tmp_path / "job" / "spikes.json").read_text())[: len(before)] == before

    resumed = subprocess.run(
        train_cmd(*SPIKY, "hydra.run.dir=job", "resume=auto"), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_checkpoint(uninterrupted), load_checkpoint(tmp_path / "job")
    assert a["step"] == b["step"] == 400
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["moments"][name][key], b["optimizer"]["moments"][name][key])
    assert load_rows(tmp_path / "job") == full_rows  # train and validation rows, each step once
    # The files written as training went are the uninterrupted run's, and so are the reports from them.
    saved, full = load_confusion(tmp_path / "job"), load_confusion(uninterrupted)
    assert np.array_equal(saved[0], full[0]) and np.array_equal(saved[1], full[1], equal_nan=True)
    for name in ("spikes.json", "shelf_exits.json", "timeline.md", "shelves_detected.json"):
        assert (tmp_path / "job" / name).read_text() == (uninterrupted / name).read_text(), name
    # The weights at every spike were saved, those of the resumed parts the same bits as uninterrupted.
    jobs = (uninterrupted, tmp_path / "job")
    for s in spikes:
        at = f"spike_{s['first_step']}_at.ckpt"
        a, b = (torch.load(d / "checkpoints" / at, weights_only=True)["model"] for d in jobs)
        assert all(torch.equal(a[n], b[n]) for n in a), at
        assert f"## Step {s['step']}:" in (tmp_path / "job" / "spikes.md").read_text()
    assert json.loads((tmp_path / "job" / "status.json").read_text())["status"] == "ok"
    # One W&B run continued under its id: each pre-empted part closed with 128 + signal, the whole read back.
    parts = sorted(find_runs(tmp_path / "job"), key=lambda p: p.stat().st_mtime)
    assert len(parts) == 4 and len({read_run(p).run_id for p in parts}) == 1
    assert [read_run(p).exit_code for p in parts] == [
        128 + signal.SIGUSR1,
        128 + signal.SIGTERM,
        128 + signal.SIGINT,
        0,
    ]

    def steps(run):
        return [(r["trainer/global_step"], r.get("train/loss")) for r in run.history if "trainer/global_step" in r]

    assert steps(read_run(tmp_path / "job")) == steps(read_run(uninterrupted))


def test_a_preempted_ensemble_sweep_resumes_as_one_stack_and_ends_bitwise_equal(tmp_path):
    """The stack's jobs stop at one step; ``resume=auto`` trains them as one stack again, so every row,
    the gradient norms too (their float rounding depends on the stack's size), is the uninterrupted
    sweep's, and the stack pays one start-up, not one per job."""
    env = one_thread_env()
    sweep = ["-m", "seed=0,1", "hydra/launcher=ensemble"]
    full = subprocess.run(train_cmd(*sweep, "hydra.sweep.dir=full"), cwd=tmp_path, env=env, capture_output=True)
    assert full.returncode == 0, full.stderr[-2000:]
    victim = subprocess.Popen(
        train_cmd(*sweep, "hydra.sweep.dir=cut"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(tmp_path / "cut" / "0_seed=0" / "checkpoints" / "step_100.ckpt", victim)
    victim.send_signal(signal.SIGTERM)
    victim.communicate(timeout=180)
    assert victim.returncode == 128 + signal.SIGTERM
    step = json.loads((tmp_path / "cut" / "0_seed=0" / "status.json").read_text())["step"]
    assert 100 <= step < 400
    resumed = subprocess.run(
        train_cmd(*sweep, "resume=auto", "hydra.sweep.dir=cut"), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"training steps {step} to 400 (2 job(s) in this process)" in resumed.stdout + resumed.stderr
    for job in ("0_seed=0", "1_seed=1"):
        assert load_rows(tmp_path / "cut" / job) == load_rows(tmp_path / "full" / job), job
        a, b = (load_checkpoint(tmp_path / d / job) for d in ("full", "cut"))
        assert a["step"] == b["step"] == 400
        assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"]), job


def stepped_rows(run):
    """Every row logged at a training step, with every key but W&B's own (``_step``, ``_runtime``, …)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in run.history if "trainer/global_step" in r]


def stepped(run):
    return [
        (r["trainer/global_step"], r.get("train/loss"), r.get("val/loss"))
        for r in run.history
        if "trainer/global_step" in r
    ]


def test_wandb_history_of_a_run_resumed_after_finishing_keeps_every_row(uninterrupted, tmp_path):
    env = one_thread_env()
    for args in (["trainer.max_steps=200"], ["resume=auto"]):  # RUN's plots are off: no PNGs to log at the end
        proc = subprocess.run(
            train_cmd(*SPIKY, *args, "hydra.run.dir=continued"), cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    full, continued = read_run(uninterrupted), read_run(tmp_path / "continued")
    assert len(continued.parts) == 2
    # What is logged at the end (the shelves table; the plots too, when drawn) carries no training step,
    # and wandb's _step restarts in each process.
    assert "_step" in continued.history[-1] and "trainer/global_step" not in continued.history[-1]
    assert len(stepped(full)) > 20 and stepped(continued) == stepped(full)

    def unstepped(run):
        return sorted(k for r in run.history if "trainer/global_step" not in r for k in r if not k.startswith("_"))

    assert unstepped(continued) == unstepped(full) != [] and "shelves" in unstepped(full)


def resume_auto(tmp_path):
    """``resume=auto`` of the job folder ``<tmp_path>/job``, to its end."""
    return subprocess.run(
        train_cmd(*SPIKY, "hydra.run.dir=job", "resume=auto"),
        cwd=tmp_path,
        env=one_thread_env(),
        capture_output=True,
        text=True,
    )


def quietly_read(path):
    """``read_run`` of a file cut short by a kill, without the warning that says so."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_run(path)


def comparable(run):
    """Stepped rows with images compared by content (their file names count images per process)."""
    return [
        {k: v["sha256"] if isinstance(v, dict) and "sha256" in v else v for k, v in row.items()}
        for row in stepped_rows(run)
    ]


def test_rows_the_wandb_file_lost_are_logged_again_on_resume(uninterrupted, tmp_path):
    """A SIGKILL leaves the W&B file cut short, rows the metrics file has missing from it: the resumed run
    logs them again, confusion images included, so the whole run's history is the uninterrupted run's."""
    job = tmp_path / "job"
    shutil.copytree(uninterrupted, job, symlinks=True)
    (wandb_file,) = find_runs(job)
    data = wandb_file.read_bytes()
    # Cut where the file holds rows up to about step 150 of 400 (checkpoint at 200): what a kill leaves.
    lo, hi = 0, len(data)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        wandb_file.write_bytes(data[:mid])
        last = max((r[0] for r in stepped(quietly_read(wandb_file))), default=-1)
        lo, hi = (mid, hi) if last < 150 else (lo, mid)
    wandb_file.write_bytes(data[:lo])
    cut = quietly_read(wandb_file)
    assert 100 <= stepped(cut)[-1][0] < 150 and len(stepped_rows(cut)) < len(stepped_rows(read_run(uninterrupted)))
    proc = subprocess.run(
        train_cmd(*SPIKY, f"resume={job / 'checkpoints' / 'step_200.ckpt'}"),
        cwd=tmp_path,
        env=one_thread_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "WandbLogWarning" not in proc.stderr
    whole = quietly_read(job)  # the cut part may end mid-record
    assert len(whole.parts) == 2
    assert comparable(whole) == comparable(read_run(uninterrupted))
    assert any("val/confusion" in row for row in stepped_rows(whole) if 150 <= row["trainer/global_step"] < 200)


def test_a_confusion_image_the_wandb_file_lost_is_logged_again_with_its_step(uninterrupted, tmp_path):
    """A kill during the end-of-run files can leave the W&B file with the last evaluation's rows but not
    its confusion image (logged after them): the resumed run logs that step again, image included."""
    job = tmp_path / "job"
    shutil.copytree(uninterrupted, job, symlinks=True)
    (job / "end_of_run.json").unlink()
    (wandb_file,) = find_runs(job)
    data = wandb_file.read_bytes()
    last = max(r["trainer/global_step"] for r in stepped_rows(read_run(uninterrupted)) if "val/confusion" in r)

    def imaged(n):
        wandb_file.write_bytes(data[:n])
        return any(
            r["trainer/global_step"] == last and "val/confusion" in r for r in stepped_rows(quietly_read(wandb_file))
        )

    lo, hi = 0, len(data)  # the longest prefix without the last image
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if imaged(mid) else (mid, hi)
    wandb_file.write_bytes(data[:lo])
    cut = comparable(quietly_read(wandb_file))
    assert cut == comparable(read_run(uninterrupted))[: len(cut)] and any(r["trainer/global_step"] == last for r in cut)
    proc = resume_auto(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert comparable(quietly_read(job)) == comparable(read_run(uninterrupted))


def test_sigkills_at_random_moments_then_resume_auto_end_as_the_uninterrupted_run(uninterrupted, tmp_path):
    """Three SIGKILLs at moments drawn at random (counted in metrics rows written, so any machine draws
    the same moments), one more once ``last.ckpt`` exists (during the end-of-run files), each followed
    by ``resume=auto``: weights, Adam moments, every metrics row, every W&B row and the end-of-run files
    are the uninterrupted run's."""
    rng = random.Random(20261205)
    env = one_thread_env()
    job, cmd = tmp_path / "job", train_cmd(*SPIKY, "hydra.run.dir=job", "resume=auto")
    quiet = {"cwd": tmp_path, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    total = len(load_rows(uninterrupted))
    moments = [10 * m for m in sorted(rng.sample(range(1, total // 10), 3))]

    def rows_written():
        path = job / "csv" / "metrics.csv"
        return path.read_text().count("\n") - 1 if path.exists() else 0

    for at in moments:
        kill(subprocess.Popen(cmd, **quiet), lambda at=at: rows_written() >= at)
    kill(subprocess.Popen(cmd, **quiet), lambda: (job / "checkpoints" / "last.ckpt").exists())
    final = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    assert (job / "end_of_run.json").exists()
    a, b = load_checkpoint(uninterrupted), load_checkpoint(job)
    assert a["step"] == b["step"] == 400
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    moments_a, moments_b = a["optimizer"]["moments"], b["optimizer"]["moments"]
    assert moments_a.keys() == moments_b.keys() and a["optimizer"]["step_count"] == b["optimizer"]["step_count"]
    for kind in moments_a:
        assert all(torch.equal(moments_a[kind][n], moments_b[kind][n]) for n in moments_a[kind]), kind
    assert load_rows(job) == load_rows(uninterrupted)
    assert comparable(quietly_read(job)) == comparable(read_run(uninterrupted))
    for name in ("timeline.md", "spikes.md", "shelves_detected.json"):
        assert (job / name).read_text() == (uninterrupted / name).read_text(), name


def test_a_run_killed_between_its_final_checkpoint_and_last_ckpt_gets_both_on_resume(uninterrupted, tmp_path):
    """The last step's ``step_400.ckpt`` is written after the final evaluation, then ``last.ckpt``, then the
    end-of-run files: a kill between the two checkpoints is resumed from the first, which covers every row,
    and gets ``last.ckpt`` (the same bytes) and the files."""
    full = uninterrupted / "checkpoints"
    assert (full / "step_400.ckpt").read_bytes() == (full / "last.ckpt").read_bytes()
    job = tmp_path / "job"
    shutil.copytree(uninterrupted, job, symlinks=True)
    for name in ("checkpoints/last.ckpt", "end_of_run.json", "timeline.md", "spikes.md"):  # never written
        (job / name).unlink()
    proc = resume_auto(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (job / "checkpoints" / "last.ckpt").read_bytes() == (full / "last.ckpt").read_bytes()
    assert load_rows(job) == load_rows(uninterrupted)
    assert comparable(quietly_read(job)) == comparable(read_run(uninterrupted))
    for name in ("timeline.md", "spikes.md"):
        assert (job / name).read_text() == (uninterrupted / name).read_text(), name
    assert (job / "end_of_run.json").exists()
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
