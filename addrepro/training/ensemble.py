"""Packing the jobs of a sweep into stacked-weight ensembles.

Jobs that differ only in what a stack can hold per member — the initialisation seed, the data
seed, the learning rate and the weight decay — are trained together in one process as one model
with a leading K dimension; each keeps its own folder, W&B run, metrics and checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from addrepro.training.plan import JobPlan

PER_MEMBER_KEYS = ("seed", "data.seed", "optimizer.lr", "optimizer.weight_decay", "logger.wandb.name")

T = TypeVar("T")


def packing_key(cfg: DictConfig, resumed_at: int | None = None) -> str:
    """Jobs with equal keys can share one stack: the resolved config without the per-member keys (and
    ``resume``), and the step the jobs continue from (``resumed_at``; a stack's members move together)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    plain.pop("resume", None)
    for dotted in PER_MEMBER_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return json.dumps({"config": plain, "resumed_at": resumed_at}, sort_keys=True, default=str)


def plan_key(plan: JobPlan) -> str:
    """The packing key of a checked job: a job that continues its own checkpoint (a sweep resumed with
    ``resume=auto``, the only resume a sweep of several jobs takes: a requeued stack's members) stacks
    with those resumed at the same step; a job continuing a checkpoint kept outside any job folder runs
    alone. (A resumed job's ``resume`` is its checkpoint's path by then, whatever was given.)"""
    if plan.resume_from is None:
        return packing_key(plan.cfg)
    if not plan.own_checkpoint:
        return json.dumps({"alone": str(plan.job_dir)})
    from addrepro.rundir.checkpoints import load_checkpoint  # noqa: PLC0415 - torch, once a job resumes

    return packing_key(plan.cfg, int(load_checkpoint(plan.resume_from)["step"]))


def pack(items: Sequence[T], keys: Sequence[str], max_members: int) -> list[list[T]]:
    """Group items with equal keys, in first-seen order, in stacks of at most ``max_members``."""
    groups: dict[str, list[list[T]]] = {}
    for item, key in zip(items, keys, strict=True):
        stacks = groups.setdefault(key, [[]])
        if len(stacks[-1]) >= max_members:
            stacks.append([])
        stacks[-1].append(item)
    return [stack for stacks in groups.values() for stack in stacks]
