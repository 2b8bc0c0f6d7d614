"""Runs that are killed, diverge, get bad input or no network: nothing is lost, nothing hangs."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import torch
from conftest import FAST, cli_env

from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.rundir.metrics_file import load_rows
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


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    env = one_thread_env()
    full = subprocess.run(train_cmd("hydra.run.dir=full"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    victim = subprocess.Popen(
        train_cmd("hydra.run.dir=killed"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = tmp_path / "killed" / "checkpoints" / "step_100.ckpt"
    deadline = time.time() + 120
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "checkpoints" / "last.ckpt").exists(), "killed too late to test resuming"

    resumed = subprocess.run(
        train_cmd("resume=killed", "hydra.run.dir=resumer"), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "killed")  # the resumed run continues in the killed run's folder
    assert a["step"] == b["step"] == 400
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # Metrics continue: every evaluation step once, the same values as the uninterrupted run.
    val = lambda job: [(r["step"], r["val/loss"]) for r in load_rows(tmp_path / job) if "val/loss" in r]  # noqa: E731
    assert val("killed") == val("full")
    assert [s for s, _ in val("killed")] == list(range(0, 401, 25))
    # The same W&B run id continues (offline: one run file per process, synced together).
    ids = {read_run(p).run_id for p in find_runs(tmp_path / "killed")}
    assert len(ids) == 1 and len(find_runs(tmp_path / "killed")) == 2
    # ... and read back as one run, whose history is the uninterrupted run's
    killed, full = read_run(tmp_path / "killed"), read_run(tmp_path / "full")
    assert len(killed.parts) == 2 and killed.exit_code == 0
    wandb_val = lambda run: [(r["trainer/global_step"], r["val/loss"]) for r in run.history if "val/loss" in r]  # noqa: E731
    assert wandb_val(killed) == wandb_val(full) == val("full")


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
    ckpt = load_checkpoint(target)
    assert ckpt["step"] in (1, 2)  # the old file, or a complete new one: never a torn one
    if ckpt["step"] == 1:
        assert sha(target) == good


def test_divergence_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cli):
    ok = cli("addrepro.train", *RUN, "trainer.max_steps=100", "hydra.run.dir=job")
    assert ok.returncode == 0, ok.stderr[-2000:]
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


def test_bad_checkpoints_fail_with_one_line_naming_what_differs(tmp_path, cli):
    ok = cli("addrepro.train", *RUN, "trainer.max_steps=10", "logger=csv", "hydra.run.dir=job")
    assert ok.returncode == 0, ok.stderr[-2000:]
    ckpt = tmp_path / "job" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    cases = {
        "resume=nowhere": "addrepro: checkpoint error: resume=nowhere does not exist",
        f"resume={truncated}": f"addrepro: checkpoint error: checkpoint={truncated} cannot be read",
        "resume=job model.width=64": "model.d_model: checkpoint 32 vs config 64",
        "resume=job data.base=16": "data.base: checkpoint 10 vs config 16",
        "resume=job model.depth=2 data.order=lsb": "data.order: checkpoint 'msb' vs config 'lsb'",
    }
    for args, expected in cases.items():
        proc = cli("addrepro.train", *RUN, "logger=csv", *args.split(), "hydra.run.dir=again")
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-1500:])
        assert expected in lines[0], (args, lines[0])
    assert "model.n_layers: checkpoint 1 vs config 2" in lines[0]


def test_online_wandb_without_network_falls_back_to_offline(tmp_path):
    env = {**cli_env(), "WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    start = time.time()
    proc = subprocess.run(
        train_cmd("trainer.max_steps=10", "logger.wandb.init_timeout=5", "hydra.run.dir=job"),
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
    assert [summary[j]["status"] for j in ("0", "1", "2")] == ["ok", "failed", "ok"]
    assert "Divergence" in summary["1"]["message"]
    assert "job 1 failed" in proc.stderr
    assert [read_run(sweep / j).exit_code for j in ("0", "1", "2")] == [0, 1, 0]
    assert all((sweep / j / "checkpoints" / "last.ckpt").exists() for j in ("0", "2"))
    assert not (sweep / "1" / "checkpoints" / "last.ckpt").exists()


def test_a_checkpoint_from_an_older_addrepro_resumes(tmp_path, cli):
    # Checkpoints store their run's config; keys added to addrepro since then take today's defaults.
    first = cli("addrepro.train", *RUN, "trainer.max_steps=30", "logger=csv", "hydra.run.dir=old")
    assert first.returncode == 0, first.stderr[-2000:]
    path = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["trainer"]["compile"]  # written before trainer.compile existed
    torch.save(ckpt, path)
    resumed = cli("addrepro.train", *RUN, "trainer.max_steps=40", "logger=csv", "resume=old", "hydra.run.dir=again")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(tmp_path / "old")["step"] == 40
