"""``python -m addrepro.analyze checkpoint=<path> analysis=<name>``: interpretability analyses.

Exports the checkpoint to TransformerLens (``addrepro.model.export``) and runs one of the analyses of
``addrepro.interp`` (any of ``addrepro.interp.registry.ANALYSES``, or over_training of any of them
over a run's checkpoints), writing ``<job>/analysis/<name>_<ckpt stem>.{png,json}``.
A missing checkpoint, an unknown analysis or a bad analysis option is one error line and exit status 2,
the options checked before the model is exported.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from addrepro.interp import ANALYSES as MODULES
from addrepro.interp import load_subject, over_training, write_outputs
from addrepro.reports import learning_coefficient, spike_window
from addrepro.rundir.atomic import atomic_write_text
from addrepro.rundir.checkpoints import CheckpointError, checkpoint_dir, load_checkpoint
from addrepro.rundir.checkpoints import resolve_checkpoint as checkpoint_file
from addrepro.training.config import (
    MAX_THREADS,
    ConfigError,
    check_override_grammar,
    config_dir,
    quote_path_overrides,
    unknown_key,
)

SINGLE = tuple(MODULES)
# Analyses of a whole job folder rather than one checkpoint.
OF_A_JOB = ("over_training", "spikes", "llc")
ANALYSES = (*SINGLE, *OF_A_JOB)


class AnalyzeError(ValueError):
    pass


def resolve_checkpoint(checkpoint: str | None, analysis: str) -> tuple[Path, Path]:
    """``(checkpoint file or job folder, job folder)``; raises AnalyzeError with one line.

    A job folder stands for its ``checkpoints/last.ckpt``, except for ``over_training``, ``spikes`` and
    ``llc``, which read the folder's checkpoints and run files (``llc`` also takes one checkpoint file).
    """
    if not checkpoint:
        raise AnalyzeError("checkpoint=<path> is required (a .ckpt file or a job folder)")
    if not isinstance(checkpoint, str):
        raise AnalyzeError(f"checkpoint={checkpoint!r} is invalid: must be the path of a .ckpt file or a job folder")
    path = Path(checkpoint)
    if analysis in OF_A_JOB:
        if path.is_file() and analysis != "llc":  # llc: a job's checkpoints, or one of them
            raise AnalyzeError(f"checkpoint={path} is one file: {analysis} reads a whole job, give its folder")
        if path.is_dir() and not checkpoint_dir(path).is_dir():
            raise AnalyzeError(f"checkpoint={path}: no checkpoints/ folder in it")
        if path.is_dir():
            return path, path
    try:
        path = checkpoint_file(path)
    except CheckpointError as e:
        raise AnalyzeError(str(e)) from None
    # A job's checkpoint (<job>/checkpoints/x.ckpt) writes into the job; a checkpoint kept anywhere else,
    # beside itself: never into a folder above it that is not the run's.
    return path, path.parent.parent if path.parent.name == "checkpoints" else path.parent


# Far above what the analyses need; beyond, the sets they build would exhaust memory (per_cell is
# multiplied by base² cells and every place).
MAX_COUNT = 100_000
MAX_PER_CELL = 1024


def check_options(name: str, options: dict) -> None:
    """Refuse an analysis option the analysis does not have, or (where it checks them) a value it cannot
    use, before the model is exported (seconds of TransformerLens start-up)."""
    module = MODULES[name]
    params = {k: p for k, p in inspect.signature(module.run).parameters.items() if k != "subject"}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise AnalyzeError(f"{name}.{unknown[0]} is not an option of {name} (options: {', '.join(params) or 'none'})")
    for key, value in options.items():
        default = params[key].default
        # Every integer option is a count or a size (examples, neurons, clusters, components), or a seed.
        if isinstance(default, bool) and not isinstance(value, bool):
            raise AnalyzeError(f"{name}.{key}={value!r} is invalid: must be true or false")
        top = MAX_PER_CELL if key == "per_cell" else 2**31 - 1 if key == "seed" else MAX_COUNT
        low = 0 if key == "seed" else 1
        if type(default) is int and not (type(value) is int and low <= value <= top):
            raise AnalyzeError(f"{name}.{key}={value!r} is invalid: must be an integer in {low}..{top}")
        if type(default) is float and not (type(value) in (int, float) and math.isfinite(value)):
            raise AnalyzeError(f"{name}.{key}={value!r} is invalid: must be a finite number")
    if hasattr(module, "check_options"):
        try:
            module.check_options(**options)
        except ValueError as e:
            raise AnalyzeError(str(e)) from None


def check_spike_options(options: dict) -> None:
    """``spikes.*``: the steps to look around, the window and the rise factor, each with what it allows."""
    unknown = sorted(set(options) - {"at", "before", "after", "rise"})
    if unknown:
        raise AnalyzeError(f"spikes.{unknown[0]} is not an option of spikes (options: at, before, after, rise)")
    at = options.get("at")
    if at is not None and not (isinstance(at, list) and at and all(type(s) is int and 0 <= s < 2**62 for s in at)):
        raise AnalyzeError(f"spikes.at={at!r} is invalid: must be null (every detected spike) or a list of steps >= 0")
    for key in ("before", "after"):
        value = options.get(key)
        if not (type(value) is int and 0 <= value <= spike_window.MAX_WINDOW):
            raise AnalyzeError(f"spikes.{key}={value!r} is invalid: must be an integer in 0..{spike_window.MAX_WINDOW}")
    if options.get("after") == 0 and options.get("before") == 0:
        raise AnalyzeError("spikes.before=0 and spikes.after=0 leave no step to replay: give one of them >= 1")
    rise = options.get("rise")
    if not (type(rise) in (int, float) and math.isfinite(rise) and rise > 1):
        raise AnalyzeError(f"spikes.rise={rise!r} is invalid: must be a number > 1 (the factor over a median)")


def check_llc_options(options: dict) -> None:
    """``llc.*``: the checkpoints, the parts and the SGLD settings, each with what it allows."""
    known = set(inspect.signature(learning_coefficient.run).parameters) - {"job_dir"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AnalyzeError(f"llc.{unknown[0]} is not an option of llc (options: {', '.join(sorted(known))})")

    def integer(key: str, low: int, allow_null: bool = False) -> None:
        value = options.get(key)
        if (value is None and allow_null) or (type(value) is int and low <= value <= MAX_COUNT):
            return
        allowed = f"{'null or ' if allow_null else ''}an integer in {low}..{MAX_COUNT}"
        raise AnalyzeError(f"llc.{key}={value!r} is invalid: must be {allowed}")

    steps = options.get("steps")
    if steps is not None and not (isinstance(steps, list) and steps and all(type(s) is int and s >= 0 for s in steps)):
        raise AnalyzeError(f"llc.steps={steps!r} is invalid: must be null (every checkpoint) or a list of steps >= 0")
    parts = options.get("parts")
    allowed = learning_coefficient.PART_KINDS
    if not (isinstance(parts, list) and parts and all(p in allowed for p in parts)):
        raise AnalyzeError(f"llc.parts={parts!r} is invalid: must be a list of {', '.join(allowed)}")
    if options.get("n") is not None and not (type(options["n"]) is int and 3 <= options["n"] <= 2**40):
        raise AnalyzeError(f"llc.n={options['n']!r} is invalid: must be null or an integer >= 3 (nβ = n / log n)")
    for key in ("eps", "gamma"):
        value = options.get(key)
        if not (type(value) in (int, float) and math.isfinite(value) and value > 0):
            raise AnalyzeError(f"llc.{key}={value!r} is invalid: must be a number > 0")
    integer("chains", 1)
    integer("draws", 1)
    integer("burn_in", 0)
    integer("batch_size", 1, allow_null=True)
    if not (type(options.get("seed")) is int and 0 <= options["seed"] < 2**63):
        raise AnalyzeError(f"llc.seed={options.get('seed')!r} is invalid: must be an integer >= 0")
    if not isinstance(options.get("sweep"), bool):
        raise AnalyzeError(f"llc.sweep={options.get('sweep')!r} is invalid: must be true or false")


def check_common(cfg: DictConfig) -> None:
    """The options every analysis shares, each with what it allows."""

    def count(key: str, value: object, allow_null: bool = False) -> None:
        if (value is None and allow_null) or (type(value) is int and value >= 1):
            return
        allowed = "null or an integer >= 1" if allow_null else "an integer >= 1"
        raise AnalyzeError(f"{key}={value!r} is invalid: must be {allowed}")

    count("threads", cfg.threads)
    if cfg.threads > MAX_THREADS:
        raise AnalyzeError(f"threads={cfg.threads} is invalid: must be an integer in 1..{MAX_THREADS}")
    count("data.val_size", cfg.data.val_size, allow_null=True)
    count("data.carry_size", cfg.data.carry_size)
    count("data.chain_size", cfg.data.chain_size)
    for key in ("data.val_size", "data.carry_size", "data.chain_size"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value > MAX_COUNT:
            raise AnalyzeError(f"{key}={value} is invalid: must be an integer in 1..{MAX_COUNT}")
    steps = cfg.get("steps")
    if steps is not None and not (
        OmegaConf.is_list(steps) and len(steps) and all(type(s) is int and 0 <= s < 2**62 for s in steps)
    ):
        raise AnalyzeError(f"steps={steps!r} is invalid: must be null or a list of steps (integers >= 0)")
    if steps is not None and cfg.analysis != "over_training":
        raise AnalyzeError(f"steps={list(steps)} is for analysis=over_training (give one checkpoint= otherwise)")
    if not isinstance(cfg.wandb, bool):
        raise AnalyzeError(f"wandb={cfg.wandb!r} is invalid: must be true or false")
    if cfg.out_dir is not None and not isinstance(cfg.out_dir, str):
        raise AnalyzeError(f"out_dir={cfg.out_dir!r} is invalid: must be a folder path or null")


def check_writable(folder: Path) -> None:
    """The output folder can take files, checked before the analysis runs (a read-only copy of a run)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:  # nothing is created by the check
        existing = existing.parent
    try:
        tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check.").close()
    except OSError as e:
        raise AnalyzeError(
            f"cannot write the output folder {folder} ({e.strerror or e}): give out_dir=<a writable folder>"
        ) from None


