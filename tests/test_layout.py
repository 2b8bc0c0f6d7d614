"""The shape of the code: stages import one way, the schema is the one source of defaults, the
LightningModule writes no files, and the configs are found from any folder."""

import dataclasses
import shutil
import subprocess
import sys

import torch
from conftest import REPO, fit_bare
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import addrepro.train  # noqa: F401 - registers the config schema and the ${uid:} resolver
from addrepro.model.transformer import ModelConfig
from addrepro.task.spec import TaskSpec
from addrepro.training.config import GROUPS, ModelSchema, RunConfig, architecture, config_dir, task_spec, typed
from addrepro.training.module import AdditionModule
from addrepro.training.recorder import Member

LINT = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def lint(root) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([*LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layering_contracts_hold_and_fail_when_a_lower_stage_imports_a_higher_one(tmp_path):
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "pyproject.toml", copy)
    shutil.copytree(REPO / "addrepro", copy / "addrepro", ignore=shutil.ignore_patterns("__pycache__"))
    kept = lint(copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    spec = copy / "addrepro" / "task" / "spec.py"
    spec.write_text(spec.read_text() + "\nfrom addrepro.training import config  # noqa\n")
    broken = lint(copy)
    assert broken.returncode != 0
    assert "addrepro.task is not allowed to import addrepro.training" in broken.stdout


def test_the_schema_is_the_only_source_of_defaults():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train")
    plain = OmegaConf.to_container(cfg, resolve=False)
    for group, (_, schema) in GROUPS.items():
        assert plain[group] == dataclasses.asdict(schema()), group
    assert {k: plain[k] for k in ("seed", "resume", "reference")} == dataclasses.asdict(RunConfig())
    # No YAML file restates a group's defaults: the default options live in the ConfigStore only.
    for group, (name, _) in GROUPS.items():
        assert not (config_dir() / group / f"{name}.yaml").exists(), f"conf/{group}/{name}.yaml"


def test_model_config_defaults_agree_with_the_schema():
    spec = TaskSpec()
    built = architecture(ModelSchema(), spec)
    bare = ModelConfig(d_vocab=spec.d_vocab, d_vocab_out=spec.base, n_ctx=spec.seq_len - 1)
    assert built == bare


def test_the_lightning_module_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data.n_digits=2",
                "model.width=16",
                "trainer.max_steps=30",
                "trainer.ckpt_every_n_steps=10",
                "trainer.log_every_n_steps=5",
                "trainer.val_every_n_steps=10",
                "metrics.every_n_steps=10",
                "metrics.carry_set_size=4",
                "metrics.chain_set_size=2",
                "data.val_size=32",
            ],
        )
    spec = task_spec(cfg.data)
    job = tmp_path / "job"
    job.mkdir()
    member = Member(seed=0, data_seed=0, lr=1e-3, weight_decay=0.1, job_dir=job)
    module = AdditionModule(spec, architecture(cfg.model, spec), [member], typed(cfg))
    fit_bare(module, max_steps=30, root=job)
    assert module.opt.step_count == 30 and any("val/loss" in r for r in module.recorder.history)
    assert torch.isfinite(torch.tensor([r["train/loss"] for r in module.recorder.history if "train/loss" in r])).all()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [job.relative_to(tmp_path)]


def readme_layout() -> dict[str, set[str]]:
    """The modules the layout page lists, by package ('' for addrepro/ itself)."""
    text = (REPO / "docs" / "layout.md").read_text().split("# Layout", 1)[1]
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    listed: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        words = line.split()
        if indent == 0:
            package = "" if words and words[0] == "addrepro/" else None
        elif package is not None and indent == 2 and words[0].endswith("/"):
            package = words[0].rstrip("/")
        elif package is not None and indent == 2:  # modules of addrepro/ itself
            listed.setdefault("", set()).update(w for w in words if w.endswith(".py"))
            continue
        if package is not None and indent == 4:
            listed.setdefault(package, set()).update(w for w in words if w.endswith(".py"))
    return listed


def test_the_layout_page_lists_every_module_where_it_is():
    root = REPO / "addrepro"
    actual: dict[str, set[str]] = {}
    for p in root.rglob("*.py"):
        if p.name != "__init__.py" and "__pycache__" not in p.parts:
            actual.setdefault("" if p.parent == root else p.parent.name, set()).add(p.name)
    assert readme_layout() == actual


def test_a_bad_value_is_refused_before_torch_loads(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "addrepro.train", "data.base=40", "hydra.run.dir=job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "addrepro.training.config" in imported and "torch" not in imported
    message = "addrepro: config error: data.base=40 is invalid: must be an integer in 2..36"
    assert proc.stderr.splitlines()[-1] == message
