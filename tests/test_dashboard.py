"""Dashboards that line up: the W&B workspace of a real sweep, W&B tags and summaries, TensorBoard events.

One real 3-job width sweep with every logger on (``logger=many``) runs in a subprocess; its offline W&B
runs, TensorBoard event files and CSV files are read back, and the workspace is built from its folder.
"""

import json
import math
import re
import shutil

import pytest
from conftest import FAST, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from addrepro import dashboard
from addrepro.reports.dashboard import (
    SECTIONS,
    WORKSPACE_JSON,
    plan_sections,
    read_target,
    sweep_swept_keys,
    to_workspace,
    workspace_from_json,
    workspace_json,
)
from addrepro.rundir.job import job_dirs
from addrepro.rundir.metrics_file import load_rows
from addrepro.shelves.atlas import atlas_by_place, shelf_atlas
from addrepro.wandb_offline import read_run

WIDTHS = (16, 24, 32)
N_DIGITS = 2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``+sweep=width`` narrowed on the command line to three tiny widths, W&B + TensorBoard + CSV."""
    cwd = tmp_path_factory.mktemp("dash")
    folder = cwd / "sweep"
    args = [
        "-m",
        "+sweep=width",
        f"model.width={','.join(map(str, WIDTHS))}",
        "logger=many",
        f"data.n_digits={N_DIGITS}",
        "trainer.max_steps=30",
        "trainer.plots=false",
        *FAST,
        f"hydra.sweep.dir={folder}",
    ]
    proc = run_cli("addrepro.train", args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def _csv_series(job, key):
    return [(r["step"], r[key]) for r in load_rows(job) if key in r]


def test_tensorboard_events_hold_the_csv_keys_and_values(sweep):
    for i in range(len(WIDTHS)):
        job = job_dirs(sweep)[i]
        events = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        tags = {t for t in events.Tags()["scalars"] if not t.startswith("final/")}  # final/: the HParams tab's
        csv_keys = set().union(*load_rows(job)) - {"step"}
        assert tags == csv_keys
        for j in range(N_DIGITS + 1):
            for key in (f"train/loss/place_{j}", f"val/loss/place_{j}", f"val/acc/place_{j}"):
                logged = [(e.step, e.value) for e in events.Scalars(key)]
                expected = _csv_series(job, key)
                assert [s for s, _ in logged] == [s for s, _ in expected]
                # Event files store float32.
                assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(logged, expected, strict=True))


def test_tensorboard_hparams_show_the_swept_value_beside_the_final_metrics(sweep):
    from tensorboard.plugins.hparams import plugin_data_pb2

    for i, width in enumerate(WIDTHS):
        job = job_dirs(sweep)[i]
        events = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["model.width"].number_value == width
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        shown = {m.name.tag for m in experiment.metric_infos}
        assert {"final/val/loss", f"final/val/loss/place_{N_DIGITS}", "final/val/acc"} <= shown
        for key in ("val/loss", "val/loss/place_0", "val/acc"):
            (final,) = [e.value for e in events.Scalars(f"final/{key}")]
            assert math.isclose(final, _csv_series(job, key)[-1][1], rel_tol=1e-6)


def test_wandb_runs_carry_their_swept_values_as_tags_and_min_summaries(sweep):
    for i, width in enumerate(WIDTHS):
        job = job_dirs(sweep)[i]
        run = read_run(job)
        assert run.tags == [f"model.width={width}"]
        for j in range(N_DIGITS + 1):
            for split in ("train", "val"):
                values = [v for _, v in _csv_series(job, f"{split}/loss/place_{j}")]
                summary = run.summary[f"{split}/loss/place_{j}"]
                assert math.isclose(summary["min"], min(values), rel_tol=1e-6)
                assert math.isclose(summary["last"], values[-1], rel_tol=1e-6)
        accs = [v for _, v in _csv_series(job, "val/acc")]
        assert math.isclose(run.summary["val/acc"]["max"], max(accs), rel_tol=1e-6)


def test_sweep_workspace_filters_the_group_and_groups_by_the_swept_key(sweep, capsys):
    assert dashboard.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    path = sweep / WORKSPACE_JSON
    assert f"python -m addrepro.dashboard --publish {path}" in out
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in out
    group = read_run(job_dirs(sweep)[0]).group
    assert {read_run(job_dirs(sweep)[i]).group for i in range(len(WIDTHS))} == {group}

    spec = json.loads(path.read_text())
    section = spec["spec"]["section"]
    runset = section["runSets"][0]
    assert runset["filters"]["filters"] == [
        {"key": {"section": "run", "name": "group"}, "op": "=", "value": group, "disabled": False}
    ]
    # Nested config keys are stored as model.value.width by W&B.
    assert runset["grouping"] == [{"section": "config", "name": "model.value.width"}]
    assert section["settings"]["xAxis"] == "trainer/global_step"
    sections = section["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == list(SECTIONS)

    by_name = {s["name"]: s["panels"] for s in sections}
    loss = [p for p in by_name["Per-place loss"] if p["viewType"] == "Run History Line Plot"]
    # One panel per place, carry-out first, log y, both splits, the atlas levels in the title.
    assert [p["config"]["metrics"] for p in loss] == [
        [f"train/loss/place_{j}", f"val/loss/place_{j}"] for j in range(N_DIGITS, -1, -1)
    ]
    assert all(p["config"]["yLogScale"] is True and p["config"]["xAxis"] == "trainer/global_step" for p in loss)
    atlas = atlas_by_place(shelf_atlas(N_DIGITS, 10, "msb", "add"))
    assert f"naive_sum {atlas[1]['naive_sum']:.3g}" in loss[1]["config"]["chartTitle"]  # 0.688
    assert f"carry_depth_1 {atlas[2]['carry_depth_1']:.3g}" in loss[0]["config"]["chartTitle"]
    markdown = [p for p in by_name["Per-place loss"] if p["viewType"] == "Markdown Panel"]
    assert len(markdown) == 1 and "naive_sum" in markdown[0]["config"]["value"]
    acc = by_name["Per-place accuracy"]
    assert [p["config"]["metrics"] for p in acc] == [
        [f"train/acc/place_{j}", f"val/acc/place_{j}"] for j in range(N_DIGITS, -1, -1)
    ]
    naive = [p["config"]["metrics"] for p in by_name["Naive-sum and depth-sum probabilities"]]
    assert naive[0] == ["val/carry_out/p0", "val/carry_out/p1"]
    assert naive[1] == [f"val/naive/place_1/plus_{k}" for k in (0, 1, 2, 9)]
    carry = [p["config"]["metrics"] for p in by_name["Carry-in, chain-length and carry-complexity sets"]]
    assert carry == [
        ["carry/place_2/cin_0/loss", "carry/place_2/cin_1/loss"],
        ["chain/place_2/len_0/loss", "chain/place_2/len_1/loss"],
        ["carry/place_1/cin_0/loss", "carry/place_1/cin_1/loss"],
        ["chain/place_1/len_0/loss", "chain/place_1/len_1/loss"],
        ["class/S0/acc", "class/S1/acc", "class/S2/acc"],
        ["class/S0/loss", "class/S1/loss", "class/S2/loss"],
    ]
    mech = [p["config"]["metrics"] for p in by_name["Mechanism: attention and carry probes"]]
    heads = [f"L0H{h}" for h in range(4)]  # the default model: 1 layer, 4 heads
    assert mech == [
        [f"mech/attn/{h}/place_2/lower" for h in heads],  # the carry-out reads the top pair
        [f"mech/attn/{h}/place_1/own" for h in heads],
        [f"mech/attn/{h}/place_1/lower" for h in heads],
        [f"mech/attn/{h}/place_0/own" for h in heads],  # the units digit has no pair below
        ["mech/probe/carry_in/place_2/acc", "mech/probe/carry_in/place_1/acc"],
    ]
    grads = [p["config"]["metrics"] for p in by_name["Gradient norms"]]
    assert grads == [
        ["train/grad_norm/global"],
        [f"train/grad_norm/{g}" for g in ("embed", "attn", "mlp", "unembed")],
        ["train/grad_norm/layer_0"],
    ]
    shelves = by_name["Detected shelves"]
    assert len(shelves) == 1 and shelves[0]["viewType"] == "Weave"
    assert '"val": "shelves"' in json.dumps(shelves[0]["config"])

    # The workspace object itself, and the saved JSON read back as the same workspace (what --publish sends).
    target = read_target(sweep)
    assert target.swept == ["model.width"] and target.group == group and target.run_id is None
    workspace = to_workspace(target, plan_sections(target))
    assert [str(g.name) for g in workspace.runset_settings.groupby] == ["model.width"]
    assert workspace.runset_settings.filters == f"Metric(\"Group\") == '{group}'"
    assert workspace_json(workspace_from_json(spec)) == spec


def test_single_run_workspace_shows_that_run_alone(sweep):
    job = job_dirs(sweep)[1]
    assert dashboard.main([str(job)]) == 0
    spec = json.loads((job / WORKSPACE_JSON).read_text())
    runset = spec["spec"]["section"]["runSets"][0]
    run = read_run(job)
    assert [(f["key"]["name"], f["value"]) for f in runset["filters"]["filters"]] == [
        ("group", run.group),
        ("name", run.run_id),
    ]
    assert runset["grouping"] == []


def test_not_a_run_folder_is_one_line(tmp_path, capsys):
    assert dashboard.main([str(tmp_path)]) == 2
    assert "neither a job folder nor a sweep folder" in capsys.readouterr().err
    assert dashboard.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"addrepro.dashboard: {tmp_path / 'nope'} does not exist"


def test_runs_that_did_not_log_to_wandb_get_no_workspace(tmp_path, capsys):
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    from addrepro.training.config import config_dir  # noqa: PLC0415

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=csv"])
    (tmp_path / "job" / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, tmp_path / "job" / ".hydra" / "config.yaml")
    assert dashboard.main([str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not log to W&B (logger.wandb.enabled=false): no dashboard to build" in err[0]
    assert not (tmp_path / "job" / WORKSPACE_JSON).exists()


def test_swept_keys_come_from_the_sweep_config_grid_and_the_command_line(tmp_path):
    saved = {
        "hydra": {
            "sweeper": {"params": {"model.width": "64,128", "optimizer.lr": "0.001"}},
            "overrides": {"task": ["+sweep=width", "seed=0,1", "data.n_digits=3", "model.width=16,32"]},
        }
    }
    (tmp_path / "multirun.yaml").write_text(json.dumps(saved))  # JSON is YAML
    assert sweep_swept_keys(tmp_path) == ["model.width", "seed"]


def test_a_resumed_run_has_each_step_once_in_its_tensorboard_events_and_its_progress_bar(tmp_path):
    """Resumed from step 20 of a 30-step run, the events of steps 20..30 from the first life are dropped;
    the progress bar counts optimiser steps (not Lightning's steps of 10) and starts at the checkpoint's."""
    small = ["data.n_digits=2", "model.width=16", "trainer.ckpt_every_n_steps=20", "trainer.plots=false", *FAST]
    small += ["trainer.progress_bar=true", "logger=tensorboard"]
    first = run_cli("addrepro.train", [*small, "trainer.max_steps=30", "hydra.run.dir=job"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    frames = (first.stdout + first.stderr).replace("\r", "\n")
    assert "30/30" in frames and not re.search(r"(?<!\d)3/3(?!\d)", frames)  # 30 steps, not 3 ticks
    job = tmp_path / "job"
    resumed = run_cli(
        "addrepro.train", [*small, "trainer.max_steps=40", f"resume={job / 'checkpoints' / 'step_20.ckpt'}"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    frames = (resumed.stdout + resumed.stderr).replace("\r", "\n")
    assert "20/40" in frames and "40/40" in frames and not re.search(r"(?<!\d)0/40", frames)
    assert len(list((job / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per process
    events = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss/place_0")]
    assert steps == list(range(0, 40, 5))  # train rows every 5 steps; the last one before the end
    assert steps == [s for s, _ in _csv_series(job, "train/loss/place_0")]


def test_a_damaged_multirun_yaml_and_a_foreign_workspace_file_are_one_line(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, symlinks=True)
    for body in ("{{{ not yaml", "- a list, not Hydra's mapping", "hydra: {sweeper: {params: [1]}}"):
        (copy / "multirun.yaml").write_text(body)
        assert dashboard.main([str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"addrepro.dashboard: {copy}/multirun.yaml is not the multirun.yaml")
    for name, data in (("text.json", b"not json"), ("other.json", b'{"a": 1}'), ("binary.json", b"\xff\xfe")):
        (tmp_path / name).write_bytes(data)
        assert dashboard.main(["--publish", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and err[0].startswith(
            f"addrepro.dashboard: {tmp_path / name} is not a workspace file written by addrepro.dashboard ("
        )


EDITED_CONFIGS = [
    (("logger", "wandb", "project"), ["a", "b"], "logger.wandb.project is ['a', 'b'], expected str"),
    (("logger", "wandb", "group"), {"a": 1}, "logger.wandb.group is {'a': 1}, expected str or null"),
    (("logger", "wandb", "enabled"), "yes", "logger.wandb.enabled is 'yes', expected bool"),
    (("logger", "wandb"), None, "has no logger.wandb section"),
    (("logger",), None, "has no logger.wandb section"),
    (("data", "base"), "ten", "its data section is not a task (base='ten' must be an integer in 2..36)"),
]


@pytest.mark.parametrize("keys,value,message", EDITED_CONFIGS, ids=[".".join(c[0]) for c in EDITED_CONFIGS])
def test_a_job_config_edited_out_of_shape_is_one_line_naming_it(sweep, tmp_path, capsys, keys, value, message):
    import yaml

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, symlinks=True)
    (copy / WORKSPACE_JSON).unlink(missing_ok=True)
    config = job_dirs(copy)[1] / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    node = cfg
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    config.write_text(yaml.safe_dump(cfg))
    assert dashboard.main([str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(f"addrepro.dashboard: {config}"), err
    assert message in err[0]
    assert not (copy / WORKSPACE_JSON).exists()


def test_runs_without_offline_wandb_files_are_named_not_offered_for_sync(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, symlinks=True)
    (copy / WORKSPACE_JSON).unlink(missing_ok=True)
    jobs = job_dirs(copy)
    shutil.rmtree(jobs[0] / "wandb")
    (jobs[0] / "wandb").write_text("")  # a file where the W&B folder was
    assert dashboard.main([str(copy)]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == f"addrepro.dashboard: 1 job(s) have no offline W&B run to sync: {jobs[0].name}"
    assert "wandb sync" in out
    (copy / WORKSPACE_JSON).unlink()
    for job in jobs[1:]:
        shutil.rmtree(job / "wandb")
    assert dashboard.main([str(copy)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"addrepro.dashboard: no offline W&B run to sync in {copy} (wandb/offline-run-* of its jobs)"
    assert out == "" and not (copy / WORKSPACE_JSON).exists()
