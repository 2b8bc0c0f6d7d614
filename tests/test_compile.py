"""``trainer.compile=true``: the compiled training path logs what the eager path logs.

CI runs it on the CPU; ``ADDREPRO_TEST_DEVICE=cuda`` runs it on a GPU, where the compiled graphs are
also captured as CUDA graphs (``benchmarks/gpu_check.sh`` does this on a device machine).
"""

import math
import os

import pytest
import torch
from test_ensemble import config

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train

DEVICE = os.environ.get("ADDREPRO_TEST_DEVICE", "cpu")


def run(tmp_path, name: str, *overrides: str) -> list[list[dict]]:
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    # a stack of two: the ensemble path
    cfgs = [config(f"seed={s}", f"trainer.accelerator={accelerator}", *overrides) for s in (0, 1)]
    plans = [JobPlan(c, tmp_path / f"{name}{i}", f"m{i}", "g", True) for i, c in enumerate(cfgs)]
    for p in plans:
        p.job_dir.mkdir()
    train(plans)
    return [load_rows(p.job_dir) for p in plans]


def test_compiled_training_logs_the_eager_metrics(tmp_path, one_thread):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run(tmp_path, "compiled", "trainer.compile=true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    eager = run(tmp_path, "eager", "trainer.compile=false")
    for member_c, member_e in zip(compiled, eager, strict=True):
        assert [r["step"] for r in member_c] == [r["step"] for r in member_e]
        keys = {k for r in member_e for k in r if k.startswith(("train/loss", "train/acc", "train/grad_norm", "val/"))}
        assert "train/loss/place_3" in keys and "train/grad_norm/global" in keys
        for rc, re in zip(member_c, member_e, strict=True):
            for key in keys:
                if key in re:
                    # 40 optimiser steps of float round-off between two correct implementations; an
                    # accuracy moves by whole examples (1/64), and one near-tied prediction may flip
                    tolerance = {"abs": 2 / 64} if "/acc" in key else {"rel": 1e-3, "abs": 1e-4}
                    assert rc[key] == pytest.approx(re[key], **tolerance), (rc["step"], key)
    last_val = [[r["val/loss"] for r in member if "val/loss" in r][-1] for member in compiled]
    assert last_val[0] != last_val[1]  # two different members


def test_more_compiled_stacks_than_the_recompile_limit_train_in_one_process(tmp_path, one_thread, monkeypatch):
    # As the ensemble launcher, a reused worker or the benchmark do: several fits, new shapes each time.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()
    shapes = [("data.n_digits=2", "model.width=16"), ("data.n_digits=3", "model.width=32")]  # 2 > the limit of 1
    for i, shape in enumerate(shapes):
        cfg = config(*shape, "trainer.compile=true", "trainer.max_steps=10", "data.val_size=16")
        plan = JobPlan(cfg, tmp_path / f"stack{i}", f"s{i}", "g", True)
        plan.job_dir.mkdir()
        (final,) = train([plan])
        assert final["step"] == 10 and math.isfinite(final["val/loss"])