def output_stem(cfg: DictConfig, path: Path, job: Path) -> Path:
    out_dir = Path(cfg.out_dir) if cfg.out_dir else job / "analysis"
    if cfg.analysis == "over_training":
        return out_dir / f"over_training_{cfg.of}"
    if cfg.analysis == "spikes":
        return out_dir / "spike_windows"
    if cfg.analysis == "llc":
        return out_dir / ("llc" if path.is_dir() else f"llc_{path.stem}")
    return out_dir / f"{cfg.analysis}_{path.stem}"


def analyze(cfg: DictConfig) -> list[Path]:
    if cfg.analysis not in ANALYSES:
        raise AnalyzeError(f"unknown analysis={cfg.analysis!r} (choose from {', '.join(ANALYSES)})")
    if cfg.analysis == "over_training" and cfg.of not in SINGLE:
        raise AnalyzeError(f"unknown of={cfg.of!r} for over_training (choose from {', '.join(SINGLE)})")
    check_common(cfg)
    path, job = resolve_checkpoint(cfg.checkpoint, cfg.analysis)
    name = cfg.of if cfg.analysis == "over_training" else cfg.analysis
    if name == "spikes":
        check_spike_options(OmegaConf.to_container(cfg.spikes, resolve=True) or {})
    elif name == "llc":
        check_llc_options(OmegaConf.to_container(cfg.llc, resolve=True) or {})
    else:
        check_options(name, OmegaConf.to_container(cfg[name], resolve=True) or {})
    check_writable(output_stem(cfg, path, job).parent)
    if cfg.wandb and not (job / "wandb").is_dir():
        raise AnalyzeError(f"wandb=true, but {job} has no W&B run to log to (it was trained with W&B off)")

    torch.set_num_threads(cfg.threads)
    subject_options = dict(cfg.data)
    try:
        if cfg.analysis == "over_training":
            options = OmegaConf.to_container(cfg[cfg.of], resolve=True) or {}
            steps = list(cfg.steps) if cfg.get("steps") is not None else None
            result = over_training.run(job, cfg.of, subject_options, steps=steps, **options)
            figure = over_training.plot(result)
        elif cfg.analysis == "spikes":
            result = spike_window.run(job, **OmegaConf.to_container(cfg.spikes, resolve=True))
            figure = spike_window.plot(result)
        elif cfg.analysis == "llc":
            result = learning_coefficient.run(path, **OmegaConf.to_container(cfg.llc, resolve=True))
            figure = learning_coefficient.plot(result)
        else:
            module = MODULES[cfg.analysis]
            result = module.run(
                load_subject(path, **subject_options), **(OmegaConf.to_container(cfg[cfg.analysis]) or {})
            )
            figure = module.plot(result)
    except CheckpointError as e:
        raise AnalyzeError(str(e)) from None
    except ValueError as e:  # an option the analysis cannot use (it names the key and what is allowed)
        raise AnalyzeError(str(e)) from None
    paths = write_outputs(result, figure, output_stem(cfg, path, job))
    if cfg.analysis in ("spikes", "llc"):
        text = (spike_window if cfg.analysis == "spikes" else learning_coefficient).markdown(result)
        paths.append(atomic_write_text(output_stem(cfg, path, job).with_suffix(".md"), text))
    if cfg.wandb:
        log_to_wandb(job, cfg, result, paths)
    print(summary(cfg, result))
    return paths


