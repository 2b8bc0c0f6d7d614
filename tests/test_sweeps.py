"""Sweeps at scale: the ready sweep definitions, launchers, W&B sweep files and the sweep report.

Real multiruns run in subprocesses (the basic launcher and submitit's local executor) and their offline
W&B runs are read back; the sweep report is drawn from the saved files alone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO, cli_env, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import addrepro.train  # noqa: F401 - registers the config schema and the ${uid:} resolver
from addrepro import report
from addrepro.model.transformer import model_from_checkpoint
from addrepro.rundir.checkpoints import load_checkpoint
from addrepro.rundir.job import job_dirs
from addrepro.rundir.metrics_file import load_rows
from addrepro.wandb_offline import read_run
from addrepro.wandb_sweep import command_args, expand_commands, grid_runs, load_sweep

SWEEPS = ["width", "depth", "weight_decay", "base", "digits", "mlp", "seeds", "width_x_weight_decay"]
DOCUMENTED = {
    "width": {"model.width": [64, 128, 256, 512]},
    "depth": {"model.depth": [1, 2, 3]},
    "weight_decay": {"optimizer.weight_decay": [0, 0.1, 0.5, 1]},
    "base": {"data.base": [2, 3, 10, 16]},
    "digits": {"data.n_digits": [3, 5, 10]},
    "mlp": {"model.attn_only": [False, True]},
    "seeds": {"seed": [0, 1, 2, 3, 4]},
    "width_x_weight_decay": {"model.width": [64, 128, 256, 512], "optimizer.weight_decay": [0, 0.1, 0.5, 1]},
}
TINY = ["data.n_digits=2", "trainer.plots=false", *FAST]


def _hydra_grid(cfg) -> dict[str, list]:
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.key_or_group: list(o.sweep_iterator()) for o in parsed}


def test_sweep_configs_define_the_documented_grids_in_hydra_and_wandb():
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        for name in SWEEPS:
            cfg = compose("train", overrides=[f"+sweep={name}"], return_hydra_config=True)
            assert _hydra_grid(cfg) == DOCUMENTED[name], name
            # Jobs are named from their swept values, whatever the launcher.
            first = {k: v[0] for k, v in DOCUMENTED[name].items()}
            cfg = compose("train", overrides=[f"+sweep={name}", *(f"{k}={v}" for k, v in first.items())])
            assert cfg.logger.wandb.name == ",".join(f"{k}={v}" for k, v in first.items()), name
            # The W&B sweep file of the same name walks the same grid.
            wandb_file = load_sweep(REPO / "sweeps" / "wandb" / f"{name}.yaml")
            wandb_grid = {k: spec["values"] for k, spec in wandb_file["parameters"].items()}
            assert wandb_grid == DOCUMENTED[name], name
        launchers = {"slurm": "SlurmLauncher", "local": "LocalLauncher", "parallel": "JoblibLauncher"}
        for launcher, target in launchers.items():
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(target)
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.array_parallelism > 1


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """The README's 2x2 corner of the width x weight-decay grid, run for real (basic launcher, offline W&B)."""
    cwd = tmp_path_factory.mktemp("grid")
    sweep = cwd / "sweep"
    proc = run_cli(
        "addrepro.train",
        [
            "-m",
            "+sweep=width_x_weight_decay",
            "model.width=64,128",
            "optimizer.weight_decay=0,1",
            "trainer.max_steps=20",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_grid_sweep_runs_and_lines_up_in_one_wandb_group(grid_sweep):
    # Job folders named by their number and the values the sweep gave them (not the keys all share).
    jobs = job_dirs(grid_sweep)
    assert [p.name for p in jobs] == [
        f"{i}_model.width={w},optimizer.weight_decay={d}"
        for i, (w, d) in enumerate([(64, 0), (64, 1), (128, 0), (128, 1)])
    ]
    summary = json.loads((grid_sweep / "sweep_summary.json").read_text())
    assert [v["status"] for v in summary.values()] == ["ok"] * 4
    runs = [read_run(job) for job in jobs]
    assert len({r.group for r in runs}) == 1 and runs[0].group.startswith("sweep-")
    assert len({r.run_id for r in runs}) == 4
    expected = [(64, 0), (64, 1), (128, 0), (128, 1)]
    assert [r.name for r in runs] == [f"model.width={w},optimizer.weight_decay={d}" for w, d in expected]
    for run, (width, wd) in zip(runs, expected, strict=True):
        assert run.exit_code == 0
        assert run.config["model"]["width"] == width and run.config["optimizer"]["weight_decay"] == wd
        assert run.config["trainer"]["max_steps"] == 20
        assert "train/loss/place_2" in run.history_keys and "val/loss" in run.history_keys
    assert all(r.history_keys == runs[0].history_keys for r in runs)  # one dashboard fits all
    assert all(r.series("train/loss")[0] == runs[0].series("train/loss")[0] for r in runs)  # same steps
    for job, run, (width, _) in zip(jobs, runs, expected, strict=True):
        for j in range(3):  # 2 digits: places 0 and 1, and the carry-out place 2
            for key in (f"train/loss/place_{j}", f"train/acc/place_{j}", f"val/loss/place_{j}"):
                assert key in run.history_keys, key
        for key in (
            "train/loss",
            "train/acc",
            "train/lr",
            "train/grad_norm/global",
            "train/grad_norm/attn",
            "train/grad_norm/mlp",
            "train/grad_norm/embed",
            "train/grad_norm/unembed",
            "train/grad_norm/layer_0",
            "val/acc",
            "val/naive/place_1/plus_1",
            "carry/place_1/cin_1/loss",
            "chain/place_2/len_1/loss",
        ):
            assert key in run.history_keys, key
        steps, losses = run.series("train/loss/place_0")
        assert steps and all(0 < v < 10 for v in losses)
        # The CSV holds the same numbers as W&B.
        rows = [r for r in load_rows(job) if "train/loss/place_0" in r]
        assert [r["train/loss/place_0"] for r in rows] == losses
        ckpt = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert ckpt["step"] == 20
        model, spec = model_from_checkpoint(ckpt)
        assert model.cfg.d_model == width and spec.n_digits == 2
        assert json.loads((job / "status.json").read_text())["status"] == "ok"


def test_sweep_report_from_saved_files(grid_sweep):
    assert report.main([str(grid_sweep)]) == 0
    png = grid_sweep / "sweep_place_loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 5_000_000
    text = (grid_sweep / "sweep_shelves.md").read_text()
    shelves, rests = text.split("## How many places rest on each level")
    table = shelves.splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == 4
    # the rest summary: a row per setting (width x weight decay, seeds pooled) and level
    assert "| model.width | optimizer.weight_decay | level | jobs |" in rests
    assert table[table.index(rows[0]) - 2].startswith("| job | model.width | optimizer.weight_decay | status |")
    assert rows[0].startswith("| 0 | 64 | 0 | ok |") and rows[3].startswith("| 3 | 128 | 1 | ok |")
    payload = json.loads((grid_sweep / "sweep_shelves.json").read_text())
    assert payload["swept_keys"] == ["model.width", "optimizer.weight_decay"]
    assert [j["swept"] for j in payload["jobs"]] == [
        {"model.width": w, "optimizer.weight_decay": d} for w, d in ((64, 0), (64, 1), (128, 0), (128, 1))
    ]
    assert all(isinstance(j["shelves"], list) for j in payload["jobs"])
    # A single job folder still gets the single-job report.
    assert report.main([str(job_dirs(grid_sweep)[0])]) == 0
    assert (job_dirs(grid_sweep)[0] / "place_loss.png").exists()


def test_submitit_local_launcher_runs_jobs_in_separate_processes(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "addrepro.train",
        [
            "-m",
            "hydra/launcher=local",
            "+sweep=base",
            "data.base=10,2",
            "optimizer.lr=1e-3,1e30",  # the 1e30 jobs diverge while they train
            "trainer.max_steps=5",
            "logger=csv",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    # The diverging jobs fail alone; the others finish, and the summary names them.
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [summary[job.name]["status"] for job in job_dirs(sweep)] == ["ok", "failed", "ok", "failed"]
    assert "Divergence" in summary[job_dirs(sweep)[1].name]["message"]
    assert f"job {job_dirs(sweep)[3].name} failed: " in proc.stderr
    ids = []
    for job in job_dirs(sweep)[::2]:
        assert (job / "checkpoints" / "last.ckpt").exists()
        assert json.loads((job / "status.json").read_text())["status"] == "ok"
        ids.append(yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])
    # submitit's local job id is the pid of the job's own process.
    assert len(set(ids)) == 2 and all((sweep / ".submitit" / str(i)).is_dir() for i in ids)


def test_wandb_sweep_macros(tmp_path, monkeypatch):
    monkeypatch.setenv("ADDREPRO_TEST_VAR", "xyz")
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "program": "train.py",
                "method": "grid",
                "parameters": {
                    "b": {"values": [True, False]},
                    "a": {"value": 0.5},
                    "c": {"distribution": "int_uniform", "min": 1, "max": 2},
                },
                "command": [
                    "${env}",
                    "${interpreter}",
                    "${program}",
                    "--tag=${envvar:ADDREPRO_TEST_VAR}",
                    "${args}",
                    "${args_no_boolean_flags}",
                    "${args_json}",
                    "${nonsense}",
                ],
            }
        )
    )
    assert grid_runs(load_sweep(path)) == [{"a": 0.5, "b": b, "c": c} for b in (True, False) for c in (1, 2)]
    commands = expand_commands(path)
    assert commands[0] == [
        "/usr/bin/env",
        "python",
        "train.py",
        "--tag=xyz",
        "--a=0.5",
        "--b=True",
        "--c=1",
        "--a=0.5",
        "--b",
        "--c=1",
        '{"a": 0.5, "b": true, "c": 1}',
    ]
    assert commands[2][4:10] == ["--a=0.5", "--b=False", "--c=1", "--a=0.5", "--c=1", '{"a": 0.5, "b": false, "c": 1}']
    assert command_args({"x.y": 3})["args_no_hyphens"] == ["x.y=3"]
    # Default command, nested parameters.
    path.write_text(
        yaml.safe_dump(
            {"program": "p.py", "method": "grid", "parameters": {"opt": {"parameters": {"lr": {"values": [1, 2]}}}}}
        )
    )
    assert expand_commands(path)[1] == ["/usr/bin/env", "python", "p.py", "--opt={'lr': 2}"]


