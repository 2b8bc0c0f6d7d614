"""The run config: one schema per config group, with its defaults and what each key allows.

Every group of ``python -m addrepro.train`` (``data``, ``model``, ``optimizer``, ``trainer``,
``logger``, ``metrics``) is a dataclass below; its fields are the group's keys, their defaults and
their checks. The dataclasses are registered in Hydra's ConfigStore as each group's default option
(``data: addition``, ``model: transformer`` …), so ``conf/`` holds only alternatives
(``logger=csv``) and presets (``experiment=…``), and no default is written twice.

The nodes are stored untyped: a wrong type on the command line (``optimizer.lr=abc``) then reaches
``validate``, which names the key, the value and what is allowed in one line, instead of stopping in
Hydra's multi-line merge error. ``typed(cfg)`` turns a validated config into these dataclasses.

Config keys are the names a researcher sweeps (``model.width``, ``model.depth``); the model code uses
TransformerLens names. The one mapping between them is ``architecture``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import secrets
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from addrepro.model.config import ACTIVATIONS, INITS, NORMALIZATIONS, ModelConfig
from addrepro.task.spec import ORDERS, SAMPLERS, TASKS, SamplerSpec, TaskSpec

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
WANDB_MODES = ("offline", "online", "disabled")
CKPT_SCHEDULES = ("linear", "log")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision
PRECISIONS = (32, "bf16-mixed")  # Lightning's names


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str, given: str | None = None):
        # ``given``: the override as typed when it names no value (``~seed``, a deletion)
        super().__init__(f"{given or f'{key}={value!r}'} is invalid: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


# -- checks: each raises ConfigError(key, value, allowed) --------------------------------------
Check = Callable[[str, Any], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(lo: int | None = None, hi: int | None = None, null: bool = False) -> Check:
    def check(key: str, value: Any) -> None:
        if value is None and null:
            return
        if _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi):
            return
        if lo is not None and hi is not None:
            allowed = f"must be an integer in {lo}..{hi}"
        elif lo is not None:
            allowed = f"must be an integer >= {lo}"
        else:
            allowed = "must be an integer"
        raise ConfigError(key, value, allowed + (" or null" if null else ""))

    return check


def number(lo: float, strict: bool = False) -> Check:
    def check(key: str, value: Any) -> None:
        if not (_is_number(value) and math.isfinite(value) and (value > lo if strict else value >= lo)):
            raise ConfigError(key, value, f"must be a finite number {'>' if strict else '>='} {lo}")

    return check


def fraction(key: str, value: Any) -> None:
    if not (_is_number(value) and 0 <= value <= 1):
        raise ConfigError(key, value, "must be a number in [0, 1]")


def resume_value(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(key, value, "must be a job folder, a checkpoint file or auto (leave it out to start afresh)")


def choice(choices: tuple) -> Check:
    def check(key: str, value: Any) -> None:
        # Compare types too: 1 == True and 0 == False would otherwise pass for a boolean switch.
        if not any(value == c and type(value) is type(c) for c in choices):
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(key, value, f"must be one of {shown}")

    return check


BOOLEAN = choice((True, False))


def text(null: bool = False, name: bool = False) -> Check:
    """A string (``name``: a W&B project or entity name, which cannot hold a slash or be empty)."""

    def check(key: str, value: Any) -> None:
        if not (isinstance(value, str) or (null and value is None)):
            raise ConfigError(key, value, "must be a string" + (" or null" if null else ""))
        if name and value is not None and (not value.strip() or any(c in value for c in "/\\#?%:")):
            raise ConfigError(key, value, "must be a W&B name: not empty, without / \\ # ? % :")

    return check


# The published curves shipped in addrepro/reports/reference (read as data files: no import).
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reports" / "reference"


def reference_name(key: str, value: Any) -> None:
    text(null=True)(key, value)
    shipped = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
    if value is not None and value not in shipped:
        raise ConfigError(key, value, f"must be null or a published curve shipped with addrepro: {', '.join(shipped)}")


def betas(key: str, value: Any) -> None:
    values = list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else None
    if values is None or len(values) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in values):
        shown = values if values is not None else value
        raise ConfigError(key, shown, "must be two numbers in [0, 1)")


def strings(key: str, value: Any) -> None:
    values = list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else None
    if values is None or not all(isinstance(v, str) for v in values):
        raise ConfigError(key, value, "must be a list of strings")


def step_list(key: str, value: Any) -> None:
    values = list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else None
    if values is None or len(values) > 10_000 or not all(_is_int(v) and 0 <= v < 2**62 for v in values):
        raise ConfigError(key, value, "must be a list of steps (integers >= 0), at most 10000 of them, e.g. [150, 300]")


def one_device(key: str, value: Any) -> None:
    values = list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else None
    if value is None or (values is not None and len(values) == 1 and _is_int(values[0]) and values[0] >= 0):
        return
    shown = values if values is not None else value
    raise ConfigError(key, shown, "must be null (the launcher's choice) or one GPU index in a list, e.g. [1]")


MAX_THREADS = 1024  # far above any machine's cores; torch's thread pool crashes at some point beyond


def threads_option(key: str, value: Any) -> None:
    if value is None or value == "auto" or (_is_int(value) and 1 <= value <= MAX_THREADS):
        return
    raise ConfigError(key, value, f"must be auto, null (torch's default) or an integer in 1..{MAX_THREADS}")


def tensorboard_switch(key: str, value: Any) -> None:
    """A boolean; ``true`` needs a TensorBoard writer installed (an optional extra)."""
    BOOLEAN(key, value)
    if value and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError(key, value, 'needs the tensorboard package: pip install "addrepro[tensorboard]"')


def option(default: Any, check: Check, factory: bool = False) -> Any:
    """A config key: its default and the check of its value."""
    if factory:
        return field(default_factory=lambda: list(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


# -- the schema ------------------------------------------------------------------------------
# The optimiser counts steps in float32 on the device (no host sync): exact up to 2^24.
MAX_STEPS = 2**24
MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds (negative ones too)


@dataclass
class DataConfig:
    """``data``: the task and the data stream."""

    n_digits: int = option(5, integer(1))  # operand digits n; the answer has n + 1 digits
    base: int = option(10, integer(2, 36))
    order: str = option("msb", choice(ORDERS))  # msb: carry-out digit first; lsb: units digit first
    task: str = option("add", choice(TASKS))  # add: with carries; digitwise: (a_j + b_j) mod base
    batch_size: int | None = option(
        64, integer(1, 1_048_576, null=True)
    )  # finite data: null (or >= train_size) = full batch
    seed: Any = option(
        "${seed}", integer(-MAX_SEED - 1, MAX_SEED)
    )  # data stream seed; set apart from `seed` to vary data and init apart
    train_size: int | None = option(
        None, integer(1, 100_000_000, null=True)
    )  # null: infinite data; N: a fixed set of N pairs
    val_size: int = option(2048, integer(1, 1_000_000))  # held-out pairs (disjoint from a finite training set)
    val_seed: int = option(1000003, integer(-MAX_SEED - 1, MAX_SEED))  # seed of the validation set for infinite data
    # The training distribution (addrepro.task.samplers); held-out sets and metrics stay uniform.
    # uniform | carry_enriched | carry_balanced | curriculum
    sampler: str = option(SamplerSpec.name, choice(SAMPLERS))
    # carry_enriched: the share of batches enriched, and in them of digit positions made to sum base-1
    enrich_batches: float = option(SamplerSpec.enrich_batches, fraction)
    enrich_digits: float = option(SamplerSpec.enrich_digits, fraction)
    # curriculum: batches before the next carry class joins
    curriculum_steps: int = option(SamplerSpec.curriculum_steps, integer(1))


@dataclass
class ModelSchema:
    """``model``: the transformer (see ``architecture`` for the TransformerLens names)."""

    # Limits far above these tiny models, below what would exhaust memory before a step runs.
    width: int = option(128, integer(1, 16384))  # d_model
    depth: int = option(1, integer(1, 64))  # n_layers
    n_heads: int = option(4, integer(1, 256))
    d_head: int | None = option(None, integer(1, 16384, null=True))  # null: width // n_heads
    d_mlp: int | None = option(None, integer(1, 65536, null=True))  # null: 4 * width
    act_fn: str = option("relu", choice(ACTIVATIONS))
    normalization: str | None = option(None, choice(NORMALIZATIONS))  # null | LN
    attn_only: bool = option(False, BOOLEAN)  # true: no MLP
    init: str = option("nanda", choice(INITS))  # nanda: W/sqrt(fan) as Nanda's code; normal: N(0, init_std)
    init_std: float = option(0.02, number(0.0, strict=True))


@dataclass
class OptimizerConfig:
    """``optimizer``: AdamW with a linear warmup."""

    lr: float = option(1.0e-3, number(0.0, strict=True))
    weight_decay: float = option(0.1, number(0.0))
    betas: list = option([0.9, 0.98], betas, factory=True)
    eps: float = option(1.0e-8, number(0.0, strict=True))
    warmup_steps: int = option(10, integer(0, MAX_STEPS))  # linear warmup from 0 (step 0 has lr 0)


@dataclass
class TrainerConfig:
    """``trainer``: the training loop, evaluation cadence and checkpoints."""

    max_steps: int = option(3000, integer(1, MAX_STEPS))
    # Optimiser steps per Lightning step: amortises the framework's per-step overhead.
    steps_per_call: int = option(10, integer(1))
    accelerator: str = option("auto", choice(ACCELERATORS))
    # One device per job. null: GPU (job number mod visible GPUs) in a sweep, the first GPU otherwise.
    devices: list | None = option(None, one_device)
    # float32 matmuls: highest = full float32; high = TF32 on tensor cores (NVIDIA Ampere and later).
    matmul_precision: str = option("highest", choice(MATMUL_PRECISIONS))
    precision: Any = option(32, choice(PRECISIONS))  # bf16-mixed: autocast to bfloat16, float32 weights
    # torch threads of this job. auto: one for a model this small (see training/devices.py), else the
    # cores (shared out under hydra/launcher=parallel); null: torch's default; N: exactly N.
    threads: Any = option("auto", threads_option)
    # torch.compile forward+backward (on CUDA replayed as CUDA graphs); no gain measured on CPU.
    compile: bool = option(False, BOOLEAN)
    # The whole step (batch, forward, backward, metrics, AdamW) as one CUDA graph replay; CUDA only.
    cuda_graph: bool = option(False, BOOLEAN)
    log_every_n_steps: int = option(10, integer(1))  # train metrics every N optimiser steps
    val_every_n_steps: int = option(100, integer(1))  # held-out metrics every N steps (and at the end)
    ckpt_every_n_steps: int = option(1000, integer(1))  # resumable checkpoints; last.ckpt is always written
    # log: also weights-only checkpoints at step 0 and ckpt_log_count log-spaced steps (dense early)
    ckpt_schedule: str = option("log", choice(CKPT_SCHEDULES))
    ckpt_log_count: int = option(20, integer(1, 10_000))
    # Weights-only checkpoints at exactly these steps too (where an analysis needs a shelf), e.g. [150, 300]
    ckpt_steps: list = option([], step_list, factory=True)
    progress_bar: bool = option(True, BOOLEAN)
    plots: bool = option(True, BOOLEAN)  # PNG plots in the job folder at the end


@dataclass
class WandbConfig:
    enabled: bool = option(True, BOOLEAN)
    mode: str = option("offline", choice(WANDB_MODES))  # offline needs no account or network
    project: str = option("addrepro", text(name=True))
    entity: str | None = option(None, text(null=True, name=True))
    group: str | None = option(None, text(null=True))  # null: the sweep folder's name (shared by a multirun)
    name: str | None = option(None, text(null=True))  # null: made from the job's overrides
    tags: list = option([], strings, factory=True)
    init_timeout: float = option(30, number(0.0, strict=True))  # seconds before online falls back to offline


@dataclass
class LoggerConfig:
    """``logger``: W&B (offline by default), the CSV file ``<job>/csv/metrics.csv`` and TensorBoard events
    in ``<job>/tensorboard`` (off by default; ``logger=tensorboard`` or ``logger=many``)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: bool = option(True, BOOLEAN)
    tensorboard: bool = option(False, tensorboard_switch)


