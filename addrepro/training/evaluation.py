"""Held-out evaluation of a stack: a model and its evaluation sets in, ``(K,)`` metrics out.

Nothing here keeps state or has side effects; what is measured is in ``addrepro.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from addrepro.metrics.carry import carry_metric_dict
from addrepro.metrics.confusion import confusion_matrices
from addrepro.metrics.mechanism import MECHANISM_EXAMPLES, mechanism_metric_dict
from addrepro.metrics.naive_sum import naive_sum_metric_dict
from addrepro.metrics.place import place_metric_dict, place_stats
from addrepro.model.transformer import Transformer
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec


@dataclass
class EvaluationSets:
    """The held-out sequences of every member ``(K, V, T)`` and the carry-conditioned sets (shared)."""

    val_tokens: torch.Tensor
    carry_sets: CarrySets


@dataclass
class Evaluation:
    """One evaluation: the held-out metrics, the shelf-science metrics and the confusion matrices
    ``(K, n+1, base, base)`` (on the host), each None where it was not asked for."""

    held_out: dict[str, torch.Tensor] | None = None
    science: dict[str, torch.Tensor] | None = None
    confusion: torch.Tensor | None = None


@torch.no_grad()
def evaluate(
    model: Transformer, spec: TaskSpec, sets: EvaluationSets, held_out: bool, science: bool, mechanism: bool
) -> Evaluation:
    """Per-place loss and accuracy on the held-out set (``held_out``); naive-sum probabilities, the
    carry-conditioned metrics, the mechanism metrics (``mechanism``) and the confusion matrices
    (``science``)."""
    stats = place_stats(model, sets.val_tokens, spec)
    out = Evaluation(held_out=place_metric_dict(stats, "val") if held_out else None)
    if not science:
        return out
    metrics = naive_sum_metric_dict(stats, sets.val_tokens, spec, "val")
    # One pass over the carry sets serves the carry metrics (its logits) and the probes (its stream).
    resid = None
    if sets.carry_sets.slices:  # none for a task without carries
        resid = model.residual(sets.carry_sets.tokens[:, :-1], last=spec.n_places)
        metrics.update(carry_metric_dict(model, sets.carry_sets, spec, model.logits(resid)))
    if mechanism:
        sample = sets.val_tokens[:, :MECHANISM_EXAMPLES]
        metrics.update(mechanism_metric_dict(model, sample, sets.carry_sets, spec, resid))
    out.science, out.confusion = metrics, confusion_matrices(stats).cpu()
    return out
