"""Figure titles of the analyses."""

from addrepro.interp.common import analysis_title


def test_analysis_title_names_step_run_and_task():
    task = {"n_digits": 5, "base": 10, "order": "msb", "task": "add"}
    result = {
        "checkpoint": "outputs/runs/2026-01-01/10-00-00_ab12/checkpoints/step_400.ckpt",
        "step": 400,
        "task": task,
    }
    assert (
        analysis_title(result, "ablation")
        == "ablation, step 400 of 10-00-00_ab12/step_400.ckpt — 5-digit base 10 (msb, add)"
    )
    # a checkpoint outside a job folder names itself; an unknown step is left out
    result = {"checkpoint": "/tmp/model.ckpt", "step": None, "task": task}
    assert analysis_title(result, "neurons") == "neurons of model.ckpt — 5-digit base 10 (msb, add)"
    assert analysis_title({"checkpoint": None, "step": 3}, "probes") == "probes, step 3"
