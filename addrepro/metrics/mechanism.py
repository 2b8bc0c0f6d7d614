"""Mechanism metrics: what formed inside the model, measured cheaply during training.

* **Attention mass** of every head, from the position that predicts place j, on the operand digits of
  place j (``own``: a_j and b_j) and of the place below (``lower``: a_{j-1} and b_{j-1}) — the
  two readings an addition circuit needs (the digit pair, and the pair that decides the carry).
* **Carry probe**: how linearly readable the carry into place j is from the residual stream at the
  position that predicts place j — a closed-form ridge probe fitted on half of the carry-conditioned
  sets (equal numbers of carry-in 0 and 1) and scored on the other half.

Keys: ``mech/attn/L{l}H{h}/place_{j}/{own,lower}`` and ``mech/probe/carry_in/place_{j}/acc``; values
are ``(K,)`` tensors like every other metric.
"""

from __future__ import annotations

import torch

from addrepro.metrics.ridge import ridge_weights
from addrepro.model.transformer import Transformer
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec

# Ridge strength relative to the mean feature variance: enough to keep the solve well conditioned
# on a few hundred examples of a 128-wide stream, far too little to change a clear direction.
RIDGE = 1e-2
# Attention masses are averaged over this many validation sequences: plenty for a mean, and the
# patterns of a large ensemble stay small.
MECHANISM_EXAMPLES = 256


def operand_positions(spec: TaskSpec, j: int) -> tuple[int, int]:
    """Input positions of a_j and b_j (operands are written most significant digit first)."""
    n = spec.n_digits
    return n - 1 - j, 2 * n - j


def query_position(spec: TaskSpec, j: int) -> int:
    """The input position whose logits predict place j."""
    return spec.answer_start - 1 + spec.emission_index[j]


@torch.no_grad()
def streams_and_patterns(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final residual stream ``(K, B, T, d_model)`` and every layer's pattern ``(K, B, H, T, T)``."""
    inputs = tokens[..., :-1]
    if inputs.dim() == 2:
        inputs = inputs.expand(model.n_models, *inputs.shape)
    x = model.embed_tokens(inputs)  # (K, B, T, d_model)
    patterns = []
    for block in model.blocks:
        patterns.append(block.attn.pattern(block.ln1(x)))
        x = block(x)
    return model.ln_final(x), patterns


def attention_masses(patterns: list[torch.Tensor], spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Mean attention mass of every head on own and lower operands, ``(K,)`` each."""
    out = {}
    for layer, pattern in enumerate(patterns):  # (K, B, H, T, T)
        for j in range(spec.n_places):
            row = pattern[:, :, :, query_position(spec, j)]  # (K, B, H, T)
            for name, place in (("own", j), ("lower", j - 1)):
                if not 0 <= place < spec.n_digits:
                    continue
                a, b = operand_positions(spec, place)
                mass = (row[..., a] + row[..., b]).mean(1)  # (K, H)
                for h in range(mass.shape[1]):
                    out[f"mech/attn/L{layer}H{h}/place_{j}/{name}"] = mass[:, h]
    return out


def ridge_probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Accuracy ``(K,)`` on the held-out rows of a ridge probe predicting binary ``y (N,)`` from ``x (K, N, d)``.

    Closed form: w = (Xᵀ X + λ I)⁻¹ Xᵀ (2y − 1) with a bias column, on the ``train`` rows; features are
    centred and scaled by the training rows' statistics. Predicts 1 where x·w > 0.
    """
    x = x.double()
    mean = x[:, train].mean(1, keepdim=True)
    std = x[:, train].std(1, keepdim=True).clamp_min(1e-12)
    x = torch.cat([(x - mean) / std, torch.ones_like(x[..., :1])], dim=-1)  # (K, N, d + 1)
    xt, target = x[:, train], (2.0 * y[train].double() - 1.0)
    w = ridge_weights(xt, target[:, None], RIDGE)  # (K, d + 1, 1)
    test = ~train
    predicted = (x[:, test] @ w)[..., 0] > 0  # (K, N_test)
    return (predicted == y[test].bool()).float().mean(1)


def carry_probe_accuracies(
    model: Transformer, sets: CarrySets, spec: TaskSpec, resid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Carry-in probe accuracy at every place that can receive a carry, ``(K,)`` each.

    ``resid``: the final residual stream at the answer-predicting positions ``(K, N, n+1, d_model)``
    on ``sets.tokens``, if already computed (training computes it once for these and the carry metrics).
    """
    out: dict[str, torch.Tensor] = {}
    if not sets.slices:
        return out
    if resid is None:
        resid = model.residual(sets.tokens[:, :-1], last=spec.n_places)  # (K, N, n + 1, d_model)
    for j in range(1, spec.n_places):
        lo0, hi0 = sets.slices[f"carry/place_{j}/cin_0"][1:]
        lo1, hi1 = sets.slices[f"carry/place_{j}/cin_1"][1:]
        # The position that predicts place j (its emission index), as in training.
        x = torch.cat([resid[:, lo0:hi0, spec.emission_index[j]], resid[:, lo1:hi1, spec.emission_index[j]]], 1)
        y = torch.cat([torch.zeros(hi0 - lo0), torch.ones(hi1 - lo1)]).to(x.device)
        train = torch.arange(len(y), device=x.device) % 2 == 0  # every other example
        out[f"mech/probe/carry_in/place_{j}/acc"] = ridge_probe_accuracy(x, y, train)
    return out


@torch.no_grad()
def mechanism_metric_dict(
    model: Transformer, tokens: torch.Tensor, sets: CarrySets, spec: TaskSpec, carry_resid: torch.Tensor | None = None
) -> dict:
    """Attention masses on ``tokens`` ``(K, V, T)`` and carry-probe accuracies on the carry sets
    (``carry_resid``: see ``carry_probe_accuracies``)."""
    _, patterns = streams_and_patterns(model, tokens)
    return {**attention_masses(patterns, spec), **carry_probe_accuracies(model, sets, spec, carry_resid)}