def summary(cfg: DictConfig, result: dict, top: int = 8) -> str:
    """What the analysis found, in a few lines: the largest values of its summary (the scalars it logs to
    W&B); every value is in the files it wrote."""
    if cfg.analysis == "over_training":
        values = {k: v[-1] for k, v in result["series"].items() if v}
        what = f"{cfg.of} over training, at step {result['steps'][-1]}" if result["steps"] else cfg.of
    elif cfg.analysis == "spikes":
        values, what = spike_window.summarize(result), "spikes (leads over the loss's rise, in steps)"
    elif cfg.analysis == "llc":
        values, what = learning_coefficient.summarize(result), "llc (the last checkpoint's estimates)"
    else:
        values, what = MODULES[cfg.analysis].summarize(result), cfg.analysis
    finite = {k: v for k, v in values.items() if v == v}  # NaN: not measured for that key
    shown = sorted(finite, key=lambda k: -abs(finite[k]))[:top]
    lines = [f"{what}: the {len(shown)} largest of {len(values)} summary values (all of them in the files below)"]
    width = max((len(k) for k in shown), default=0)
    lines += [f"  {k:{width}}  {finite[k]:+.4g}" for k in shown]
    return "\n".join(lines)


def log_to_wandb(job: Path, cfg: DictConfig, result: dict, paths: list[Path]) -> None:
    """Resume the run's W&B run (its id is in the checkpoint) and log the PNG and the summary scalars."""
    import wandb  # noqa: PLC0415 - a second of start-up that runs without analysis.wandb skip

    ckpts = sorted((job / "checkpoints").glob("*.ckpt"))
    ckpt = load_checkpoint(ckpts[-1]) if ckpts else {}
    run_cfg = ckpt.get("config", {}).get("logger", {}).get("wandb", {})
    run = wandb.init(
        id=ckpt.get("wandb_run_id"),
        resume="allow",
        dir=str(job),
        project=run_cfg.get("project", "addrepro"),
        entity=run_cfg.get("entity"),
        mode=os.environ.get("WANDB_MODE") or run_cfg.get("mode", "offline"),
        settings=wandb.Settings(silent=True, console="off"),
    )
    payload = {f"analysis/{p.stem}": wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
    if cfg.analysis in MODULES:
        payload.update({f"analysis/{cfg.analysis}/{k}": v for k, v in MODULES[cfg.analysis].summarize(result).items()})
    elif cfg.analysis == "spikes":
        payload.update({f"analysis/spikes/{k}": v for k, v in spike_window.summarize(result).items()})
    elif cfg.analysis == "llc":
        payload.update({f"analysis/llc/{k}": v for k, v in learning_coefficient.summarize(result).items()})
    run.log(payload)
    run.finish()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        paths = analyze(cfg)
    except AnalyzeError as e:
        print(f"addrepro: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        print(f"addrepro: {e}", file=sys.stderr)
        sys.exit(2)
    for p in paths:
        print(p)


def analyze_keys() -> list[str]:
    """Every key of ``conf/analyze.yaml``, dotted (``threads``, ``data.val_size``, ``patching.places``)."""
    cfg = OmegaConf.load(config_dir() / "analyze.yaml")

    def walk(node: object, prefix: str) -> list[str]:
        if not OmegaConf.is_dict(node):
            return [prefix[:-1]]
        out = [prefix[:-1]] if prefix else []  # a section may be given whole: patching={size: 8}
        for key in node:
            if key not in ("defaults", "hydra"):
                out += walk(node[key], f"{prefix}{key}.")
        return out

    return walk(cfg, "")


def cli() -> None:
    """``python -m addrepro.analyze``: a key that does not exist (with or without ``+``) is refused in
    one line naming the nearest keys, before Hydra or the model loads."""
    known = analyze_keys()
    sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
    sys.argv = [sys.argv[0], *quote_path_overrides(sys.argv[1:], ("checkpoint",))]
    for override in sys.argv[1:]:
        key, eq, value = override.partition("=")
        if key.startswith("~") and key[1:] in known:
            print(f"addrepro: {key} is invalid: cannot be deleted (give it a value)", file=sys.stderr)
            sys.exit(2)
        key = key.lstrip("+~")
        if eq and not key.startswith("hydra") and key not in known:
            print(f"addrepro: {key}={value} {unknown_key(key, known)}", file=sys.stderr)
            sys.exit(2)
        if eq and key in sections and not value.startswith("{"):
            print(
                f"addrepro: {key}={value} is invalid: {key} is a section; set its keys ({key}.<key>=...)",
                file=sys.stderr,
            )
            sys.exit(2)
    try:
        check_override_grammar(sys.argv[1:], keys=sorted(known))
    except ConfigError as e:
        print(f"addrepro: config error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
