"""The hot loop's amortisation changes nothing that is logged or saved."""

import torch
from test_ensemble import config, final_weights

from addrepro.rundir.metrics_file import load_rows
from addrepro.train import JobPlan, train


def run(tmp_path, name: str, *overrides: str):
    plan = JobPlan(config("seed=3", *overrides), tmp_path / name, name, "g", False)
    plan.job_dir.mkdir()
    train([plan])
    return load_rows(plan.job_dir), final_weights(plan.job_dir)


def test_steps_per_call_logs_what_a_step_by_step_loop_logs(tmp_path, one_thread):
    # 7 does not divide the 40 steps: the last call runs the remainder only
    rows_1, weights_1 = run(tmp_path, "one", "trainer.steps_per_call=1")
    rows_7, weights_7 = run(tmp_path, "seven", "trainer.steps_per_call=7")
    assert rows_1 == rows_7
    steps = [r["step"] for r in rows_1 if "train/loss" in r]
    assert steps == list(range(0, 40, 5))  # every logging step, once
    assert max(r["step"] for r in rows_1) == 40  # the final evaluation after exactly 40 updates
    assert weights_1.keys() == weights_7.keys()
    assert all(torch.equal(weights_1[n], weights_7[n]) for n in weights_1)