def test_wandb_sweep_file_expands_to_hydra_commands_and_they_run(tmp_path):
    commands = expand_commands(REPO / "sweeps" / "wandb" / "width_x_weight_decay.yaml")
    assert len(commands) == 16
    tail = [
        "logger.wandb.mode=online",
        "logger.wandb.group=wandb-sweep-${oc.env:WANDB_SWEEP_ID,local}",
        "hydra.run.dir=outputs/wandb_sweeps/${oc.env:WANDB_SWEEP_ID,local}/${now:%Y-%m-%d_%H-%M-%S}_${uid:}",
    ]
    assert commands[0] == [
        "/usr/bin/env",
        "python",
        "-m",
        "addrepro.train",
        "model.width=64",
        "optimizer.weight_decay=0",
        *tail,
    ]
    assert commands[1][4:6] == ["model.width=64", "optimizer.weight_decay=0.1"]
    assert commands[-1][4:6] == ["model.width=512", "optimizer.weight_decay=1"]
    # Run the two jobs of the MLP on/off sweep as agents would (offline: WANDB_MODE wins over the command's
    # logger.wandb.mode=online): the first through the CLI's --run, the second by hand at the same time.
    mlp = REPO / "sweeps" / "wandb" / "mlp.yaml"
    extra = ["trainer.max_steps=5", "logger.wandb.project=addrepro-test", *TINY]
    env = cli_env()
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", WANDB_RUN_ID="byhand01")
    second = subprocess.Popen(
        expand_commands(mlp)[1] + extra,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "addrepro.wandb_sweep", str(mlp), "--run", "1", "--", *extra],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert second.wait(timeout=300) == 0, second.stderr.read()[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.splitlines()
    assert printed[1].endswith(
        "model.attn_only=True logger.wandb.mode=online "
        "'logger.wandb.group=wandb-sweep-${oc.env:WANDB_SWEEP_ID,local}' "
        "'hydra.run.dir=outputs/wandb_sweeps/${oc.env:WANDB_SWEEP_ID,local}/"
        "${now:%Y-%m-%d_%H-%M-%S}_${uid:}'"
    )
    assert printed[2].startswith("[0] /usr/bin/env python -m addrepro.train model.attn_only=False")
    folder = tmp_path / "outputs" / "wandb_sweeps" / "local"
    jobs = sorted(folder.iterdir())
    assert len(jobs) == 2
    runs = sorted((read_run(job) for job in jobs), key=lambda r: r.name)
    # A single run is named from all its overrides: the agent's arguments, then the settings appended here.
    assert [r.name.split(",")[0] for r in runs] == ["model.attn_only=False", "model.attn_only=True"]
    assert {r.group for r in runs} == {"wandb-sweep-local"}
    assert [r.config["model"]["attn_only"] for r in runs] == [False, True]
    assert all(r.exit_code == 0 and r.project == "addrepro-test" for r in runs)
    assert runs[1].run_id == "byhand01"  # W&B takes the run id the agent hands over in WANDB_RUN_ID
    # The folder of a W&B sweep's jobs is a sweep folder for the report too.
    assert report.main([str(folder)]) == 0
    assert json.loads((folder / "sweep_shelves.json").read_text())["swept_keys"] == ["model.attn_only"]
    assert Path(folder / "sweep_place_loss.png").stat().st_size > 10_000


def test_a_job_whose_process_is_gone_reads_as_killed(tmp_path):
    from addrepro.rundir.status import read_statuses, write_status

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a real process that has ended: its pid no longer exists (reaped)
    jobs = {"0": os.getpid(), "1": gone.pid, "2": gone.pid}
    for name in jobs:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        write_status(tmp_path / name, "running")
    for name, pid in jobs.items():  # as if each job had been run by that process
        status = json.loads((tmp_path / name / "status.json").read_text())
        status["pid"] = pid
        if name == "2":
            status["host"] = "another-machine"  # a SLURM job elsewhere: cannot be checked here
        (tmp_path / name / "status.json").write_text(json.dumps(status))
    statuses = read_statuses(tmp_path)
    assert [statuses[j]["status"] for j in ("0", "1", "2")] == ["running", "killed", "running"]
    assert f"process {gone.pid} ended" in statuses["1"]["message"]


def test_job_folder_names_are_safe_and_short():
    from addrepro.training.config import MAX_FOLDER_NAME, job_folder

    assert job_folder(3, "model.width=256,seed=1") == "3_model.width=256,seed=1"
    assert job_folder(0, "") == "0"  # nothing swept: the number alone
    assert job_folder(2, "reference=curves/a.json") == "2_reference=curves-a.json"  # never a subfolder
    long = job_folder(7, ",".join(f"key{i}=value{i}" for i in range(40)))
    assert len(long) <= MAX_FOLDER_NAME and long.startswith("7_key0=value0")
    assert long != job_folder(7, ",".join(f"key{i}=value{i}" for i in range(41)))  # the hash tells them apart


def test_only_swept_keys_name_the_folders():
    from addrepro.training.config import sweep_folder_overrides

    (override,) = sweep_folder_overrides(
        ["-m", "data.n_digits=3", "seed=0,1", "+sweep=width", "hydra/launcher=ensemble", "~model.foo", "lr=range(1,3)"]
    )
    assert override == "hydra.job.config.override_dirname.exclude_keys=['data.n_digits','model.foo','resume','sweep']"
    # the user's own choice stands
    assert sweep_folder_overrides(["-m", "seed=0,1", "hydra.job.config.override_dirname.exclude_keys=[seed]"]) == []


SWEEP_FILE_CASES = [
    ("parameters: {seed: {min: 5, max: 1}}", "parameter seed: int_uniform needs min <= max, got min 5 and max 1"),
    ("parameters: [1, 2]", "parameters: expected a mapping of names to specs, got [1, 2]"),
    ("parameters: {model.width: 128}", "parameter model.width: expected a mapping, got 128"),
    ("parameters: {model.width: {values: 128}}", "parameter model.width: values must be a non-empty list, got 128"),
    ("parameters: {model.width: {values: []}}", "parameter model.width: values must be a non-empty list, got []"),
    (
        "parameters: {lr: {distribution: q_uniform, min: 0, max: 1, q: 0}}",
        "parameter lr: q_uniform needs numbers min, max (and q > 0)",
    ),
    (
        "parameters: {model: {parameters: [width]}}",
        "parameter model: parameters: expected a mapping of names to specs, got ['width']",
    ),
    ("command: 5\nparameters: {seed: {values: [1]}}", "command: expected a list of words like ['${env}'"),
    ("command: [[python], x]\nparameters: {seed: {values: [1]}}", "command: expected a list of words"),
    (
        "parameters: {seed: {min: 0, max: 1000000000000}}",
        "parameter seed: int_uniform from 0 to 1000000000000 has more",
    ),
    (
        "parameters: {lr: {distribution: q_uniform, min: 0, max: 1, q: 1.0e-12}}",
        "parameter lr: q_uniform from 0 to 1 has more than 100000 values",
    ),
    ("parameters: {lr: {distribution: q_uniform, min: 0, max: .inf}}", "parameter lr: q_uniform from 0 to inf has"),
    (
        "parameters: {a: {min: 0, max: 999}, b: {min: 0, max: 999}}",
        "the grid has 1000000 runs (at most 100000): 1000 x",
    ),
]


def test_a_sweep_file_that_expands_enormously_or_is_not_text_is_one_line(tmp_path, capsys):
    from addrepro import wandb_sweep

    # Nine levels of nine aliases: 9^9 words once expanded, from a file of 30 lines.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join([*lines, "method: grid", "parameters: {seed: {values: [1]}}", "command: *a8"]) + "\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    for path, message in [(bomb, "expands to over 100000 values"), (binary, "not a text file")]:
        assert wandb_sweep.main([str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"addrepro.wandb_sweep: {path}: " + err[0].split(f"{path}: ", 1)[1]] and message in err[0], err


@pytest.mark.parametrize("body,message", SWEEP_FILE_CASES, ids=[c[0] for c in SWEEP_FILE_CASES])
def test_a_sweep_file_of_the_wrong_shape_is_one_line(tmp_path, capsys, body, message):
    from addrepro import wandb_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(f"program: addrepro.train\nmethod: grid\n{body}\n")
    assert wandb_sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"addrepro.wandb_sweep: {message}"), err


def test_a_sweep_program_or_file_that_cannot_be_one_is_one_line(tmp_path, capsys):
    from addrepro import wandb_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("program: [a]\nmethod: grid\nparameters: {seed: {values: [1]}}\n")
    assert wandb_sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.strip() == "addrepro.wandb_sweep: program: expected a file or module name, got ['a']"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block for ever
    assert wandb_sweep.main([str(fifo)]) == 2
    assert capsys.readouterr().err.strip() == f"addrepro.wandb_sweep: {fifo}: not a regular file"
    with pytest.raises(SystemExit) as exit_:
        wandb_sweep.main([str(path), "--run", "-2"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].endswith("--run: expected a number of commands >= 0, got -2")
    )
