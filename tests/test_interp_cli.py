"""The new analyses through ``python -m addrepro.analyze``, on one checkpoint and over a run's
checkpoints: a job folder holding the hand-built adder, first blind to carries, then whole."""

import json
import shutil

import adder
import pytest
from conftest import run_cli
from test_breakdown import naive_adder_checkpoint

pytest.importorskip("transformer_lens")

from addrepro.interp import over_training  # noqa: E402
from addrepro.rundir.checkpoints import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    job = tmp_path_factory.mktemp("interp") / "job"
    blind, whole = naive_adder_checkpoint(), adder.checkpoint(val_size=512)
    blind["step"], whole["step"] = 100, 200
    save_checkpoint(job / "checkpoints" / "step_100.ckpt", blind)
    save_checkpoint(job / "checkpoints" / "step_200.ckpt", whole)
    save_checkpoint(job / "checkpoints" / "last.ckpt", whole)
    return job


def test_over_training_patching_and_probes(job, tmp_path):
    small = ["data.val_size=256", "data.carry_size=8", "data.chain_size=8"]
    proc = run_cli(
        "addrepro.analyze",
        [f"checkpoint={job}", "analysis=over_training", "of=patching", "patching.size=16", *small],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((job / "analysis" / "over_training_patching.json").read_text())
    assert data["steps"] == [100, 200]
    # Blind to carries, the model's answer does not move with the carry: nothing to restore (no value);
    # whole, head 1 at place 1's position carries all of it.
    assert data["series"]["place_1_carry/L0H1"][0] is None
    assert data["series"]["place_1_carry/L0H1"][1] == pytest.approx(1.0, abs=1e-5)
    assert data["series"]["place_1_carry/L0H0"][1] == pytest.approx(0.0, abs=1e-5)
    assert (job / "analysis" / "over_training_patching.png").stat().st_size > 0

    # probes over the same checkpoints, through the Python entry point
    result = over_training.run(job, "probes", {"val_size": 256, "carry_size": 8, "chain_size": 8})
    assert result["steps"] == [100, 200] and result["series"]["place_1/digit_final"][1] == 1.0


def test_cli_probes_on_one_checkpoint(job, tmp_path):
    args = [f"checkpoint={job}", "analysis=probes", "data.val_size=256", "data.carry_size=8", "data.chain_size=8"]
    proc = run_cli("addrepro.analyze", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((job / "analysis" / "probes_last.json").read_text())
    assert data["analysis"] == "probes" and data["step"] == 200
    assert data["accuracy"]["place_2/digit"]["accuracy"][1][data["positions"][2]] == 1.0
    assert (job / "analysis" / "probes_last.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_analysis_option_is_one_line(job, tmp_path):
    args = [f"checkpoint={job}", "analysis=patching", "patching.kinds=[bogus]", "data.val_size=64"]
    proc = run_cli("addrepro.analyze", args, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "patching.kinds: 'bogus' is not one of carry, a, b" in lines[0], proc.stderr


def test_options_are_checked_before_the_model_is_exported():
    from addrepro.analyze import AnalyzeError, check_options

    check_options("patching", {"size": 8, "kinds": ["a", "carry"]})
    unknown = r"^patching.sise is not an option of patching \(options: size, places, kinds, min_gap\)$"
    with pytest.raises(AnalyzeError, match=unknown):
        check_options("patching", {"sise": 8})
    with pytest.raises(AnalyzeError, match=r"^composition.top is not an option of composition \(options: none\)$"):
        check_options("composition", {"top": 3})
    with pytest.raises(AnalyzeError, match=r"^patching.kinds: 'bogus' is not one of carry, a, b$"):
        check_options("patching", {"kinds": ["bogus"]})
    bad_values = [
        ("patching", "size", 0, "patching.size=0 is invalid: must be an integer in 1..100000"),
        (
            "attention",
            "max_examples",
            "many",
            "attention.max_examples='many' is invalid: must be an integer in 1..100000",
        ),
        ("ablation", "top_k", 2.5, "ablation.top_k=2.5 is invalid: must be an integer in 1..100000"),
        ("neurons", "clusters", True, "neurons.clusters=True is invalid: must be an integer in 1..100000"),
        ("logit_attribution", "centred", "yes", "logit_attribution.centred='yes' is invalid: must be true or false"),
        (
            "patching",
            "places",
            [1, -2],
            "patching.places=[1, -2] is invalid: must be null or a non-empty list of places",
        ),
    ]
    for analysis, key, value, message in bad_values:
        with pytest.raises(AnalyzeError) as info:
            check_options(analysis, {key: value})
        assert str(info.value).startswith(message), str(info.value)
    check_options("neurons", {"per_cell": 4, "clusters": 2, "max_examples": 64, "n_check": 3})
    check_options("logit_attribution", {"centred": True, "top_neurons": 5})
    check_options("patching", {"places": [0, 3]})


def test_a_sweep_jobs_folder_is_given_as_it_is_named(job, tmp_path):
    """Sweep job folders are named ``<n>_<key>=<value>,...``: ``=`` and ``,`` are Hydra grammar, yet the
    folder is given as it is (the command quotes it for Hydra)."""
    member = tmp_path / "sweep" / "1_optimizer.lr=0.001,seed=1"
    shutil.copytree(job, member)
    args = [f"checkpoint={member.relative_to(tmp_path)}", "analysis=probes", "data.val_size=256"]
    proc = run_cli("addrepro.analyze", [*args, "data.carry_size=8", "data.chain_size=8"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((member / "analysis" / "probes_last.json").read_text())["step"] == 200