@dataclass
class MetricsConfig:
    """``metrics``: shelf-science metrics, computed on the device every ``every_n_steps`` and at the end."""

    every_n_steps: int = option(100, integer(1))
    # At least 2 per set: each logs its loss's standard error over the set.
    carry_set_size: int = option(128, integer(2, 100_000))  # sequences per carry-in-0 / carry-in-1 set, per place
    chain_set_size: int = option(64, integer(2, 100_000))  # sequences per (place, carry-chain length) set
    class_set_size: int = option(128, integer(1, 100_000))  # sequences per carry-complexity class S0..Sn
    spike_window: int = option(
        50, integer(1, 100_000)
    )  # a spike: loss > spike_factor x the trend of the last window logs
    spike_factor: float = option(3.0, number(1.0, strict=True))
    spike_min_excess: float = option(0.05, number(0.0))  # ... and above it by more than this (nats)
    # ... or above it this many times (and above every loss of the window): a jump from a near-zero loss
    spike_ratio_alone: float = option(30.0, number(1.0, strict=True))
    # Attention mass of every head on own/lower operands and carry-probe accuracy (metrics.mechanism).
    mechanism: bool = option(True, BOOLEAN)


@dataclass
class RunConfig:
    """The keys of ``train.yaml`` itself."""

    seed: int = option(0, integer(-MAX_SEED - 1, MAX_SEED))  # initialisation seed of the model
    resume: str | None = option(None, resume_value)  # a job folder, a checkpoint, or auto
    reference: str | None = option(None, reference_name)  # a published curve in addrepro/reports/reference


