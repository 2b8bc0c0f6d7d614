"""What the mechanism metrics (attention masses, carry probes) cost during training.

    python benchmarks/bench_mechanism.py [--steps 600] [--threads 1]

Trains the default model through the real training path twice per round, with ``metrics.mechanism``
on and off (CSV logger, no plots), alternating, and prints the wall time of each and their ratio.
Run it on a quiet machine: the ratio is what matters, and it is only fair when nothing else runs.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from addrepro.train import train
from addrepro.training.config import config_dir
from addrepro.training.plan import JobPlan


def timed_run(root: Path, steps: int, mechanism: bool) -> float:
    overrides = [
        f"trainer.max_steps={steps}",
        f"metrics.mechanism={str(mechanism).lower()}",
        "logger=csv",
        "trainer.plots=false",
        "trainer.progress_bar=false",
        "trainer.ckpt_schedule=linear",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    job = root / f"{'on' if mechanism else 'off'}_{time.monotonic_ns()}"
    job.mkdir()
    start = time.perf_counter()
    train([JobPlan(cfg, job, "bench", "bench", False)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(Path(tmp), 20, True)  # imports and first-call costs out of the way
        for r in range(args.rounds):
            off = timed_run(Path(tmp), args.steps, False)
            on = timed_run(Path(tmp), args.steps, True)
            print(f"round {r}: {args.steps} steps, mechanism off {off:.1f} s, on {on:.1f} s, on/off {on / off:.3f}")


if __name__ == "__main__":
    main()
