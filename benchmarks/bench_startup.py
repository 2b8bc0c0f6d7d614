"""Start-up cost of short jobs: where the wall time of a 10-step ``python -m addrepro.train`` goes.

    python benchmarks/bench_startup.py                  # 3 runs of each variant, medians
    python benchmarks/bench_startup.py --runs 5 --steps 10

Each run is a fresh process (as every job of a ``local``/``slurm`` sweep is) that runs the real
command-line entry point with timers around its phases:
  python     interpreter start and exit (the process's wall time minus what runs inside it);
  imports    ``import addrepro.train`` (torch, Lightning, Hydra);
  hydra      composing the config, the job folder, validation, the Trainer and module set-up;
  wandb      creating the job's W&B run (offline) and, at the end, finishing it;
  training   ``trainer.fit`` without the plots (steps, evaluations, checkpoints, metrics file);
  plots      the PNG plots and shelf detection at the end of the job.
Variants: the defaults (W&B offline, plots) and ``logger=csv trainer.plots=false``.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before any heavy import of the child process

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "W&B offline + plots": [],
    "logger=csv plots=false": ["logger=csv", "trainer.plots=false"],
}
PHASES = ("python", "imports", "hydra", "wandb", "training", "plots")


def child(out: Path, overrides: list[str]) -> None:
    """One job under timers; writes the phases (seconds) to ``out``."""
    import pytorch_lightning as pl  # noqa: PLC0415 - imports are one of the timed phases

    import addrepro.train as entry  # noqa: PLC0415 - (timed)
    from addrepro.training import run  # noqa: PLC0415 - (timed)

    imported = time.perf_counter()
    spent = dict.fromkeys(("wandb", "fit", "plots"), 0.0)

    def timed(key: str, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        return wrapper

    run.make_loggers = timed("wandb", run.make_loggers)
    run.close_loggers = timed("wandb", run.close_loggers)
    entry.draw = timed("plots", entry.draw)
    pl.Trainer.fit = timed("fit", pl.Trainer.fit)
    sys.argv = ["addrepro.train", *overrides]
    entry.main()
    end = time.perf_counter()
    phases = {
        "imports": imported - T0,
        "hydra": (end - imported) - spent["wandb"] - spent["fit"],
        "wandb": spent["wandb"],
        "training": spent["fit"] - spent["plots"],
        "plots": spent["plots"],
        "inside": end - T0,
    }
    out.write_text(json.dumps(phases))


def one_run(overrides: list[str], folder: Path) -> dict[str, float]:
    out = folder / "phases.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # keep carried wheels
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=path)
    args = [*overrides, f"hydra.run.dir={folder / 'job'}", "trainer.progress_bar=false"]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *(["-S"] if sys.flags.no_site else []), __file__, "--child", str(out), *args],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"the job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    phases = json.loads(out.read_text())
    phases["python"] = wall - phases.pop("inside")
    phases["total"] = wall
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child is not None:
        child(args.child, overrides)
        return 0
    print(f"load average before: {os.getloadavg()[0]:.2f} (numbers are noisy when other work loads the cores)")
    print(f"{'variant':26} " + " ".join(f"{p:>9}" for p in (*PHASES, "total")) + "   (seconds, median)")
    for name, variant in VARIANTS.items():
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one_run([f"trainer.max_steps={args.steps}", *variant, *overrides], Path(tmp)))
        median = {key: statistics.median(r[key] for r in runs) for key in (*PHASES, "total")}
        spread = f"  total {min(r['total'] for r in runs):.2f}-{max(r['total'] for r in runs):.2f}"
        print(f"{name:26} " + " ".join(f"{median[p]:9.2f}" for p in (*PHASES, "total")) + spread, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
