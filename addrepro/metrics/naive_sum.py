"""Naive-sum probabilities: how much of its belief a model puts on (a_j + b_j + k) mod base.

A model that has learned the addition table but not the carry splits its mass between the naive
sum (+0) and the naive sum plus one (+1); the offsets make that visible. The depth-d sum is the
digit obtained by computing the carry from only the d pairs below (and assuming no carry into the
lowest of them), the prediction of the ``carry_depth_d`` atlas level.
"""

from __future__ import annotations

import torch

from addrepro.metrics.place import PlaceStats
from addrepro.task.encoding import carry_scan, operands_from_tokens
from addrepro.task.spec import TaskSpec


def naive_offset_probs(stats: PlaceStats, tokens: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Mean probability of (a_j + b_j + k) mod base, ``(K, n, base)``: place j < n, offset k."""
    a, b = operands_from_tokens(tokens, spec)  # (K, B, n)
    offsets = torch.arange(spec.base, device=tokens.device)
    idx = torch.remainder((a + b)[..., None] + offsets, spec.base)  # (K, B, n, base)
    probs = stats.log_probs[:, :, : spec.n_digits].exp()  # (K, B, n, base)
    return probs.gather(-1, idx).mean(1)


def depth_carry(a: torch.Tensor, b: torch.Tensor, place: int, depth: int, base: int) -> torch.Tensor:
    """Carry into ``place`` computed from the ``depth`` pairs below it only, starting from carry 0."""
    lo = place - depth
    return carry_scan(a[..., lo:place] + b[..., lo:place], base)[..., -1]  # (...,)


def depth_sum_probs(stats: PlaceStats, tokens: torch.Tensor, spec: TaskSpec) -> dict[tuple[int, int], torch.Tensor]:
    """``{(place, depth): (K,)}`` mean probability of the depth-d sum, for d = 1 .. place-1."""
    a, b = operands_from_tokens(tokens, spec)
    probs = stats.log_probs.exp()  # (K, B, n+1, base)
    out = {}
    for j in range(2, spec.n_places):
        for d in range(1, j):
            carry = depth_carry(a, b, j, d, spec.base)
            digit = carry if j == spec.n_digits else torch.remainder(a[..., j] + b[..., j] + carry, spec.base)
            out[(j, d)] = probs[:, :, j].gather(-1, digit[..., None]).squeeze(-1).mean(1)
    return out


def carry_out_by_truth(stats: PlaceStats, spec: TaskSpec) -> dict[int, torch.Tensor]:
    """``{c: (K,)}`` mean probability on the right carry-out over the examples whose carry-out is c;
    a carry no example has is left out (the set is the same for every member). Averaged over all
    examples, P(0) and P(1) sit near the share of each carry even for a model that is sure of every
    answer; split by the truth, they show what it knows."""
    truth = stats.targets[..., spec.n_digits]  # (K, B)
    p_right = stats.log_probs[:, :, spec.n_digits].gather(-1, truth[..., None]).squeeze(-1).exp()  # (K, B)
    out = {}
    for c in (0, 1):
        mask = (truth == c).to(p_right.dtype)
        count = mask.sum(1)  # (K,)
        if bool(count.min() > 0):
            out[c] = (p_right * mask).sum(1) / count
    return out


def naive_sum_metric_dict(stats: PlaceStats, tokens: torch.Tensor, spec: TaskSpec, prefix: str) -> dict:
    """``{prefix}/naive/place_j/plus_k``, ``{prefix}/depth_sum/place_j/depth_d``, carry-out P(0), P(1)
    and, for addition, the probability of the right carry-out per true carry-out
    (``{prefix}/carry_out/true_c``)."""
    out = {}
    offsets = naive_offset_probs(stats, tokens, spec)
    for j in range(spec.n_digits):
        for k in range(spec.base):
            out[f"{prefix}/naive/place_{j}/plus_{k}"] = offsets[:, j, k]
    if spec.task == "add":
        for (j, d), p in depth_sum_probs(stats, tokens, spec).items():
            out[f"{prefix}/depth_sum/place_{j}/depth_{d}"] = p
    carry_out = stats.log_probs[:, :, spec.n_digits].exp().mean(1)  # (K, base)
    out[f"{prefix}/carry_out/p0"] = carry_out[:, 0]
    out[f"{prefix}/carry_out/p1"] = carry_out[:, 1]
    if spec.task == "add":
        for c, p in carry_out_by_truth(stats, spec).items():
            out[f"{prefix}/carry_out/true_{c}"] = p
    return out
