"""Runs that diverge, get bad checkpoints, no network, a busy folder or a full disk: one clear line, nothing
lost, nothing hangs (killed and resumed runs: test_resume.py)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, REPO, cli_env, fit_bare, run_cli

from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.rundir.job import job_dirs
from addrepro.training.recorder import Divergence
from addrepro.wandb_offline import find_runs, read_run

RUN = [
    "data.n_digits=3",
    "model.width=32",
    "trainer.max_steps=400",
    "trainer.ckpt_every_n_steps=100",
    "trainer.plots=false",
    *FAST,
]


def one_thread_env():
    # Bitwise equality on the CPU needs a fixed reduction order: one thread in both runs.
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def train_cmd(*args):
    return [sys.executable, "-m", "addrepro.train", *RUN, *args]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    target = tmp_path / "last.ckpt"
    writer = (
        "import sys, torch\n"
        "from addrepro.rundir.checkpoints import save_checkpoint\n"
        "save_checkpoint(sys.argv[1], {'step': 1, 'model': {'w': torch.zeros(10)}})\n"
        "print('saved', flush=True)\n"
        "big = {'w': torch.randn(64_000_000)}\n"
        "while True:\n"
        "    save_checkpoint(sys.argv[1], {'step': 2, 'model': big})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    good = sha(target)
    tmp_seen = False
    deadline = time.time() + 60
    while time.time() < deadline and not tmp_seen:  # kill while a temporary file is being written
        tmp_seen = any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir())
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_seen
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["step"] in (1, 2)  # the old file, or a complete new one: never a torn one
    if ckpt["step"] == 1:
        assert sha(target) == good


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """RUN trained for 100 steps (offline W&B), in ``<root>/job``; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    proc = run_cli("addrepro.train", [*RUN, "trainer.max_steps=100", "hydra.run.dir=job"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "job"


def test_divergence_stops_names_the_step_and_keeps_the_last_good_checkpoint(finished, tmp_path, cli):
    shutil.copytree(finished, tmp_path / "job", symlinks=True)
    good = sha(tmp_path / "job" / "checkpoints" / "last.ckpt")
    # Continue it with an absurd learning rate: the loss turns NaN within a few steps.
    bad = cli(
        "addrepro.train", *RUN, "trainer.max_steps=300", "resume=job", "optimizer.lr=1e30", "hydra.run.dir=resumer"
    )
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.startswith("addrepro:")]
    assert len(lines) == 1 and lines[0].startswith("addrepro: diverged: step 1")
    assert "first non-finite loss at step 10" in lines[0] and "Traceback" not in bad.stderr
    assert sha(tmp_path / "job" / "checkpoints" / "last.ckpt") == good
    assert not (tmp_path / "job" / "checkpoints" / "step_200.ckpt").exists()
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["status"] == "failed" and "non-finite" in status["message"]
    runs = sorted(find_runs(tmp_path / "job"), key=lambda p: p.stat().st_mtime)
    assert read_run(runs[-1]).exit_code == 1  # the W&B run is marked failed


def test_bad_checkpoints_fail_with_one_line_naming_what_differs(finished, tmp_path, cli):
    job = finished  # every command is refused before it writes anything into the job's folder
    ckpt = job / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = {p: sha(p) for p in job.rglob("*") if p.is_file()}
    cases = {
        "resume=nowhere": ["addrepro: checkpoint error: resume=nowhere does not exist"],
        f"resume={truncated}": [f"addrepro: checkpoint error: checkpoint={truncated} cannot be read"],
        f"resume={job} model.width=64 data.base=16": [
            "data.base: checkpoint 10 vs config 16",
            "model.width: checkpoint 32 vs config 64",
        ],
        f"resume={job} model.depth=2 data.order=lsb": [
            "data.order: checkpoint 'msb' vs config 'lsb'",
            "model.depth: checkpoint 1 vs config 2",
        ],
    }
    for args, expected in cases.items():
        proc = cli("addrepro.train", *RUN, "logger=csv", *args.split(), "hydra.run.dir=again")
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-1500:])
        assert all(e in lines[0] for e in expected), (args, lines[0])
    assert {p: sha(p) for p in job.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "again").exists()  # the refused runs' folders are gone


