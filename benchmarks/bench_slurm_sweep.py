"""Wall time of a 16-job seed sweep on a Slurm cluster: one array task per job, or packed stacks.

    bash .ci/slurm/start.sh      # a local single-node Slurm, if there is no cluster at hand
    python benchmarks/bench_slurm_sweep.py [--steps 300] [--jobs 16] [overrides ...]

Runs the same seed sweep of the default config three times, one after another: with
``hydra/launcher=slurm`` (16 array tasks), ``hydra/launcher=slurm_ensemble`` (one task, one stacked
model) and the local ``hydra/launcher=ensemble`` (no scheduler), each into its own sweep folder under
``outputs/bench/slurm_sweep/``. Prints a Markdown table: the sweep's wall time from the command's
start to its exit, and for the ``slurm`` sweep what one task spends before its job's first log line
(Slurm's start, imports, config, model) against its training, from ``sacct`` and the jobs'
``train.log``. Each task asks for one CPU and no GPU: set ``--extra`` overrides for a real cluster
(``hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


def stamp(line: str) -> datetime:
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")


def sweep(launcher: str, folder: Path, steps: int, jobs: int, extra: list[str]) -> float:
    args = [sys.executable, "-m", "addrepro.train", "-m", f"seed=range({jobs})", f"trainer.max_steps={steps}"]
    args += ["logger=csv", "trainer.progress_bar=false", "trainer.threads=1", f"hydra/launcher={launcher}"]
    args += [*(LOCAL_SLURM if launcher.startswith("slurm") else []), *extra, f"hydra.sweep.dir={folder}"]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{launcher} sweep failed:\n{proc.stderr[-3000:]}")
    return wall


def task_times(folder: Path) -> tuple[list[float], list[float]]:
    """Per job of a ``slurm`` sweep: seconds from its task's start to the job's "training steps" log
    line (Slurm's start, Python, imports of torch and Lightning, config, model), and from there to
    its last line (training, evaluations, end-of-run files)."""
    startup, work = [], []
    for job_dir in sorted(p for p in folder.iterdir() if (p / "train.log").is_file()):
        ids = sorted((folder / ".submitit").glob("*_*"))
        number = int(job_dir.name.split("_")[0])
        lines = (job_dir / "train.log").read_text().splitlines()
        task = next(p.name for p in ids if p.name.endswith(f"_{number}"))
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", task, "--format=Start"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        began = datetime.strptime(out, "%Y-%m-%dT%H:%M:%S")
        training = next(line for line in lines if "training steps" in line)
        startup.append((stamp(training) - began).total_seconds())
        work.append((stamp(lines[-1]) - stamp(training)).total_seconds())
    return startup, work


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("extra", nargs="*", help="overrides for every sweep")
    ns = parser.parse_args()
    base = ROOT / "outputs" / "bench" / "slurm_sweep" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N: %c"], capture_output=True, text=True).stdout.split("\n")[0]
    rows = []
    for launcher in ("slurm", "slurm_ensemble", "ensemble"):
        rows.append((launcher, sweep(launcher, base / launcher, ns.steps, ns.jobs, ns.extra)))
    startup, work = task_times(base / "slurm")
    print(f"{ns.jobs}-job seed sweep, default config, {ns.steps} steps; Slurm node {nodes} CPUs; {cpu_name()}")
    print("\n| launcher | tasks | sweep wall time |\n|---|---|---|")
    for launcher, wall in rows:
        tasks = {"slurm": ns.jobs, "slurm_ensemble": 1, "ensemble": "– (no scheduler)"}[launcher]
        print(f"| `{launcher}` | {tasks} | {wall:.0f} s |")
    print(
        f"\n`slurm`: per task, {statistics.median(startup):.1f} s (median; {min(startup):.1f}–{max(startup):.1f}) "
        f"from the task's start to its training, {statistics.median(work):.1f} s from there to its end."
    )


if __name__ == "__main__":
    main()
