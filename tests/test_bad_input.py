"""Bad input seen from the command line: one ``addrepro:`` line, no traceback, nothing created.

The schema's whole table of values is checked in-process in test_config_check.py; here every kind of
input a user can get wrong goes through the real commands in a subprocess.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, cli_env, run_cli
from omegaconf import OmegaConf

from addrepro.rundir.checkpoints import CheckpointError, check_resumable, load_checkpoint
from addrepro.rundir.job import make_folder, remove_refused_job_dir
from addrepro.rundir.metrics_file import load_rows

TINY = ["data.n_digits=2", "model.width=16", "trainer.plots=false", *FAST]

# Every bad value reported from the field, as a user sees it (the schema's whole table: test_config_check.py).
CONFIG_CASES = [
    (["optimizer.betas=0.9"], "optimizer.betas=0.9 is invalid: must be two numbers in [0, 1)"),
    (["metrics.carry_set_size=1"], "metrics.carry_set_size=1 is invalid: must be an integer in 2..100000"),
    (["metrics.chain_set_size=-1"], "metrics.chain_set_size=-1 is invalid: must be an integer in 2..100000"),
    (
        ["data.sampler=carry_balanced", "data.train_size=100"],
        "data.sampler='carry_balanced' is invalid: draws fresh sums",
    ),
    (["data.enrich_digits=1.5"], "data.enrich_digits=1.5 is invalid: must be a number in [0, 1]"),
    (["metrics.class_set_size=1000000"], "metrics.class_set_size=1000000 is invalid: must be an integer in 1..100000"),
    (["metrics.spike_window=0"], "metrics.spike_window=0 is invalid: must be an integer in 1..100000"),
    (["metrics.spike_factor=abc"], "metrics.spike_factor='abc' is invalid: must be a finite number > 1.0"),
    (["logger.wandb.init_timeout=abc"], "logger.wandb.init_timeout='abc' is invalid: must be a finite number > 0.0"),
    (["logger.wandb.init_timeout=-5"], "logger.wandb.init_timeout=-5 is invalid: must be a finite number > 0.0"),
    (["logger.csv=maybe"], "logger.csv='maybe' is invalid: must be one of True, False"),
    (["model.attn_only=true", "model.d_mlp=64"], "model.d_mlp=64 is invalid: must be null when model.attn_only=true"),
    (
        ["trainer.threads=100000"],
        "trainer.threads=100000 is invalid: must be auto, null (torch's default) or an integer",
    ),
    (["data.n_digits=20"], "data.n_digits=20 is invalid: must keep 2 * base^n_digits below 2^63 (base 10)"),
    (["data.val_size=1000000000"], "data.val_size=1000000000 is invalid: must be an integer in 1..1000000"),
    (["metrics=5"], "metrics=5 is invalid: is not an option of metrics (options: default)"),
    (["experiment=nosuch"], "experiment=nosuch is invalid: is not an option of experiment (options: nanda_5digit,"),
    (["~seed"], "~seed is invalid: cannot be deleted: every run needs it (give it a value)"),
    (["~trainer.max_steps"], "~trainer.max_steps is invalid: cannot be deleted: every run needs it"),
    (["hydra.launcher.max_members=0"], "hydra.launcher.max_members=0 is invalid: must be an integer >= 1"),
    (
        ["+callbacks.x._target_=collections.OrderedDict"],
        "callbacks.x._target_='collections.OrderedDict' is invalid: must name a Lightning Callback class",
    ),
    (
        ["+callbacks.x._target_=os.system"],
        "callbacks.x._target_='os.system' is invalid: must name a Lightning Callback",
    ),
    (
        ["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=nosuch"],
        "callbacks.early_stopping.monitor='nosuch' is invalid: is not a key the run publishes: val/loss, val/acc,",
    ),
    (
        ["callbacks=[model_checkpoint]", "callbacks.model_checkpoint.monitor=val/acc/place_9"],
        "callbacks.model_checkpoint.monitor='val/acc/place_9' is invalid: is not a key the run publishes",
    ),
    (
        ["callbacks=[early_stopping]", "callbacks.early_stopping.patience=abc"],
        "callbacks.early_stopping.patience='abc' is invalid: must be an integer",
    ),
    (
        ["callbacks=[model_checkpoint]", "+callbacks.model_checkpoint.every_n_train_steps=1.5"],
        "callbacks.model_checkpoint.every_n_train_steps=1.5 is invalid: must be an integer or null",
    ),
    (
        ["callbacks=[model_checkpoint]", "callbacks.model_checkpoint.every_n_train_steps=10"],
        "callbacks.model_checkpoint.every_n_train_steps=10 is invalid: conf/callbacks/model_checkpoint.yaml does not",
    ),
    (
        ["callbacks=[early_stopping]", "callbacks.early_stopping.mode=bad"],
        "callbacks.early_stopping is invalid: cannot be made: `mode` can be min, max, got bad",
    ),
    (
        ["callbacks=[early_stopping]", "+callbacks.early_stopping.bogus=1"],
        "callbacks.early_stopping.bogus=1 is invalid: is not an argument of EarlyStopping (monitor, min_delta,",
    ),
    (["trainer.ckpt_steps=[5,abc]"], "trainer.ckpt_steps=[5, 'abc'] is invalid: must be a list of steps (integers"),
    (["trainer.ckpt_steps=[5,9000]"], "trainer.ckpt_steps=[9000] is invalid: steps beyond trainer.max_steps=3000 are"),
    (["trainer.max_steps=100000000"], "trainer.max_steps=100000000 is invalid: must be an integer in 1..16777216"),
    (
        ["seed=99999999999999999999"],
        "seed=99999999999999999999 is invalid: must be an integer in -9223372036854775808..922337203685477",
    ),
    (["hydra.output_subdir=../escape"], "hydra.output_subdir=../escape is invalid: must name a folder inside the run"),
    (["-m", "seed=0", "hydra.sweep.subdir=../x"], "hydra.sweep.subdir=../x is invalid: must name a folder inside the"),
    (
        ["callbacks=[model_checkpoint]", "callbacks.model_checkpoint.filename=../../esc/best"],
        "callbacks.model_checkpoint.filename='../../esc/best' is invalid: must be a file name (no folders, no ..)",
    ),
    (
        ["callbacks=[model_checkpoint]", "+callbacks.model_checkpoint.dirpath=/tmp/elsewhere"],
        "callbacks.model_checkpoint.dirpath='/tmp/elsewhere' is invalid: a run writes only into its own folder",
    ),
    (
        ["-m", "seed=0,1", "resume=somewhere"],
        "resume=somewhere names one run, but the sweep has 2 jobs: give resume=auto",
    ),
    (["-m", "seed=range(0,20000)"], "the sweep has 20000 jobs: at most 10000 in one command"),
    (["model.width=${model.width}"], "model.width=${model.width} is invalid: ${model.width} refers to the key itself"),
    (
        ["model.width=${oc.env:ADDREPRO_NOT_SET}"],
        "model.width=${oc.env:ADDREPRO_NOT_SET} is invalid: the environment variable ADDREPRO_NOT_SET is not set",
    ),
    (
        ["reference=nanda_5digit"],
        "reference='nanda_5digit' is invalid: is a curve of 5-digit addition: give data.n_digits=5",
    ),
    (
        ["hydra/launcher=nosuch"],
        "hydra/launcher=nosuch is invalid: Hydra cannot compose it: In 'hydra/config': Could not",
    ),
    (
        ["-m", "+sweep=nosuch"],
        "+sweep=nosuch is invalid: Hydra cannot compose it: In 'train': Could not find 'sweep/no",
    ),
    (["+experiment=nanda_5digit"], "+experiment=nanda_5digit is invalid: Hydra cannot compose it: Multiple values for"),
    (["optimizer.betas={a:1}"], "optimizer.betas={a:1} is invalid: Hydra cannot compose it: Error merging override"),
    (["+sweep=width"], "+sweep=width is a sweep: add -m to run its jobs"),
    (
        ["-m", "seed=0,1", "hydra/launcher=parallel", "hydra.launcher.n_jobs=0"],
        "hydra.launcher.n_jobs=0 is invalid: must be an integer other than 0",
    ),
    (
        ["experiment=[nanda_5digit,quirke_5digit]"],
        "experiment=[nanda_5digit,quirke_5digit] is invalid: choose one preset",
    ),
    (["seed=1)"], "seed=1) is invalid: Hydra cannot read it: extraneous input ')' expecting <EOF> (grammar: https://"),
    (["model.width=[1,2"], "model.width=[1,2 is invalid: Hydra cannot read it: no viable alternative at input"),
    (["callbacks=[lr_monitor,nosuch]"], "callbacks=nosuch is invalid: is not an option of callbacks (options: early_"),
    (["callbacks=null"], "callbacks=None is invalid: choose a list of callbacks: callbacks=[] for none, or of early_"),
    (["-m", "logger=csv,nosuch"], "logger=nosuch is invalid: is not an option of logger (options: csv, many,"),
    (["-m", "callbacks=[lr_monitor],[nosuch]"], "callbacks=nosuch is invalid: is not an option of callbacks"),
    (["callbacks.nosuch.x=1"], "callbacks.nosuch.x=1 is invalid: nosuch is not a callback of conf/callbacks (early_"),
    (["callbacks.lr_monitor.logging_interval=step"], "callbacks.lr_monitor.logging_interval=step is invalid: choose"),
    (["model.width=${oops}"], "model.width=${oops} is invalid: ${oops} names no key of the config"),
    (["seed=${nosuch:1}"], "seed=${nosuch:1} is invalid: ${nosuch:...} names no resolver"),
    (["+data.n_digits=3"], "data.n_digits=3 is invalid: exists already: set it with data.n_digits=... (no +)"),
    (["model.width=" + "1" * 5000], "model.width=1111111111"),
    (["mödel.width=16"], "mödel.width=16 is invalid: Hydra cannot read it: LexerNoViableAltException: mödel.width=16"),
    (["resume="], "resume='' is invalid: must be a job folder, a checkpoint file or auto"),
    (["model.depth=1000000"], "model.depth=1000000 is invalid: must be an integer in 1..64"),
    (
        ["-m", "seed=0,1,abc"],
        "seed='abc' is invalid: must be an integer in -9223372036854775808..9223372036854775807 (in job 2:",
    ),
    (["-m", "model.n_heads=4,3"], "model.width=16 is invalid: must be divisible by model.n_heads=3"),
    (["-m", "seed=glob(*)"], "the sweep has no jobs (a glob(...) that matched nothing?)"),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append((["trainer.accelerator=gpu"], "trainer.accelerator='gpu' is invalid: no CUDA GPU visible"))
    CONFIG_CASES.append((["trainer.cuda_graph=true"], "trainer.cuda_graph=True is invalid: needs a CUDA GPU, and none"))


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("overrides,message", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_values_give_one_line_before_anything_is_created(cli, tmp_path, overrides, message):
    proc = cli("addrepro.train", *TINY, *overrides, "hydra.run.dir=job")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"addrepro: config error: {message}"), lines
    assert list(tmp_path.iterdir()) == []  # Hydra's folder for the run is gone again


def test_a_monitor_the_config_cannot_know_is_checked_at_the_first_evaluation(cli, tmp_path):
    # Shelf-science keys depend on the task: a misspelt one is named at the first evaluation that
    # published them, in one line, instead of Lightning's error after training.
    proc = cli(
        "addrepro.train",
        *TINY,
        "callbacks=[early_stopping]",
        "callbacks.early_stopping.monitor=val/naive/place_1/plus_O",
        "hydra.run.dir=job",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in error_lines(proc) if line.startswith("addrepro:")]
    assert len(lines) == 1 and lines[0].startswith(
        "addrepro: config error: EarlyStopping.monitor='val/naive/place_1/plus_O' is invalid: is not a key this run "
        "logs at its evaluations; did you mean val/naive/place_1/plus_"
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "job" / "status.json").read_text())["status"] == "failed"


def hydra_files(job: Path) -> None:
    (job / ".hydra").mkdir()
    for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"):
        (job / name).write_text("x")


def test_a_refused_runs_folder_goes_only_if_this_command_made_it_and_it_holds_hydras_files(tmp_path):
    (tmp_path / "mine").mkdir()
    made = make_folder(tmp_path / "mine" / "day" / "job")
    assert made == tmp_path / "mine" / "day"
    hydra_files(tmp_path / "mine" / "day" / "job")
    assert remove_refused_job_dir(tmp_path / "mine" / "day" / "job", ".hydra", "train.log", made)
    assert list(tmp_path.iterdir()) == [tmp_path / "mine"]  # the user's folder stays, empty or not
    # A folder that existed before the command (a run's, say) is never removed.
    assert make_folder(tmp_path / "mine") is None
    hydra_files(tmp_path / "mine")
    assert not remove_refused_job_dir(tmp_path / "mine", ".hydra", "train.log", None)
    assert (tmp_path / "mine" / "train.log").exists()
    # Nor one that holds anything beside Hydra's files.
    made = make_folder(tmp_path / "new")
    hydra_files(tmp_path / "new")
    (tmp_path / "new" / "metrics.csv").write_text("step\n")
    assert not remove_refused_job_dir(tmp_path / "new", ".hydra", "train.log", made)
    assert (tmp_path / "new" / ".hydra" / "config.yaml").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished CSV-only run (logger.csv=false: no metrics file) and checkpoints made from it."""
    root = tmp_path_factory.mktemp("bad_ckpt")
    proc = run_cli(
        "addrepro.train",
        [*TINY, "trainer.max_steps=20", "logger.wandb.enabled=false", "logger.csv=false", "hydra.run.dir=nocsv"],
        root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = torch.load(root / "nocsv" / "checkpoints" / "last.ckpt", weights_only=True)
    header = ("format", "task", "model_config", "config", "step", "wandb_run_id", "wandb_name", "wandb_group")
    torch.save({k: last[k] for k in header} | {"model": last["model"]}, root / "spike_20_at.ckpt")  # as SpikeSnapshots
    for key in ("config", "model", "model_config"):
        torch.save({k: v for k, v in last.items() if k != key}, root / f"no_{key}.ckpt")
    torch.save({**last, "model": {k: v for k, v in last["model"].items() if k != "embed.W_E"}}, root / "no_WE.ckpt")
    torch.save({**last, "optimizer": {"moments": {}}}, root / "no_step_count.ckpt")
    (root / "code.ckpt").write_bytes(pickle.dumps(print, protocol=2))
    (root / "text.ckpt").write_text("program: addrepro.train\nmethod: grid\n")  # a file of another kind
    # Tensor-only checkpoints (they load with weights_only=True) whose contents no run writes:
    moments, name = last["optimizer"]["moments"], "blocks.0.attn.W_Q"
    bad_moment = {**moments, name: {**moments[name], "exp_avg": moments[name]["exp_avg"][:, :3]}}
    for label, change in {
        "moment_shape": {"optimizer": {**last["optimizer"], "moments": bad_moment}},
        "no_moment": {"optimizer": {**last["optimizer"], "moments": {k: v for k, v in moments.items() if k != name}}},
        "negative_step": {"step": -5, "optimizer": {**last["optimizer"], "step_count": -5}},
        "bad_task": {"task": {**last["task"], "order": "zzz"}},
        "step_mismatch": {"optimizer": {**last["optimizer"], "step_count": 7}},
        "short_generator": {"data": {**last["data"], "generator": last["data"]["generator"][:100]}},
        "no_generator": {"data": {"device": "cpu"}},
        "nan_weights": {"model": {**last["model"], name: last["model"][name].clone().fill_(float("nan"))}},
        "double_weights": {"model": {**last["model"], name: last["model"][name].double()}},
        "huge_model": {"model_config": {**last["model_config"], "n_layers": 1_000_000}},
        "config_text": {"config": "garbage"},
        "escaping_run_id": {"wandb_run_id": "../../x/ESCAPE"},
        "bad_draws": {"data": {**last["data"], "draws": -3}},
    }.items():
        torch.save({**last, **change}, root / f"{label}.ckpt")
    return root


CKPT_CASES = [
    ("huge_model.ckpt", "checkpoint=huge_model.ckpt has a model_config of 3.07e+09 parameters (at most 2e+09)"),
    ("config_text.ckpt", "checkpoint=config_text.ckpt holds a config of type str (a mapping expected)"),
    ("escaping_run_id.ckpt", "checkpoint=escaping_run_id.ckpt holds wandb_run_id='../../x/ESCAPE' (letters, digits"),
    ("bad_draws.ckpt", "resume=bad_draws.ckpt cannot be resumed: data.draws is -3 (a count of batches >= 0 expected)"),
    ("spike_20_at.ckpt", "resume=spike_20_at.ckpt cannot be resumed: missing optimizer, data (weights-only"),
    ("no_config.ckpt", "resume=no_config.ckpt cannot be resumed: missing config"),
    ("no_step_count.ckpt", "resume=no_step_count.ckpt cannot be resumed: missing optimizer.step_count"),
    ("no_model.ckpt", "checkpoint=no_model.ckpt is incomplete: missing or invalid model"),
    ("no_model_config.ckpt", "checkpoint=no_model_config.ckpt is incomplete: missing or invalid model_config"),
    ("no_WE.ckpt", "checkpoint=no_WE.ckpt does not match its model_config: missing weights embed.W_E"),
    ("code.ckpt", "checkpoint=code.ckpt cannot be read: it holds pickled Python objects"),
    ("text.ckpt", "checkpoint=text.ckpt is not a checkpoint file (not written by torch.save)"),
    (
        "moment_shape.ckpt",
        "resume=moment_shape.ckpt cannot be resumed: optimizer moment exp_avg of blocks.0.attn.W_Q is (4, 3, 4) "
        "torch.float32 ((4, 16, 4) torch.float32 expected)",
    ),
    (
        "no_moment.ckpt",
        "resume=no_moment.ckpt cannot be resumed: missing optimizer moments of blocks.0.attn.W_Q at step 20",
    ),
    ("negative_step.ckpt", "checkpoint=negative_step.ckpt holds step -5 (must be >= 0)"),
    ("bad_task.ckpt", "checkpoint=bad_task.ckpt holds an invalid task (order='zzz' must be one of msb, lsb)"),
    (
        "step_mismatch.ckpt",
        "resume=step_mismatch.ckpt cannot be resumed: optimizer.step_count is 7 but step is 20 (they count the same",
    ),
    ("short_generator.ckpt", "resume=short_generator.ckpt cannot be resumed: data.generator holds 100 bytes ("),
    ("no_generator.ckpt", "resume=no_generator.ckpt cannot be resumed: data.generator is not a generator state"),
    ("nan_weights.ckpt", "resume=nan_weights.ckpt cannot be resumed: weights blocks.0.attn.W_Q are not all finite"),
    (
        "double_weights.ckpt",
        "resume=double_weights.ckpt cannot be resumed: weights blocks.0.attn.W_Q are torch.float64 (float32 expected)",
    ),
]


@pytest.mark.parametrize("name,message", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoints_are_refused_naming_what_is_missing(finished, monkeypatch, name, message):
    monkeypatch.chdir(finished)
    with pytest.raises(CheckpointError) as info:
        check_resumable(load_checkpoint(name), Path(name))
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("name", ["spike_20_at.ckpt", "no_config.ckpt", "moment_shape.ckpt"])
def test_resume_from_a_bad_checkpoint_gives_one_line_before_anything_is_created(finished, name):
    proc = run_cli("addrepro.train", [*TINY, f"resume={name}", "hydra.run.dir=again"], finished)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = dict(CKPT_CASES)[name]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"addrepro: checkpoint error: {message}"), lines
    assert not (finished / "again").exists()  # no folder, no W&B run resumed and marked failed


ANALYZE_CASES = [
    (
        ["analysis=patching", "patching.places=[0]", "patching.kinds=[carry]"],
        "patching.places=[0] with kinds=['carry'] selects nothing to patch: carry pairs need a place >= 1",
    ),
    (["analysis=probes", "probes.max_examples=1"], "probes.max_examples=1 with test_fraction=0.25 leaves 1 examples"),
    (
        ["analysis=probes", "probes.test_fraction=0.999999"],
        "probes.max_examples=2048 with test_fraction=0.999999 leaves",
    ),
    (
        ["analysis=probes", "probes.pca_points=1"],
        "probes.pca_points=1 is invalid: a PCA of the residual needs at least",
    ),
    (["steps=[5]"], "steps=[5] is for analysis=over_training (give one checkpoint= otherwise)"),
    (["analysis=over_training", "steps=[abc]"], "steps=['abc'] is invalid: must be null or a list of steps"),
    (["analysis=over_training", "steps=[999]"], "steps=[999] have no checkpoint in "),
    (["threads=0"], "threads=0 is invalid: must be an integer >= 1"),
    (["analysis=composition"], "analysis=composition needs a model of at least 2 layers: this one has 1"),
    (["threads=abc"], "threads='abc' is invalid: must be an integer >= 1"),
    (["data.val_size=-5"], "data.val_size=-5 is invalid: must be null or an integer >= 1"),
    (["data.carry_size=0"], "data.carry_size=0 is invalid: must be an integer >= 1"),
    (["wandb=maybe"], "wandb='maybe' is invalid: must be true or false"),
    (["threds=2"], "threds=2 is not a config key; did you mean threads?"),
    (["threads=100000"], "threads=100000 is invalid: must be an integer in 1..1024"),
    (["attention=5"], "attention=5 is invalid: attention is a section; set its keys (attention.<key>=...)"),
    (["~threads"], "~threads is invalid: cannot be deleted (give it a value)"),
    (["checkpoint=123"], "checkpoint=123 is invalid: must be the path of a .ckpt file or a job folder"),
    (["analysis=probes", "probes.ridge=-1"], "probes.ridge=-1 is invalid: must be a number in [1e-9, 1e6]"),
    (["analysis=probes", "probes.ridge=1e-300"], "probes.ridge=1e-300 is invalid: must be a number in [1e-9, 1e6]"),
    (
        ["analysis=breakdown", "breakdown.per_cell=100000000"],
        "breakdown.per_cell=100000000 is invalid: must be an integer in 1..1024",
    ),
    (
        ["analysis=patching", "patching.size=1000000000"],
        "patching.size=1000000000 is invalid: must be an integer in 1..100000",
    ),
    (["analysis=probes", "probes.ridge=abc"], "probes.ridge='abc' is invalid: must be a finite number"),
    (["analysis=probes", "probes.test_fraction=0"], "probes.test_fraction=0 is invalid: must be a number in (0, 1)"),
    (["analysis=patching", "patching.kinds=carry"], "patching.kinds='carry' is invalid: must be a non-empty list"),
    (["analysis=patching", "patching.places=[]"], "patching.places=[] is invalid: must be null or a non-empty list"),
    (["analysis=[attention"], "config error: analysis=[attention is invalid: Hydra cannot read it: no viable"),
    (["attention.top=${oops}"], "config error: attention.top=${oops} is invalid: ${oops} names no key of the config"),
    (["+attention.nosuch=1"], "attention.nosuch=1 is not a config key; did you mean attention.top, attention?"),
    (
        ["analysis=patching", "patching.places=[0,9]"],
        "patching.places=[0, 9] is invalid: this model's task has places 0..2 (2 digits and the carry-out)",
    ),
]


@pytest.mark.parametrize("overrides,message", ANALYZE_CASES, ids=[" ".join(c[0]) for c in ANALYZE_CASES])
def test_analyze_options_are_checked_in_one_line(finished, overrides, message):
    proc = run_cli("addrepro.analyze", ["checkpoint=nocsv", "analysis=attention", *overrides], finished)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"addrepro: {message}"), lines
    assert not (finished / "nocsv" / "analysis").exists()


