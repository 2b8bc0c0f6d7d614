"""Kill trials: SIGKILL a run at moments drawn at random, resume it each time, compare it with the run
trained in one go.

    python docs/kill_trials.py [--trials 16] [--seed 0]

Each trial starts the same small run (3-digit addition, width 32, 400 steps, a checkpoint every 100,
W&B offline, one thread), kills it one to three times once its metrics file holds a number of rows
drawn at random (sometimes before the first checkpoint, sometimes during the end-of-run files), runs
``resume=auto`` after each kill and once more at the end, and compares with an uninterrupted run:
weights, Adam moments, every metrics row, every W&B row (images by content) and the end-of-run files.
Prints one line per trial and the tally.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.rundir.metrics_file import load_rows
from addrepro.wandb_offline import read_run

RUN = ["data.n_digits=3", "model.width=32", "trainer.max_steps=400", "trainer.ckpt_every_n_steps=100"]
RUN += ["trainer.plots=false", "trainer.progress_bar=false", "trainer.threads=1"]
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def train(folder: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "addrepro.train", *RUN, f"hydra.run.dir={folder}", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rows_written(job: Path) -> int:
    path = job / "csv" / "metrics.csv"
    return max(path.read_text().count("\n") - 1, 0) if path.exists() else 0


def kill_when(proc: subprocess.Popen, ready) -> bool:  # noqa: ANN001 - a predicate
    """SIGKILL ``proc`` once ``ready()``; False if it had ended first."""
    while not ready() and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def wandb_rows(job: Path) -> list[dict]:
    with warnings.catch_warnings():  # a killed part ends mid-record: its intact prefix is read
        warnings.simplefilter("ignore")
        history = read_run(job).history
    return [
        {k: v["sha256"] if isinstance(v, dict) and "sha256" in v else v for k, v in r.items() if not k.startswith("_")}
        for r in history
        if "trainer/global_step" in r
    ]


def differences(job: Path, full: Path) -> list[str]:
    a, b = load_checkpoint(full), load_checkpoint(job)
    out = []
    if a["step"] != b["step"] or any(not torch.equal(a["model"][n], b["model"][n]) for n in a["model"]):
        out.append("weights")
    ma, mb = a["optimizer"]["moments"], b["optimizer"]["moments"]
    if any(not torch.equal(ma[kind][n], mb[kind][n]) for kind in ma for n in ma[kind]):
        out.append("Adam moments")
    if load_rows(job) != load_rows(full):
        out.append("metrics rows")
    if wandb_rows(job) != wandb_rows(full):
        out.append("W&B rows")
    for name in ("timeline.md", "spikes.md", "shelves_detected.json", "end_of_run.json"):
        if not (job / name).exists() or (
            name != "end_of_run.json" and (job / name).read_text() != (full / name).read_text()
        ):
            out.append(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-trials-"))
    full = root / "full"
    assert train(full).wait() == 0, "the uninterrupted run failed"
    total = len(load_rows(full))
    equal = 0
    for trial in range(args.trials):
        job = root / f"trial_{trial}"
        moments = sorted(rng.sample(range(1, total + 1), rng.randint(1, 3)))
        landed = []
        for at in moments:
            if rows_written(job) >= at:  # the resume already rewrote past it
                continue
            if kill_when(train(job, "resume=auto"), lambda at=at, job=job: rows_written(job) >= at):
                landed.append(at)
        if rng.random() < 0.5:  # and sometimes once the final checkpoint exists: during the end-of-run files
            if kill_when(train(job, "resume=auto"), lambda job=job: (job / "checkpoints" / "last.ckpt").exists()):
                landed.append("end")
        code = train(job, "resume=auto").wait()
        diff = ["exit code"] if code != 0 else differences(job, full)
        equal += not diff
        kills = ", ".join(f"row {m}" if m != "end" else "end-of-run files" for m in landed)
        print(f"trial {trial}: killed at {kills or 'no moment (the run ended first)'}: {'; '.join(diff) or 'equal'}")
    print(f"{equal} of {args.trials} trials ended equal to the uninterrupted run ({total} metrics rows; {root})")
    return 0 if equal == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