def test_online_wandb_without_network_falls_back_to_offline(tmp_path):
    env = {**cli_env(), "WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    start = time.time()
    proc = subprocess.run(
        train_cmd("trainer.max_steps=10", "logger.wandb.init_timeout=2", "hydra.run.dir=job"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.time() - start < 120
    assert "W&B online unavailable" in proc.stderr and "logging offline instead" in proc.stderr
    offline = [p for p in find_runs(tmp_path / "job") if "offline-run-" in str(p)]
    assert len(offline) == 1 and "train/loss/place_3" in read_run(offline[0]).history_keys


def test_sweep_with_a_diverging_job_finishes_the_others(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "addrepro.train", "-m", "optimizer.lr=1e-3,1e30,2e-3", *RUN, "trainer.max_steps=30", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 1
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [summary[job.name]["status"] for job in job_dirs(sweep)] == ["ok", "failed", "ok"]
    assert "Divergence" in summary[job_dirs(sweep)[1].name]["message"]
    assert f"job {job_dirs(sweep)[1].name} failed" in proc.stderr
    assert [read_run(job_dirs(sweep)[int(j)]).exit_code for j in ("0", "1", "2")] == [0, 1, 0]
    assert all((job_dirs(sweep)[int(j)] / "checkpoints" / "last.ckpt").exists() for j in ("0", "2"))
    assert not (job_dirs(sweep)[1] / "checkpoints" / "last.ckpt").exists()


HOLD_LOCK = (
    "import sys, time\n"
    "from addrepro.rundir.lock import acquire\n"
    "acquire(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_process_in_a_run_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    env = one_thread_env()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "job")], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            train_cmd("trainer.max_steps=20", "hydra.run.dir=job"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"addrepro: run folder error: {tmp_path}/job is in use by pid {holder.pid} on ")
        assert not (tmp_path / "job" / "status.json").exists()  # the holder's folder is left alone
        assert not (tmp_path / "job" / "checkpoints").exists()
        assert not (tmp_path / "job" / ".hydra").exists()  # refused before Hydra writes its configs there
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing its lock; a killed run also left temporary files behind.
    stale = [
        tmp_path / "job" / "checkpoints" / ".step_220.ckpt.addrepro-k3j2.tmp",
        tmp_path / "job" / ".place_loss.png.addrepro-x1.tmp",
    ]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    users = tmp_path / "job" / ".notes.txt.tmp"  # a temporary file of another program: never touched
    users.write_text("mine")
    third = subprocess.run(  # resume=auto: a folder that holds files is taken only to continue what is there
        train_cmd("trainer.max_steps=20", "trainer.plots=true", "logger=csv", "hydra.run.dir=job", "resume=auto"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o002),
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert not any(p.exists() for p in stale)
    assert users.read_text() == "mine"
    assert not (tmp_path / "job" / ".lock").exists()  # released at the end
    # Files follow the umask (0o002: group-writable), whichever way they were written.
    written = [
        "status.json",
        "checkpoints/last.ckpt",
        "csv/metrics.csv",
        "confusion.npz",
        "spikes.json",
        "place_loss.png",
    ]
    modes = {name: oct((tmp_path / "job" / name).stat().st_mode & 0o777) for name in written}
    assert modes == dict.fromkeys(written, oct(0o664))


def mount_tmpfs(folder, options):
    """Mount a small tmpfs at ``folder`` (needs root and a working mount), else skip."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mount failed: {proc.stderr.decode().strip()}")


def test_disk_full_ends_in_one_line_naming_the_file_and_leaves_nothing_half_written(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=2m")
    try:
        # Each checkpoint of this model is ~180 kB: the 2 MiB disk fills after about ten of them.
        proc = subprocess.run(
            train_cmd(
                "model.width=32", "trainer.max_steps=300", "trainer.ckpt_every_n_steps=10", f"hydra.run.dir={disk}/job"
            ),
            cwd=tmp_path,
            env=one_thread_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
        assert lines[0].startswith(f"addrepro: storage error: [Errno 28] cannot write {disk}/job/"), lines
        assert lines[0].endswith("No space left on device")
        status = json.loads((disk / "job" / "status.json").read_text())
        assert status["status"] == "failed" and "No space left on device" in status["message"]
        assert not list((disk / "job").rglob(".*.tmp"))
        ckpts = sorted((disk / "job" / "checkpoints").glob("step_*.ckpt"))
        assert len(ckpts) >= 3
        assert all(load_checkpoint(p)["step"] == int(p.stem.split("_")[1]) for p in ckpts)  # all whole
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_read_only_output_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        mount_tmpfs(folder, "ro,size=1m")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        proc = subprocess.run(
            train_cmd("trainer.max_steps=20", f"hydra.run.dir={folder}/job"),
            cwd=tmp_path,
            env=one_thread_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            f"addrepro: storage error: cannot write the output folder {folder}/job: "
        ), lines
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=False)
        else:
            folder.chmod(0o755)


def trained_module(tmp_path, lrs):
    """A real module after 10 optimiser steps of ``len(lrs)`` stacked members (no callbacks: no files)."""
    from hydra import compose, initialize_config_dir

    from addrepro.training.config import architecture, task_spec, typed
    from addrepro.training.module import AdditionModule
    from addrepro.training.recorder import Member

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.n_digits=2", "model.width=16", *FAST])
    spec = task_spec(cfg.data)
    members = [
        Member(seed=0, data_seed=0, lr=lr, weight_decay=0.1, job_dir=tmp_path / f"m{k}") for k, lr in enumerate(lrs)
    ]
    module = AdditionModule(spec, architecture(cfg.model, spec), members, typed(cfg))
    fit_bare(module, max_steps=10)
    return module


def test_no_checkpoint_with_non_finite_optimiser_state_and_the_quantity_is_named(tmp_path):
    module = trained_module(tmp_path, [1e-3])
    assert len(module.resumable_states(10)) == 1  # all finite: a checkpoint can be written
    name = "blocks.0.attn.W_Q"
    param = dict(module.model.named_parameters())[name]
    module.opt.state[param]["exp_avg_sq"].view(-1)[3] = float("inf")  # the weights themselves stay finite
    assert all(q.isfinite().all() for q in module.model.parameters())
    with pytest.raises(Divergence, match=rf"^step 10: non-finite optimizer state exp_avg_sq of {name}; "):
        module.resumable_states(10)


def test_a_member_with_non_finite_state_gets_no_checkpoint_the_others_do(tmp_path):
    module = trained_module(tmp_path, [1e-3, 2e-3])
    with torch.no_grad():
        module.model.embed.W_E[1, 0, 0] = float("nan")  # member 1 only
    states = module.resumable_states(10)
    assert states[0] is not None and states[1] is None
    message = "step 10: non-finite weights in embed.W_E (seed 0, m1); the last good checkpoint is kept"
    assert module.recorder.failed == {1: message}
    assert all(t.isfinite().all() for t in states[0]["model"].values())


@pytest.mark.parametrize("content", [b"5", b"[1, 2]", b'"text"', b"\x00\x01\xff", b'{"pid": "x"'])
def test_a_torn_or_foreign_lock_file_is_taken_over_once_old_and_refused_in_one_line_while_new(tmp_path, content):
    from addrepro.rundir.lock import LockError, acquire, check_free, release

    lock = tmp_path / ".lock"
    lock.write_bytes(content)
    check_free(tmp_path)  # nothing to say before the run folder is set up: acquire() decides
    with pytest.raises(LockError, match=r"is in use \(lock file .*\.lock is being written\)"):
        acquire(tmp_path)  # written moments ago: perhaps by a process taking it right now
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert acquire(tmp_path) == lock  # torn by a kill, or not a lock at all: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(tmp_path)
    assert not lock.exists()


def test_report_analyze_and_dashboard_on_a_read_only_run_are_one_line(tmp_path):
    """A run copied read-only (an archive, a colleague's folder): each command says it cannot write there,
    before analysing anything, and ``analyze`` says where else it can write."""
    job = tmp_path / "job"
    proc = subprocess.run(
        train_cmd("trainer.max_steps=20", "hydra.run.dir=job"), cwd=tmp_path, env=one_thread_env(), capture_output=True
    )
    assert proc.returncode == 0
    view = tmp_path / "view"
    if os.geteuid() == 0:
        view.mkdir()
        bound = subprocess.run(["mount", "--bind", str(job), str(view)], capture_output=True)
        if bound.returncode != 0:
            pytest.skip(f"mount failed: {bound.stderr.decode().strip()}")
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
    else:
        shutil.copytree(job, view)
        for path in [view, *view.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    try:
        cases = {
            "addrepro.report": ([str(view)], "addrepro.report: [Errno 30] cannot write"),
            "addrepro.analyze": (
                [f"checkpoint={view}", "analysis=attention"],
                f"addrepro: cannot write the output folder {view}/analysis (",
            ),
            "addrepro.dashboard": ([str(view)], f"addrepro.dashboard: cannot write the workspace file in {view}: "),
        }
        for module, (args, start) in cases.items():
            proc = run_cli(module, args, tmp_path)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 2 and len(lines) == 1, (module, lines)
            assert lines[0].startswith(start if os.geteuid() == 0 else start.split(" [Errno")[0]), (module, lines)
        elsewhere = run_cli(
            "addrepro.analyze", [f"checkpoint={view}", "analysis=attention", f"out_dir={tmp_path}/out"], tmp_path
        )
        assert elsewhere.returncode == 0 and (tmp_path / "out" / "attention_last.json").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(view)], check=False)