GROUPS: dict[str, tuple[str, type]] = {
    "data": ("addition", DataConfig),
    "model": ("transformer", ModelSchema),
    "optimizer": ("adamw", OptimizerConfig),
    "trainer": ("default", TrainerConfig),
    "logger": ("wandb", LoggerConfig),
    "metrics": ("default", MetricsConfig),
}


@dataclass
class TrainConfig:
    """A validated run config as typed objects."""

    run: RunConfig
    data: DataConfig
    model: ModelSchema
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    metrics: MetricsConfig


def register() -> None:
    """Put the schema's defaults in Hydra's ConfigStore (as plain, untyped nodes; see the module doc)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=dataclasses.asdict(RunConfig()))
    for group, (name, schema) in GROUPS.items():
        cs.store(group=group, name=name, node=dataclasses.asdict(schema()))


register()

# One random id per process: a run folder never collides with one started in the same second,
# and every job of one multirun (one process) resolves the same sweep folder (``${uid:}`` in conf/hydra).
PROCESS_ID = secrets.token_hex(3)
if not OmegaConf.has_resolver("uid"):
    OmegaConf.register_new_resolver("uid", lambda: PROCESS_ID)

MAX_FOLDER_NAME = 120  # well inside every file system's 255-byte limit, and still readable in a listing


def job_folder(num: Any, swept: Any) -> str:
    """A sweep job's folder name: its number, which keeps the jobs in order, then the values the sweep
    gives it (``3_model.width=256,seed=1``; Hydra's ``override_dirname`` without the keys every job
    shares, see ``sweep_folder_overrides``). A ``/`` in a value becomes ``-``, never a subfolder; a
    name too long to read ends in a hash of the whole."""
    swept = str(swept or "").replace("/", "-")
    name = f"{num}_{swept}" if swept else str(num)
    if len(name) > MAX_FOLDER_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_FOLDER_NAME - 10]}…{digest}"
    return name


if not OmegaConf.has_resolver("job_folder"):
    OmegaConf.register_new_resolver("job_folder", job_folder)


def sweep_folder_overrides(overrides: list[str]) -> list[str]:
    """For a multirun, the Hydra override that leaves out of every job's folder name the keys the
    command gives one value (and ``resume``): only what the sweep varies names the folders."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:  # noqa: BLE001 - a malformed override is Hydra's to report, in its own words
        return []
    fixed = {"resume"} | {o.key_or_group for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()}
    if any(o.key_or_group == "hydra.job.config.override_dirname.exclude_keys" for o in parsed):
        return []  # the user chose
    quoted = ",".join(f"'{key}'" for key in sorted(fixed))
    return [f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]"]