@pytest.mark.parametrize("name", ["no_model_config.ckpt"])
def test_analyze_names_what_a_checkpoint_lacks(finished, name):
    proc = run_cli("addrepro.analyze", [f"checkpoint={name}", "analysis=attention"], finished)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and f"checkpoint={name}" in lines[0], lines
    assert "Traceback" not in proc.stderr


def test_resuming_a_run_without_metrics_file_continues(finished):
    proc = run_cli(
        "addrepro.train",
        [*TINY, "trainer.max_steps=30", "trainer.plots=true", "resume=nocsv", "hydra.run.dir=again2"],
        finished,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(finished / "nocsv" / "checkpoints" / "last.ckpt", weights_only=True)["step"] == 30


def test_a_checkpoint_outside_a_job_folder_continues_in_a_new_folder_and_touches_nothing_else(tmp_path, finished):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(finished / "nocsv" / "checkpoints" / "last.ckpt", downloads / "model.ckpt")
    start = torch.load(downloads / "model.ckpt", weights_only=True)["step"]  # 20 (30 once another test resumed it)
    (downloads / ".mine.tmp").write_text("a user's own temporary file")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = run_cli(
        "addrepro.train",
        [*TINY, "trainer.max_steps=40", "logger=csv", "resume=downloads/model.ckpt", "hydra.run.dir=continued"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "continued" not in p.parts} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["continued", "downloads"]
    last = torch.load(tmp_path / "continued" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["step"] == 40
    steps = [r["step"] for r in load_rows(tmp_path / "continued")]
    assert min(steps) == start and max(steps) == 40  # it continued the checkpoint's run, from its step


def test_a_special_file_as_checkpoint_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    proc = run_cli("addrepro.train", [*TINY, "resume=pipe", "hydra.run.dir=job"], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert error_lines(proc) == ["addrepro: checkpoint error: resume=pipe is not a regular file or a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


ABSURD_CASES = [
    (["optimizer.lr=inf"], "optimizer.lr=inf is invalid: must be a finite number > 0.0"),
    (["optimizer.eps=nan"], "optimizer.eps=nan is invalid: must be a finite number > 0.0"),
    (["trainer.devices=[0]", "trainer.accelerator=cpu"], "trainer.devices=[0] is invalid: names a GPU, but"),
    (["reference=nosuch"], "reference='nosuch' is invalid: must be null or a published curve shipped with addrepro"),
    (["reference=../../x"], "reference='../../x' is invalid: must be null or a published curve"),
    (["logger.wandb.project=a/b"], "logger.wandb.project='a/b' is invalid: must be a W&B name"),
    (["~optimizer"], "optimizer=None is invalid: is a config group every run needs"),
    (["trainer=null"], "trainer=None is invalid: is a config group every run needs"),
]


@pytest.mark.parametrize("overrides,message", ABSURD_CASES, ids=[" ".join(c[0]) for c in ABSURD_CASES])
def test_values_that_pass_a_type_check_but_cannot_be_used_are_refused_in_one_line(tmp_path, overrides, message):
    proc = run_cli("addrepro.train", [*TINY, *overrides, "hydra.run.dir=job"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"addrepro: config error: {message}"), lines
    assert list(tmp_path.iterdir()) == []


def test_a_resume_writes_only_into_the_job_and_records_its_overrides(tmp_path):
    args = [*TINY, "logger=csv"]
    first = run_cli("addrepro.train", [*args, "trainer.max_steps=20", "hydra.run.dir=job"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    proc = run_cli("addrepro.train", [*args, "resume=job", "trainer.max_steps=30", "hydra.run.dir=other"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]  # no folder for the resuming command
    job = tmp_path / "job"
    assert OmegaConf.load(job / ".hydra" / "config.yaml").trainer.max_steps == 30
    (resume,) = OmegaConf.load(job / ".hydra" / "resumes.yaml")
    assert "trainer.max_steps=30" in resume.overrides and resume.previous_config.trainer.max_steps == 20
    log = (job / "train.log").read_text()
    assert "resumed with" in log and "trainer.max_steps=30" in log and log.count("done:") == 2
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["step"] == 30


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.order=../../x", "data.order='../../x' is invalid: must be one of msb, lsb"),
        ("mc_samples=0", "mc_samples=0 is invalid: must be an integer in 1..100000000"),
        ("data.bse=4", "data.bse=4 is invalid: is not a config key; did you mean data.base"),
        ("data.n_digits=3)", "data.n_digits=3) is invalid: Hydra cannot read it: extraneous input ')'"),
        ("data.n_digits=${oops}", "data.n_digits=${oops} is invalid: ${oops} names no key of the config"),
        ("mc_seed=-5", "mc_seed=-5 is invalid: must be an integer in 0..4294967295"),
    ],
)
def test_theory_checks_its_values_before_its_folder_is_named_after_them(tmp_path, override, message):
    proc = run_cli("addrepro.theory", [override], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"addrepro: config error: {message}"), lines
    assert list(tmp_path.iterdir()) == []


def test_theory_writes_the_atlas_of_the_configured_task(tmp_path):
    proc = run_cli("addrepro.theory", ["data.n_digits=2", "data.base=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (written,) = (tmp_path / "outputs" / "theory").rglob("shelves.json")
    assert written.parent.name == "2digit_base4_msb_add" and f"written: {written}" in proc.stdout


def test_a_run_stopped_while_drawing_its_end_of_run_files_draws_them_when_resumed(tmp_path):
    args = [*TINY, "logger=csv", "trainer.max_steps=20", "trainer.plots=true", "hydra.run.dir=job"]
    first = run_cli("addrepro.train", args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    job = tmp_path / "job"
    listed = json.loads((job / "end_of_run.json").read_text())
    assert listed["step"] == 20 and {"timeline.md", "spikes.md", "place_loss.png"} <= set(listed["files"])
    drawn = {name: (job / name).read_bytes() for name in ("timeline.md", "shelves_detected.json")}
    # As after a kill during the end-of-run files: the checkpoint says finished, some files are missing.
    for name in ("end_of_run.json", "timeline.md", "place_loss.png"):
        (job / name).unlink()
    again = run_cli("addrepro.train", [*args, "resume=job"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (job / "place_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {name: (job / name).read_bytes() for name in drawn} == drawn  # the same files as the first time
    assert json.loads((job / "end_of_run.json").read_text())["files"] == listed["files"]
    assert json.loads((job / "status.json").read_text())["status"] == "ok"
    # A finished run whose files are complete is left as it is.
    before = {p: p.stat().st_mtime_ns for p in job.rglob("*.png")}
    third = run_cli("addrepro.train", [*args, "resume=job"], tmp_path)
    assert third.returncode == 0 and {p: p.stat().st_mtime_ns for p in job.rglob("*.png")} == before


@pytest.fixture(scope="module")
def csv_job(tmp_path_factory):
    """A finished 20-step run with its metrics file, copied by the tests that damage its files."""
    root = tmp_path_factory.mktemp("run_files")
    proc = run_cli("addrepro.train", [*TINY, "logger=csv", "trainer.max_steps=20", "hydra.run.dir=job"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "job"


def damaged(csv_job, tmp_path, what: str):  # noqa: ANN201
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    if what == "short_line":
        path = job / "csv" / "metrics.csv"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join([*lines[:2], "5,1.0\n", *lines[2:]]))  # a line in the middle, two cells
    elif what == "torn_confusion":
        path = job / "confusion.npz"
        path.write_bytes(path.read_bytes()[:100])
    elif what == "spikes_garbage":
        (job / "spikes.json").write_text("{not json")
    elif what == "spikes_records":
        (job / "spikes.json").write_text('[1, "x", null]')
    elif what == "exits_records":
        (job / "shelf_exits.json").write_text('[{"place": "x"}, 5]')
    elif what == "config_task":
        path = job / ".hydra" / "config.yaml"
        path.write_text(path.read_text().replace("base: 10", "base: abc"))
    elif what == "config_digits":
        path = job / ".hydra" / "config.yaml"
        path.write_text(path.read_text().replace("n_digits: 2", "n_digits: 40"))
    elif what == "config_reference":  # a path where a shipped curve's name belongs
        path = job / ".hydra" / "config.yaml"
        path.write_text(path.read_text().replace("reference: null", "reference: ../../../../etc/passwd"))
    elif what == "exits_place":
        record = {"place": 99, "level": "uniform", "start_step": 0, "last_on_shelf": 5, "step": 10}
        (job / "shelf_exits.json").write_text(json.dumps([record]))
    elif what == "config_unresolvable":
        path = job / ".hydra" / "config.yaml"
        path.write_text(path.read_text().replace("seed: ${seed}", "seed: ${nosuch}"))
    elif what == "config_list":
        (job / ".hydra" / "config.yaml").write_text("[1, 2, 3]\n")
    elif what == "metrics_header_only":
        path = job / "csv" / "metrics.csv"
        path.write_text(path.read_text().splitlines(keepends=True)[0])
    elif what == "metrics_device":
        path = job / "csv" / "metrics.csv"
        path.unlink()
        path.symlink_to("/dev/zero")  # it would never end
    elif what.startswith("step="):  # the first row's step edited by hand
        path = job / "csv" / "metrics.csv"
        header, first, *rest = path.read_text().splitlines(keepends=True)
        cells = first.split(",")
        cells[header.split(",").index("step")] = what.removeprefix("step=")
        path.write_text("".join([header, ",".join(cells), *rest]))
    elif what == "column_twice":  # a second column named as the first metric
        path = job / "csv" / "metrics.csv"
        header, *rest = path.read_text().splitlines(keepends=True)
        names = header.rstrip("\n").split(",")
        names[2] = names[1]
        path.write_text("".join([",".join(names) + "\n", *rest]))
    elif what == "confusion_shape":
        np.savez(job / "confusion.npz", steps=np.array([0, 10]), confusion=np.zeros((2, 1, 1, 1)))
    return job


REPORT_CASES = [
    ("spikes_garbage", "spikes.json is not a JSON file as addrepro writes it ("),
    ("spikes_records", "spikes.json: record 0 is not a record with step, loss, ratio, baseline"),
    ("exits_records", "shelf_exits.json: record 0 is not a record with place, level, start_step, last_on_shelf, step"),
    ("config_task", ".hydra/config.yaml holds no valid task in its data section (base='abc' must be an integer"),
    ("config_list", ".hydra/config.yaml is not a run's config: it has no data section"),
    ("exits_place", "shelf_exits.json: record 0 has place 99 or a negative step (this task's places are 0..2)"),
    (
        "config_unresolvable",
        ".hydra/config.yaml cannot be read as a run's config (Interpolation key 'nosuch' not found",
    ),
    ("config_reference", ".hydra/config.yaml names reference='../../../../etc/passwd': not a curve shipped with"),
    ("config_digits", ".hydra/config.yaml holds no valid task in its data section (n_digits=40 must keep 2 * base^n"),
    ("confusion_shape", "confusion.npz holds matrices (1, 1, 1), not this task's (3, 10, 10)"),
    ("metrics_device", "csv/metrics.csv is not a regular file"),
    ("metrics_header_only", "csv/metrics.csv holds no metric rows (nothing to draw)"),
    ("step=-5", "csv/metrics.csv, line 2: step='-5' is not a step (a whole number >= 0)"),
    ("step=2.5", "csv/metrics.csv, line 2: step='2.5' is not a step"),
    ("step=1e300", "csv/metrics.csv, line 2: step='1e300' is not a step"),
    ("column_twice", "csv/metrics.csv, line 1: the column "),
]


@pytest.mark.parametrize("what,message", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_names_a_damaged_or_edited_run_file_in_one_line(csv_job, tmp_path, what, message):
    job = damaged(csv_job, tmp_path, what)
    report = run_cli("addrepro.report", [str(job)], tmp_path)
    assert report.returncode == 2 and "Traceback" not in report.stderr, report.stderr[-2000:]
    (line,) = error_lines(report)
    assert line.startswith("addrepro.report: ") and message in line, line


@pytest.mark.parametrize(
    "what,message",
    [
        ("short_line", "csv/metrics.csv, line 3: 2 cells where the header has"),
        ("torn_confusion", "confusion.npz cannot be read ("),
    ],
)
def test_a_damaged_run_file_is_named_in_one_line_by_resume_and_report(csv_job, tmp_path, what, message):
    job = damaged(csv_job, tmp_path, what)
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    proc = run_cli("addrepro.train", [*TINY, "logger=csv", "trainer.max_steps=30", "resume=job"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("addrepro: run file error: ") and message in lines[0], lines
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file()} == before  # nothing changed
    report = run_cli("addrepro.report", [str(job)], tmp_path)
    assert report.returncode == 2 and "Traceback" not in report.stderr
    (line,) = error_lines(report)
    assert line.startswith("addrepro.report: ") and message in line, line


def test_a_sweep_report_names_the_job_it_cannot_read_and_draws_the_rest(csv_job, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copytree(csv_job, sweep / "0_seed=0")
    damaged(csv_job, tmp_path, "step=zero").rename(sweep / "1_seed=1")
    path = sweep / "1_seed=1" / "csv" / "metrics.csv"
    report = run_cli("addrepro.report", [str(sweep)], tmp_path)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-2000:]
    (line,) = error_lines(report)
    assert line == f"addrepro.report: left out {sweep / '1_seed=1'}: {path}, line 2: step='zero' is not a number"
    table = (sweep / "sweep_shelves.md").read_text()
    assert "| 1 | ok (unreadable) |" in table and f"- 1_seed=1: {path}, line 2: step='zero'" in table
    entries = json.loads((sweep / "sweep_shelves.json").read_text())["jobs"]
    assert [e["unreadable"] is None for e in entries] == [True, False]
    assert entries[0]["shelves"] is not None  # the readable job is drawn


def test_a_torn_or_foreign_status_file_reads_as_unknown(tmp_path):
    from addrepro.rundir.status import read_statuses

    for name, text in (("0", '{"status": "ok"'), ("1", "[1, 2]"), ("2", '{"status": "ok"}')):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (tmp_path / name / "status.json").write_text(text)
    statuses = read_statuses(tmp_path)
    assert statuses["0"] == {"status": "unknown", "message": "status.json cannot be read (JSONDecodeError)"}
    assert statuses["1"] == {"status": "unknown", "message": "status.json holds no status"}
    assert statuses["2"] == {"status": "ok"}


def test_a_sweep_folder_given_for_one_job_names_a_job_to_give(tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("0_seed=0", "1_seed=1"):
        (sweep / name / "checkpoints").mkdir(parents=True)
    proc = run_cli("addrepro.train", [*TINY, f"resume={sweep}", "hydra.run.dir=again"], tmp_path)
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and line == (
        f"addrepro: checkpoint error: resume={sweep}: no checkpoints/last.ckpt or checkpoints/step_N.ckpt in this "
        f"folder; it holds job folders: name one, e.g. resume={sweep / '0_seed=0'} … (2 jobs)"
    )
    assert not (tmp_path / "again").exists()


def test_two_hydra_modes_at_once_are_one_line(tmp_path):
    proc = run_cli("addrepro.train", ["-m", "seed=0,1", "--cfg", "job"], tmp_path)
    assert proc.returncode == 2 and error_lines(proc) == ["addrepro: -m and --cfg cannot be combined: give one of them"]
    assert list(tmp_path.iterdir()) == []


def test_a_run_is_refused_a_folder_that_holds_files_and_a_sweep_one_that_is_a_job(tmp_path, csv_job):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own file")
    proc = run_cli("addrepro.train", [*TINY, f"hydra.run.dir={mine}"], tmp_path)
    assert proc.returncode == 2 and error_lines(proc) == [
        f"addrepro: run folder error: hydra.run.dir={mine} already holds files (notes.txt, …): give a new folder"
    ]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    proc = run_cli("addrepro.train", [*TINY, "seed=5", f"hydra.run.dir={job}"], tmp_path)
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and line.endswith(f"give a new folder, or resume={job} to continue the run in it")
    proc = run_cli(
        "addrepro.train", ["-m", *TINY, "seed=0", f"hydra.sweep.dir={job}", "hydra.sweep.subdir=."], tmp_path
    )
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and line.startswith(f"addrepro: run folder error: hydra.sweep.dir={job} already holds")
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("what", ["config_fifo", "confusion_fifo"])
def test_report_and_resume_refuse_a_special_run_file_without_blocking(csv_job, tmp_path, what):
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    path = job / (".hydra/config.yaml" if what == "config_fifo" else "confusion.npz")
    path.unlink()
    os.mkfifo(path)  # reading it would block for ever
    report = run_cli("addrepro.report", [str(job)], tmp_path, timeout=60)
    assert report.returncode == 2 and error_lines(report) == [f"addrepro.report: {path} is not a regular file"]
    if what == "confusion_fifo":
        proc = run_cli(
            "addrepro.train", [*TINY, "logger=csv", "trainer.max_steps=30", "resume=job"], tmp_path, timeout=60
        )
        (line,) = error_lines(proc)
        assert proc.returncode == 2 and line.startswith(f"addrepro: run file error: {path} is not a regular file")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]  # no folder of the refused command


@pytest.mark.parametrize("what", ["log_fifo", "log_link"])
def test_a_resume_refuses_run_files_that_are_links_or_special_files(csv_job, tmp_path, what):
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file\n")
    (job / "train.log").unlink()
    if what == "log_fifo":
        os.mkfifo(job / "train.log")
    else:
        (job / "train.log").symlink_to(outside)
    status = (job / "status.json").read_text()
    proc = run_cli("addrepro.train", [*TINY, "logger=csv", "trainer.max_steps=30", "resume=job"], tmp_path, timeout=60)
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and line == (
        f"addrepro: run file error: {job / 'train.log'} is not a regular file (a link or a special file); "
        "a run writes only its own files"
    )
    assert outside.read_text() == "someone else's file\n" and (job / "status.json").read_text() == status
    assert not (job / ".lock").exists()


@pytest.mark.parametrize("folder", ["csv", ".hydra", "checkpoints"])
def test_a_resume_refuses_job_folders_that_are_links(csv_job, tmp_path, folder):
    # A linked folder would carry every file written into it out of the job (another job's checkpoints).
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    outside = tmp_path / "outside"
    shutil.move(job / folder, outside)
    (job / folder).symlink_to(outside)
    before = {p.relative_to(outside): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    proc = run_cli("addrepro.train", [*TINY, "logger=csv", "trainer.max_steps=30", "resume=job"], tmp_path, timeout=60)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("addrepro: ") and f"{job / folder} is not a folder of the job (a link" in lines[0]
    assert {p.relative_to(outside): p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before


def test_a_resume_to_fewer_steps_than_its_checkpoint_is_refused(csv_job, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    config = (job / ".hydra" / "config.yaml").read_text()
    step = load_checkpoint(job / "checkpoints" / "last.ckpt")["step"]
    proc = run_cli("addrepro.train", [*TINY, "logger=csv", f"trainer.max_steps={step - 5}", "resume=job"], tmp_path)
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and line.startswith(
        f"addrepro: config error: trainer.max_steps={step - 5} is invalid: is below the step of "
    ), line
    assert (job / ".hydra" / "config.yaml").read_text() == config and not (job / ".hydra" / "resumes.yaml").exists()


def test_a_garbled_resumes_file_and_an_unknown_wandb_mode_are_one_line(csv_job, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    (job / ".hydra" / "resumes.yaml").write_text("{not: [valid")
    proc = run_cli("addrepro.train", [*TINY, "logger=csv", "trainer.max_steps=30", "resume=job"], tmp_path)
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and line.startswith(
        f"addrepro: run file error: {job / '.hydra' / 'resumes.yaml'} cannot"
    )
    env = {**cli_env(), "WANDB_MODE": "garbage"}
    proc = subprocess.run(
        [sys.executable, "-m", "addrepro.train", *TINY, "hydra.run.dir=new"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and error_lines(proc) == [
        "addrepro: config error: WANDB_MODE='garbage' is invalid: (an environment variable) must be one of online, "
        "offline, disabled, dryrun, run, shared"
    ]
    assert not (tmp_path / "new").exists()


def test_a_metrics_line_beyond_the_csv_field_limit_is_one_line(csv_job, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(csv_job, job)
    path = job / "csv" / "metrics.csv"
    header, first, *rest = path.read_text().splitlines(keepends=True)
    path.write_text("".join([header, first.replace(",", "," + "9" * 200_000, 1), *rest]))
    report = run_cli("addrepro.report", [str(job)], tmp_path)
    (line,) = error_lines(report)
    assert report.returncode == 2 and line.startswith(f"addrepro.report: {path}, line ") and "field larger" in line


def test_dashboard_refuses_a_workspace_to_publish_that_is_no_regular_file(tmp_path, capsys):
    from addrepro import dashboard

    fifo = tmp_path / "p.json"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, tmp_path / "none.json"):
        assert dashboard.main(["--publish", str(path)]) == 2
        why = "does not exist" if path.name == "none.json" else "is not a regular file"
        assert capsys.readouterr().err.strip() == f"addrepro.dashboard: {path} {why}"


@pytest.mark.parametrize("entity", ["a/b c", "", "x:y"])
def test_dashboard_refuses_an_entity_that_is_no_wandb_name(tmp_path, capsys, entity):
    from addrepro import dashboard

    assert dashboard.main(["--entity", entity, str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line == f"addrepro.dashboard: --entity {entity!r} is not a W&B name: not empty, without / \\ # ? % : or spaces"
    )
