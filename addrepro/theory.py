"""``python -m addrepro.theory data.n_digits=5 data.base=10``: print the shelf atlas, write ``shelves.json``.

The atlas lists, for every answer place, the Bayes-optimal loss of each knowledge level (see
``addrepro.shelves.atlas``); it uses the same ``data`` config group as training. For addition it also
gives the exact frequencies of the carry-complexity classes S0..Sn (``classes.json``, see
``addrepro.task.complexity``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from addrepro.shelves.atlas import format_atlas_table, shelf_atlas
from addrepro.training.config import (
    ConfigError,
    DataConfig,
    check_fields,
    check_override_grammar,
    config_dir,
    integer,
    unknown_key,
)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="theory")
def main(cfg: DictConfig) -> None:
    try:
        check_fields(DataConfig, cfg.data, "data")
    except ConfigError as e:
        print(f"addrepro: config error: {e}", file=sys.stderr)
        sys.exit(2)
    d = cfg.data
    entries = shelf_atlas(d.n_digits, d.base, d.order, d.task, mc_samples=cfg.mc_samples, seed=cfg.mc_seed)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "shelves.json"
    path.write_text(json.dumps([e.as_dict() for e in entries], indent=1))
    print(f"shelf atlas (nats), {d.n_digits}-digit base {d.base}, order {d.order}, task {d.task}")
    print(format_atlas_table(entries))
    print(f"written: {path}")
    if d.task == "add":
        from addrepro.task.complexity import class_frequencies  # noqa: PLC0415 - torch, after the checks

        freq = {f"S{k}": p for k, p in enumerate(class_frequencies(d.n_digits, d.base))}
        classes = out_dir / "classes.json"
        classes.write_text(json.dumps(freq, indent=1))
        shown = "  ".join(f"{name} {100 * p:.4g}%" for name, p in freq.items())
        print(f"carry-complexity classes under uniform operands (longest carry cascade): {shown}")
        print(f"written: {classes}")


def cli() -> None:
    """Values checked before Hydra runs: the output folder is named after them."""
    overrides = [a for a in sys.argv[1:] if not a.startswith(("hydra", "-"))]
    known = [f"data.{f.name}" for f in dataclasses.fields(DataConfig)] + ["data", "mc_samples", "mc_seed", "seed"]
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key not in known:
            print(f"addrepro: config error: {key}={value} is invalid: {unknown_key(key, known)}", file=sys.stderr)
            sys.exit(2)
    try:
        check_override_grammar(overrides, keys=known)
    except ConfigError as e:
        print(f"addrepro: config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="theory", overrides=overrides)
    except Exception:  # an override Hydra cannot parse: its own message, from main()
        main()
        return
    try:
        check_fields(DataConfig, cfg.data, "data")
        if 2 * cfg.data.base**cfg.data.n_digits >= 2**63:
            raise ConfigError(
                "data.n_digits", cfg.data.n_digits, f"must keep 2 * base^n_digits below 2^63 (base {cfg.data.base})"
            )
        integer(1, 100_000_000)("mc_samples", cfg.mc_samples)
        integer(0, 2**32 - 1)("mc_seed", cfg.mc_seed)
    except ConfigError as e:
        print(f"addrepro: config error: {e}", file=sys.stderr)
        sys.exit(2)
    folder = next((Path(a.partition("=")[2]) for a in sys.argv[1:] if a.startswith("hydra.run.dir=")), None)
    foreign = (
        sorted(p.name for p in folder.iterdir() if p.name not in THEORY_FILES) if folder and folder.is_dir() else []
    )
    if foreign:  # Hydra would overwrite a run's .hydra/ configs before anything else
        print(
            f"addrepro: run folder error: hydra.run.dir={folder} holds files the atlas does not write "
            f"({', '.join(foreign[:3])}): give a new folder",
            file=sys.stderr,
        )
        sys.exit(2)
    main()


# What a theory folder holds: writing the atlas again into it replaces only these.
THEORY_FILES = {".hydra", "shelves.json", "classes.json"}


if __name__ == "__main__":
    cli()
