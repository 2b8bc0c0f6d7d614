"""Packing the jobs of a sweep into stacked-weight ensembles.

Jobs that differ only in what a stack can hold per member — the initialisation seed, the data
seed, the learning rate and the weight decay — are trained together in one process as one model
with a leading K dimension; each keeps its own folder, W&B run, metrics and checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

PER_MEMBER_KEYS = ("seed", "data.seed", "optimizer.lr", "optimizer.weight_decay", "logger.wandb.name")

T = TypeVar("T")


def packing_key(cfg: DictConfig) -> str:
    """Jobs with equal keys can share one stack: the resolved config without the per-member keys."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    for dotted in PER_MEMBER_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    if plain.get("resume"):
        return json.dumps({"resume": plain["resume"], "alone": id(cfg)})  # a resumed job runs alone
    return json.dumps(plain, sort_keys=True, default=str)


def pack(items: Sequence[T], keys: Sequence[str], max_members: int) -> list[list[T]]:
    """Group items with equal keys, in first-seen order, in stacks of at most ``max_members``."""
    groups: dict[str, list[list[T]]] = {}
    for item, key in zip(items, keys, strict=True):
        stacks = groups.setdefault(key, [[]])
        if len(stacks[-1]) >= max_members:
            stacks.append([])
        stacks[-1].append(item)
    return [stack for stacks in groups.values() for stack in stacks]
