"""Metrics on the carry-conditioned sets: loss, accuracy and naive-sum probabilities at the conditioned place."""

from __future__ import annotations

import math

import torch

from addrepro.metrics.naive_sum import naive_offset_probs
from addrepro.metrics.place import place_stats, stats_from_logits
from addrepro.task.encoding import split_tokens
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec


@torch.no_grad()
def class_metric_dict(model: torch.nn.Module, sets: CarrySets, spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Per carry-complexity class: the mean answer-token loss, the exact-match accuracy of the whole
    answer, and every place's loss and accuracy; values ``(K,)``."""
    if sets.class_tokens is None:
        return {}
    stats = place_stats(model, sets.class_tokens, spec)
    out = {}
    for name, (lo, hi) in sets.classes.items():
        loss, correct = stats.token_loss[:, lo:hi], stats.correct[:, lo:hi]  # (K, S, n+1)
        out[f"{name}/loss"], out[f"{name}/acc"] = loss.mean((1, 2)), correct.all(-1).float().mean(1)
        for j in range(loss.shape[-1]):
            out[f"{name}/place_{j}/loss"] = loss[..., j].mean(1)
            out[f"{name}/place_{j}/acc"] = correct[..., j].float().mean(1)
    return out


@torch.no_grad()
def carry_metric_dict(
    model: torch.nn.Module, sets: CarrySets, spec: TaskSpec, logits: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Loss (with its standard error over the set, ``loss_se``), accuracy, P(naive+0) and P(naive+1) at
    the conditioned place, per set, and the class metrics (``class_metrics``); values ``(K,)``.

    ``logits``: the model's answer logits ``(K, N, n+1, base)`` on ``sets.tokens``, if already computed.
    """
    if not sets.slices:
        return {}
    inputs, targets = split_tokens(sets.tokens, spec)
    if logits is None:
        logits = model(inputs, last=spec.n_places)
    k = logits.shape[0]
    stats = stats_from_logits(logits, targets.expand(k, *targets.shape), spec)
    tokens = sets.tokens.expand(k, *sets.tokens.shape)
    out = class_metric_dict(model, sets, spec)
    for name, (j, lo, hi) in sets.slices.items():
        loss = stats.token_loss[:, lo:hi, j].mean(1)
        acc = stats.correct[:, lo:hi, j].float().mean(1)
        out[f"{name}/loss"], out[f"{name}/acc"] = loss, acc
        # The sets are samples: a set of n sequences measures its loss to about std / sqrt(n) (NaN for n = 1).
        out[f"{name}/loss_se"] = (
            stats.token_loss[:, lo:hi, j].std(1) / math.sqrt(hi - lo)
            if hi - lo > 1
            else torch.full_like(loss, math.nan)
        )
        if j < spec.n_digits:
            sub = type(stats)(stats.log_probs[:, lo:hi], stats.targets[:, lo:hi], stats.token_loss[:, lo:hi])
            offsets = naive_offset_probs(sub, tokens[:, lo:hi], spec)  # (K, n, base)
            out[f"{name}/p_plus0"], out[f"{name}/p_plus1"] = offsets[:, j, 0], offsets[:, j, 1]
        else:
            probs = stats.log_probs[:, lo:hi, j].exp().mean(1)
            out[f"{name}/p_plus0"], out[f"{name}/p_plus1"] = probs[:, 0], probs[:, 1]
    return out