def config_dir() -> Path:
    """The ``conf/`` folder: inside the installed package (wheel), or at the top of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    inside = package / "conf"
    return inside if inside.is_dir() else package.parent / "conf"


# -- validation ------------------------------------------------------------------------------
def check_fields(schema: type, node: Any, prefix: str, others: tuple[str, ...] = ()) -> None:
    """Run every field's check on ``node`` (a mapping); nested dataclasses are checked recursively. A key
    the schema does not have (nor ``others``) is refused, naming the nearest ones it has."""
    names = [f.name for f in dataclasses.fields(schema)] + list(others)
    for key in node:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(full, node[key], unknown_key(full, [f"{prefix}.{n}" if prefix else n for n in names]))
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        try:
            value = node[f.name]
        except OmegaConfBaseException as e:  # ${model.width} in itself, ${oc.env:UNSET}
            raw = OmegaConf.to_container(node, resolve=False)[f.name] if OmegaConf.is_dict(node) else None
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(key, CommandLineText(str(raw)), f"cannot be resolved: {short(reason, 120)}") from None
        if "check" in f.metadata:
            f.metadata["check"](key, value)
        else:  # a nested group (logger.wandb)
            check_fields(f.default_factory, value, key)


# Top-level keys that are not in ``RunConfig``: the groups, and Lightning callbacks from the config.
TOP_LEVEL = (*GROUPS, "callbacks")


def unknown_key(key: str, known: list[str]) -> str:
    """What ``allowed`` says of a key that does not exist: the nearest keys that do."""
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return "is not a config key" + (f"; did you mean {', '.join(near)}?" if near else "")


def all_keys() -> list[str]:
    """Every key of the training config, dotted (``model.width``, ``logger.wandb.mode``)."""

    def keys(schema: type, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(schema):
            if "check" in f.metadata:
                out.append(prefix + f.name)
            else:
                out += keys(f.default_factory, f"{prefix}{f.name}.")
        return out

    return keys(RunConfig, "") + [k for group, (_, schema) in GROUPS.items() for k in keys(schema, f"{group}.")]


def group_options(group: str) -> list[str]:
    """The options of a config group (``logger``: csv, many, wandb, …); ``[]`` for anything else."""
    if group not in GROUPS and group != "experiment":
        return []
    folder = config_dir() / group
    names = {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    if group in GROUPS:
        names.add(GROUPS[group][0])
    return sorted(names)


GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic"
# ${key} or ${resolver:...}; nested ones are checked from inside
INTERPOLATION = re.compile(r"\$\{([^${}:]*)(:?)")
ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:([^,${}]+)\}")  # an environment variable without a default


def check_override_grammar(overrides: list[str], keys: list[str] | None = None) -> None:
    """Overrides Hydra cannot read (``seed=1)``), config groups given options that do not exist
    (``callbacks=[nosuch]``, ``logger=csv,nosuch``) and ``${...}`` naming no key or resolver: one line
    each, before Hydra makes a folder (it would make it, then print a stack of lines). ``keys``: the
    config's keys when it is not a training config (``analyze``, ``theory``: no groups there)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415 - antlr grammar
    from hydra.errors import HydraException  # noqa: PLC0415

    parser = OverridesParser.create()
    chosen_callbacks = {
        name
        for word in overrides
        if word.partition("=")[0].lstrip("+") == "callbacks"
        for name in word.partition("=")[2].strip("[]").split(",")
    }
    groups = keys is None
    keys = [*all_keys(), *TOP_LEVEL] if keys is None else keys
    known = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)}
    for word in overrides:
        if word.startswith("-") or ("=" not in word and not word.startswith("~")):
            continue  # Hydra's own flags (-m, --cfg job, -cn name)
        try:
            (parsed,) = parser.parse_overrides([word])
            choices = list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else [parsed.value()]
            # the same, as values: a swept list of callbacks is lists, not their text
            values = list(parsed.sweep_iterator()) if parsed.is_sweep_override() else choices
        except HydraException as e:
            if "ConfigLoader is not set" in str(e):  # glob(...): only Hydra's loader can expand it
                continue
            lines = [line.strip() for line in str(e).splitlines() if line.strip() and "hydra.cc" not in line]
            lines = [line for line in lines if set(line) != {"^"} and not line.startswith("Error parsing")]
            reason = lines[-1] if lines else "not an override (key=value)"
            raise ConfigError(
                word, None, f"Hydra cannot read it: {reason} (grammar: {GRAMMAR})", given=short(word)
            ) from None
        except ValueError as e:  # e.g. an integer of thousands of digits
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                word, None, f"Hydra cannot read it: {reason} (grammar: {GRAMMAR})", given=short(word)
            ) from None
        key = parsed.key_or_group.replace("/", ".")
        if key in INSIDE_KEYS and not parsed.is_delete():
            for choice in choices:
                parts = Path(str(choice)).parts
                if Path(str(choice)).is_absolute() or ".." in parts:
                    raise ConfigError(
                        key,
                        CommandLineText(str(choice)),
                        f"must name a folder {INSIDE_KEYS[key]} (no .., not absolute)",
                    )
        if key == "hydra.launcher.n_jobs" and any(not _is_int(c) or c == 0 for c in choices):
            raise ConfigError(key, choices[0], "must be an integer other than 0 (jobs at once; -1: one per core)")
        if parsed.is_delete() or key.startswith("hydra"):
            continue
        text = word.partition("=")[2]
        for name, colon in INTERPOLATION.findall(text):
            if colon and not OmegaConf.has_resolver(name):
                raise ConfigError(key, CommandLineText(text), f"${{{name}:...}} names no resolver")
            if not colon and name.lstrip(".") not in known and not name.startswith("hydra"):
                raise ConfigError(key, CommandLineText(text), f"${{{name}}} names no key of the config")
            if not colon and name.lstrip(".") == key:
                raise ConfigError(key, CommandLineText(text), f"${{{name}}} refers to the key itself")
        for var in ENV_INTERPOLATION.findall(text):  # ${oc.env:NAME} without a default needs NAME set
            if var.strip() not in os.environ:
                raise ConfigError(
                    key, CommandLineText(text), f"the environment variable {var.strip()} is not set (or give a default)"
                )
        if not groups:
            continue
        options = group_options(key) if key != "callbacks" else callback_options()
        if key == "callbacks" and None in choices:
            raise ConfigError(
                key, None, f"choose a list of callbacks: callbacks=[] for none, or of {', '.join(options)}"
            )
        name = key.split(".")[1] if key.startswith("callbacks.") else None
        if name is not None and not parsed.is_add() and not parsed.is_force_add() and name not in chosen_callbacks:
            known_ones = callback_options()
            raise ConfigError(
                key,
                CommandLineText(word.partition("=")[2]),
                f"choose it first: callbacks=[{name}]"
                if name in known_ones
                else f"{name} is not a callback of conf/callbacks ({', '.join(known_ones)}); add your own with "
                f"+callbacks.{name}._target_=<a Lightning Callback class>",
            )
        if name is not None and name in chosen_callbacks and not parsed.is_add() and not parsed.is_force_add():
            arg = key.split(".")[2] if key.count(".") >= 2 else None
            node = OmegaConf.load(config_dir() / "callbacks" / f"{name}.yaml").get(name) or {}
            if arg is not None and arg not in node:
                raise ConfigError(
                    key,
                    CommandLineText(word.partition("=")[2]),
                    f"conf/callbacks/{name}.yaml does not set {arg} ({', '.join(node)}); give another argument "
                    f"of its class with +{key}=...",
                )
        if key == "experiment" and any(isinstance(c, list) for c in values):  # presets would overwrite each other
            raise ConfigError(key, CommandLineText(text), "choose one preset (experiment=<name>; -m sweeps them)")
        for choice in values:
            names = choice if isinstance(choice, list) else [choice]
            bad = next((n for n in names if options and isinstance(n, str) and n not in options), None)
            if bad is not None and not (len(names) == 1 and bad in ("null", "~", "")):
                raise ConfigError(
                    key, CommandLineText(bad), f"is not an option of {key} (options: {', '.join(options)})"
                )


