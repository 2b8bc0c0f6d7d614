"""Speed of the shelf science on large inputs: the atlas of big tasks and shelf detection on long curves.

    python benchmarks/bench_shelves.py

Prints wall times (best of 3) on this machine; run it on a quiet machine.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from addrepro.shelves.atlas import atlas_by_place, shelf_atlas
from addrepro.shelves.detection import detect_shelves


def best_of(fn, repeats: int = 3) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}")
    print(f"atlas 10-digit base 10: {best_of(lambda: atlas_by_place(shelf_atlas(10, 10))):.2f} s")
    print(f"atlas 5-digit base 36: {best_of(lambda: atlas_by_place(shelf_atlas(5, 36))):.2f} s")
    steps = np.arange(10_000)
    rng = np.random.default_rng(0)
    levels = np.where(steps < 3000, np.log(10), np.where(steps < 6000, np.log(2), 0.01))
    loss = levels * np.exp(rng.normal(0, 0.1, steps.shape))
    atlas = {"uniform": float(np.log(10)), "naive_sum": float(np.log(2))}
    print(f"shelf detection, 10,000 points: {best_of(lambda: detect_shelves(steps, loss, atlas)):.3f} s")


if __name__ == "__main__":
    main()
