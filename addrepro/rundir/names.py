"""How a job is named: its W&B run name, group and tags, from the overrides that made it."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser


def swept_keys(argv: list[str]) -> set[str]:
    """Keys that a multirun command line sweeps over (``model.width=32,64``, ``seed=range(3)`` …)."""
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # a malformed override is reported by Hydra itself
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def grid_keys(params: dict | None) -> list[str]:
    """Keys a sweep config's grid sweeps over (``hydra.sweeper.params``, e.g. from ``+sweep=width``), in order."""
    params = dict(params or {})
    swept = swept_keys([f"{k}={v}" for k, v in params.items()])
    return [k for k in params if k in swept]


def run_name(overrides: list[str], swept: set[str] | None = None) -> str:
    """A W&B run name from the job's overrides: the swept values in a sweep, e.g. ``model.width=32``."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.", "logger."))]
    if swept:
        kept = [o for o in kept if o.lstrip("+~").split("=", 1)[0] in swept] or kept
    return ",".join(kept) or "default"


def swept_tags(overrides: list[str], swept: set[str] | None) -> list[str]:
    """W&B tags for the values a sweep job was given, e.g. ``["model.width=32"]`` (none outside a sweep).

    W&B limits a tag to 64 characters; a longer override is cut there.
    """
    if not swept:
        return []
    kept = [o.lstrip("+~") for o in overrides if o.lstrip("+~").split("=", 1)[0] in swept]
    return [o[:64] for o in kept]


def wandb_group(group_dir: Path, multirun: bool) -> str:
    """The W&B group of a job: its sweep folder's (shared by every job of a multirun) or its own folder's."""
    return f"{'sweep' if multirun else 'run'}-{group_dir.parent.name}_{group_dir.name}"