# What Hydra reads unquoted in a path; anything else (the ``=`` and ``,`` of a sweep job's folder name,
# ``3_model.width=256,seed=1``) would be read as grammar.
PLAIN_PATH = re.compile(r"[\w./~+@%:-]*")


def quote_path_overrides(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """The command line with the values of path keys (``resume``, ``checkpoint``) quoted for Hydra
    where they hold characters of its grammar, so that the folders addrepro names itself can be given
    as they are: ``checkpoint=sweep/1_seed=1`` is ``checkpoint='sweep/1_seed=1'``. Values already
    quoted, plain, or holding both kinds of quote are left as they are."""
    out = []
    for word in overrides:
        key, eq, value = word.partition("=")
        if eq and key.lstrip("+") in keys and not PLAIN_PATH.fullmatch(value) and value[:1] not in "'\"":
            quote = "'" if "'" not in value else '"' if '"' not in value else ""
            word = f"{key}={quote}{value}{quote}"
        out.append(word)
    return out


# Hydra keys naming a folder that must stay inside another one: a job's own files never land elsewhere.
INSIDE_KEYS = {"hydra.output_subdir": "inside the run folder", "hydra.sweep.subdir": "inside the sweep folder"}


def check_composition(overrides: list[str], config_name: str = "train") -> None:
    """The config composes with the first value of every swept key: a group option that does not exist
    (``hydra/launcher=nosuch``), a mapping where a list belongs, ``+`` on a chosen group — one line here
    instead of Hydra's lines after it has made the run folder."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415 - composing loads Hydra's plugins
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415
    from hydra.errors import HydraException  # noqa: PLC0415

    if {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"} & set(overrides):
        return  # another config than this package's: Hydra composes and reports it
    parser = OverridesParser.create()
    single = []
    for word in overrides:
        if word.startswith("-"):
            continue
        try:
            (parsed,) = parser.parse_overrides([word])
            if parsed.is_sweep_override():
                first = next(iter(parsed.sweep_string_iterator()))
                word = f"{parsed.get_key_element()}={first}"
        except Exception:  # noqa: BLE001 - glob(...) needs Hydra's loader: leave this one to Hydra
            continue
        single.append(word)

    def problem(words: list[str]) -> str | None:
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                compose(config_name=config_name, overrides=words, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            return str(e)
        return None

    reason = problem(single)
    if reason is None:
        return
    # The first override that the config cannot take: the shortest prefix of them that fails.
    culprit = next((w for i, w in enumerate(single) if problem(single[: i + 1]) is not None), " ".join(single))
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    skip = ("full_key", "object_type", "provider=", "Set the env", "Config search path", "Available options")
    first = next((line for line in lines if not line.startswith(skip)), type(reason).__name__)
    options = [line for line in reason.splitlines() if line.startswith("\t") and "provider=" not in line]
    if options:
        first += f" (options: {', '.join(o.strip() for o in options)})"
    raise ConfigError(culprit, None, f"Hydra cannot compose it: {short(first, 240)}", given=short(culprit)) from None


def short(text: str, limit: int = 80) -> str:
    """``text`` as shown in a message: a value of thousands of characters cut in the middle."""
    return text if len(text) <= limit else f"{text[: limit - 20]}…{text[-10:]} ({len(text)} characters)"


def callback_options() -> list[str]:
    """The callbacks of ``callbacks=[...]``: the files of ``conf/callbacks``."""
    return sorted(p.stem for p in (config_dir() / "callbacks").glob("*.yaml"))


def check_override_keys(overrides: list[str]) -> None:
    """Command-line overrides of keys that do not exist (``model.widht=256``), refused before Hydra
    composes the config (its own error suggests adding a ``+``, which only moves the problem)."""
    known = set(all_keys())
    check_override_grammar(overrides)
    for override in overrides:
        key, eq, value = override.partition("=")
        if key.startswith("+") and not key.startswith("++") and key[1:] in known:
            raise ConfigError(key[1:], CommandLineText(value), f"exists already: set it with {key[1:]}=... (no +)")
        if key.startswith("~") and key[1:].replace("/", ".") in known:  # a group's deletion: validate() says
            raise ConfigError(key[1:], None, "cannot be deleted: every run needs it (give it a value)", given=key)
        if key == "hydra.launcher.max_members" and not any(c in value for c in ",()[]$"):
            number = int(value) if value.lstrip("-").isdigit() else CommandLineText(value)
            integer(1)(key, number)  # before Hydra makes the sweep folder and the launcher
        if not eq or key.startswith(("hydra", "+", "~", "-")):
            continue
        key = key.replace("/", ".")
        options = group_options(key)
        chosen = value not in ("null", "~", "") and not any(c in value for c in ",()[]$")  # not a sweep, list, ${}
        if options and chosen and value not in options:
            raise ConfigError(key, CommandLineText(value), f"is not an option of {key} (options: {', '.join(options)})")
        if key in GROUPS and override.partition("=")[2] in ("null", "~", ""):
            raise ConfigError(key, None, f"is a config group every run needs (choose an option, e.g. {key}=...)")
        top = key.split(".", 1)[0]
        if key in known or key in TOP_LEVEL or top in ("callbacks", "experiment", "sweep"):
            continue
        raise ConfigError(
            key, CommandLineText(override.partition("=")[2]), unknown_key(key, sorted(known | set(TOP_LEVEL)))
        )


class CommandLineText(str):
    """A value as typed on the command line, shown without quotes."""

    def __repr__(self) -> str:
        return str(self)


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # what wandb accepts in WANDB_MODE


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first invalid value of a training config."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES and cfg.logger.wandb.get("enabled", True):
        raise ConfigError("WANDB_MODE", mode, f"(an environment variable) must be one of {', '.join(WANDB_MODES)}")
    check_fields(RunConfig, cfg, "", others=TOP_LEVEL)
    for group, (_, schema) in GROUPS.items():
        if not OmegaConf.is_dict(cfg.get(group)):  # ~optimizer, trainer=null
            raise ConfigError(
                group, cfg.get(group), f"is a config group every run needs (choose an option, e.g. {group}=...)"
            )
        check_fields(schema, cfg[group], group)
    d, m = cfg.data, cfg.model
    if d.batch_size is None and d.train_size is None:
        raise ConfigError("data.batch_size", None, "must be an integer >= 1 (null, full batch, needs data.train_size)")
    if d.sampler != "uniform" and d.task != "add":
        raise ConfigError("data.sampler", d.sampler, "shapes carries: needs data.task=add")
    if d.sampler != "uniform" and d.train_size is not None:
        raise ConfigError("data.sampler", d.sampler, "draws fresh sums: needs infinite data (data.train_size=null)")
    if d.train_size is not None:
        n_pairs = d.base ** (2 * d.n_digits)
        need = d.train_size + d.val_size
        if need > n_pairs:
            raise ConfigError(
                "data.train_size",
                d.train_size,
                f"train_size + val_size ({need}) must not exceed the {n_pairs} distinct pairs",
            )
        if n_pairs > 2**62:
            raise ConfigError("data.train_size", d.train_size, "finite data needs base^(2n) <= 2^62")
    if 2 * d.base**d.n_digits >= 2**63:  # the shelf atlas and the operands need 64-bit integers
        raise ConfigError("data.n_digits", d.n_digits, f"must keep 2 * base^n_digits below 2^63 (base {d.base})")
    if m.d_head is None and m.width % m.n_heads != 0:
        raise ConfigError(
            "model.width", m.width, f"must be divisible by model.n_heads={m.n_heads} (or set model.d_head)"
        )
    if m.attn_only and m.d_mlp is not None:
        raise ConfigError("model.d_mlp", m.d_mlp, "must be null when model.attn_only=true (the model has no MLP)")
    beyond = [step for step in cfg.trainer.ckpt_steps if step > cfg.trainer.max_steps]
    if beyond:
        raise ConfigError(
            "trainer.ckpt_steps", beyond, f"steps beyond trainer.max_steps={cfg.trainer.max_steps} are never reached"
        )
    check_accelerator(cfg.trainer.accelerator)
    check_devices(cfg.trainer)
    check_cuda_graph(cfg.trainer)
    spec = task_spec(d)
    if cfg.get("reference") is not None:  # a curve of another task would be drawn beside this one silently
        places = len(json.loads((REFERENCE_DIR / f"{cfg.reference}.json").read_text())["places"])
        if places != spec.n_places:
            raise ConfigError(
                "reference",
                cfg.reference,
                f"is a curve of {places - 1}-digit addition: give data.n_digits={places - 1}",
            )
    check_callbacks(cfg.get("callbacks"), spec)


def check_callbacks(callbacks: Any, spec: TaskSpec) -> None:
    """``callbacks``: a mapping of names to nodes whose ``_target_`` names a Lightning Callback class,
    given arguments that class takes, of its annotated types; made once here so that its own checks
    (``mode``, ``save_top_k`` …) speak now; a ``monitor`` names a key the run publishes."""
    if callbacks is None:
        return
    if not OmegaConf.is_dict(callbacks):
        raise ConfigError("callbacks", callbacks, "must be a mapping of names to {_target_: <class>, ...}")
    for name, node in callbacks.items():
        key = f"callbacks.{name}"
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if not isinstance(target, str) or "." not in target:
            raise ConfigError(
                f"{key}._target_", target, "must name a callback class, e.g. pytorch_lightning.callbacks.EarlyStopping"
            )
        module, _, attr = target.rpartition(".")
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"{key}._target_", target, f"module {module.split('.')[0]!r} is not installed")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as e:
            raise ConfigError(f"{key}._target_", target, f"cannot be imported ({e})") from None
        if not callable(found):
            raise ConfigError(f"{key}._target_", target, f"{module} has no class {attr}")
        from pytorch_lightning import Callback  # noqa: PLC0415 - Lightning loads with training, not with the check

        if not (isinstance(found, type) and issubclass(found, Callback)):
            raise ConfigError(f"{key}._target_", target, "must name a Lightning Callback class")
        check_callback_arguments(key, found, node)
        made = made_callback(key, node)
        check_inside_the_run(key, made)
        monitor = getattr(made, "monitor", None)
        if isinstance(monitor, str) and not monitorable(monitor, spec):
            raise ConfigError(
                f"{key}.monitor",
                monitor,
                f"is not a key the run publishes: {', '.join(held_out_keys(spec)[:4])}, val/<loss|acc>/place_<j> "
                f"(j in 0..{spec.n_places - 1}), train/loss, train/acc or another val/ key of the metrics",
            )


def check_inside_the_run(key: str, callback: Any) -> None:
    """A callback that writes files (Lightning's ModelCheckpoint) writes them inside the job folder."""
    if getattr(callback, "dirpath", None) is not None:
        raise ConfigError(
            f"{key}.dirpath",
            str(callback.dirpath),
            "a run writes only into its own folder: leave it unset (<job>/checkpoints/lightning)",
        )
    filename = getattr(callback, "filename", None)
    if isinstance(filename, str) and ("/" in filename or "\\" in filename or ".." in filename):
        raise ConfigError(f"{key}.filename", filename, "must be a file name (no folders, no ..): it is kept in the job")


def held_out_keys(spec: TaskSpec) -> list[str]:
    """The keys of every held-out evaluation (``metrics.place.place_metric_dict``)."""
    places = [f"val/{what}/place_{j}" for j in range(spec.n_places) for what in ("loss", "acc")]
    return ["val/loss", "val/acc", *places]


def monitorable(key: str, spec: TaskSpec) -> bool:
    """Could a callback watch ``key``? The held-out and train keys exactly; another ``val/`` key (the
    shelf-science metrics, which vary with the task) is checked at the first evaluation."""
    return key in ("train/loss", "train/acc", *held_out_keys(spec)) or (
        key.startswith("val/") and key not in ("val/", "val/loss/", "val/acc/") and not _place_beyond(key, spec)
    )


def _place_beyond(key: str, spec: TaskSpec) -> bool:
    found = re.fullmatch(r"val/(?:loss|acc)/place_(\d+)", key)
    return found is not None and int(found.group(1)) >= spec.n_places


def made_callback(key: str, node: DictConfig) -> Any:
    """The callback of ``node``, made as the run will make it; its own refusal in one line."""
    from hydra.utils import instantiate  # noqa: PLC0415 - only a config with callbacks needs it

    try:
        return instantiate(node)
    except Exception as e:  # Hydra wraps what the class raised
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(key, None, f"cannot be made: {short(first, 160)}", given=key) from None


def check_callback_arguments(key: str, cls: type, node: DictConfig) -> None:
    """Each argument given to a callback class is one of its parameters, of the type it is annotated with
    (Lightning checks few of them itself: ``patience: abc`` would fail at the first evaluation)."""
    signature = inspect.signature(cls.__init__)
    params = {n: p for n, p in signature.parameters.items() if n != "self"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that cannot be resolved: only the names are checked
        hints = {}
    values = OmegaConf.to_container(node, resolve=True)
    for arg, value in values.items():
        if arg.startswith("_"):  # Hydra's own keys: _target_, _partial_, _args_ ...
            continue
        if arg not in params:
            if takes_any:
                continue
            raise ConfigError(f"{key}.{arg}", value, f"is not an argument of {cls.__name__} ({', '.join(params)})")
        hint = hints.get(arg)
        if hint is not None and not fits(value, hint):
            raise ConfigError(f"{key}.{arg}", value, f"must be {describe(hint)}")


def fits(value: Any, hint: Any) -> bool:
    """Does a config value fit a simple annotation? Types a config cannot hold pass unchecked."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        return any(fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value) and not math.isnan(value)
    if hint is str:
        return isinstance(value, str)
    return True  # Path, timedelta, a class: Hydra or the callback converts or checks it


def describe(hint: Any) -> str:
    """An annotation in words: ``Optional[int]`` is "an integer or null"."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def check_cuda_graph(trainer: DictConfig) -> None:
    """``trainer.cuda_graph`` needs a CUDA device, and replaces ``trainer.compile``."""
    if not trainer.cuda_graph:
        return
    if trainer.compile:
        raise ConfigError("trainer.cuda_graph", True, "cannot be combined with trainer.compile=true (choose one)")
    if trainer.accelerator not in ("auto", "gpu", "cuda"):
        raise ConfigError(
            "trainer.cuda_graph", True, f"needs a CUDA GPU, not trainer.accelerator={trainer.accelerator}"
        )
    import torch  # noqa: PLC0415 - only this switch needs a device to look for

    if not torch.cuda.is_available():
        raise ConfigError("trainer.cuda_graph", True, "needs a CUDA GPU, and none is visible on this machine")


def check_devices(trainer: DictConfig) -> None:
    """``trainer.devices=[i]`` names a GPU that must exist (it would otherwise train on the CPU unasked)."""
    if trainer.devices is None:
        return
    if trainer.accelerator not in ("auto", "gpu", "cuda"):
        raise ConfigError(
            "trainer.devices", list(trainer.devices), f"names a GPU, but trainer.accelerator={trainer.accelerator}"
        )
    import torch  # noqa: PLC0415 - only a named GPU needs a device to look for

    count = torch.cuda.device_count()
    (index,) = trainer.devices
    if index >= count:
        visible = f"GPUs 0..{count - 1} are visible" if count else "no CUDA GPU is visible on this machine"
        raise ConfigError("trainer.devices", list(trainer.devices), visible)


def check_accelerator(accelerator: str) -> None:
    """A requested device must exist here: Lightning would fail later, after the W&B run was created."""
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    import torch  # noqa: PLC0415 - a config without a device to look for is checked before torch loads (~2 s)

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", accelerator, "no CUDA GPU visible on this machine (use auto or cpu)")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator", accelerator, "no Apple MPS device on this machine (use auto or cpu)")


def typed(cfg: DictConfig) -> TrainConfig:
    """A validated config as the schema's dataclasses (interpolations resolved)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    groups = {g: schema(**plain[g]) for g, (_, schema) in GROUPS.items()}
    logger = {key: value for key, value in plain["logger"].items() if key != "wandb"}
    groups["logger"] = LoggerConfig(wandb=WandbConfig(**plain["logger"]["wandb"]), **logger)
    run = RunConfig(**{f.name: plain[f.name] for f in dataclasses.fields(RunConfig)})
    return TrainConfig(run=run, **groups)


def task_spec(data: DataConfig | DictConfig) -> TaskSpec:
    return TaskSpec.from_config(data)


# The config key behind each model-config name that differs from it (``architecture`` is the mapping):
# what an error about a model's shape names, since it is what the user typed.
CONFIG_KEY_OF = {
    "d_model": "model.width",
    "n_layers": "model.depth",
    "n_heads": "model.n_heads",
    "d_head": "model.d_head",
    "d_mlp": "model.d_mlp",
    "d_vocab": "data.base (the vocabulary)",
    "d_vocab_out": "data.base",
    "n_ctx": "data.n_digits (the context)",
}


def architecture(model: ModelSchema | DictConfig, spec: TaskSpec) -> ModelConfig:
    """The model's architecture from the ``model`` group: the one place config names meet model names.

    ``width`` → ``d_model``, ``depth`` → ``n_layers``; ``d_head`` and ``d_mlp`` default to
    ``width // n_heads`` and ``4 * width``; vocabulary and context come from the task.
    """
    return ModelConfig(
        d_vocab=spec.d_vocab,
        d_vocab_out=spec.base,
        n_ctx=spec.seq_len - 1,
        d_model=model.width,
        n_layers=model.depth,
        n_heads=model.n_heads,
        d_head=model.d_head or model.width // model.n_heads,
        d_mlp=model.d_mlp or 4 * model.width,
        act_fn=model.act_fn,
        normalization=model.normalization,
        attn_only=model.attn_only,
        init=model.init,
        init_std=model.init_std,
    )
