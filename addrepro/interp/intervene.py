"""Token interventions: replace operand or answer-prefix tokens and see every place's loss and prediction move.

``set={c_5: not}`` replaces a token in every example before the model reads it: ``a_j`` and ``b_j`` are the
operand digits at place j, ``c_j`` the answer digit at place j (as part of the prefix that the places
written after it read). A value is a digit (``3``), ``+k`` (the token plus k, modulo the base) or
``not`` (1 - the token: the other carry-out). Only the tokens change — the rest of the sequence stays as
it was, so an edited operand leaves the answer prefix that followed from the original one.

Per place, before and after: the mean loss against the original answer and (when an operand changed)
against the answer of the edited operands, exact-match accuracy, P(naive + 0) and P(naive + 1) with the
naive sum of the original operands, and the fraction of examples whose predicted digit changed; each
mean with its standard error. ``by=[...]`` (features of ``condition``, read from the original tokens)
splits every number into cells.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from addrepro.interp.common import (
    Subject,
    analysis_title,
    answer_targets,
    naive_digits,
    new_figure,
    subject_info,
    subject_logits,
)
from addrepro.interp.condition import cell_label, cells, check_feature, examples, feature_values, scores
from addrepro.task.encoding import answer_digits, operands_from_tokens
from addrepro.task.spec import TaskSpec


def token_position(name: str, spec: TaskSpec) -> int:
    """Sequence position of token ``a_j``, ``b_j`` or ``c_j``."""
    kind, j = check_feature(name, spec)
    n = spec.n_digits
    if kind == "a":
        return n - 1 - j
    if kind == "b":
        return 2 * n - j
    if kind == "c":
        return spec.answer_start + spec.emission_index[j]
    raise ValueError(f"{name} is not a token: intervene on a_j, b_j (operand digits) or c_j (answer digits)")


def check_value(name: str, value: Any) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or value == "not"
        or (isinstance(value, str) and value[:1] == "+" and value[1:].isdigit())
    ):
        raise ValueError(f"intervene.set.{name}={value!r} is invalid: must be a digit, +k (plus k mod base) or not")


def edited(tokens: torch.Tensor, changes: dict[str, Any], spec: TaskSpec) -> torch.Tensor:
    """``tokens`` with the tokens of ``changes`` replaced (a copy)."""
    out = tokens.clone()
    for name, value in changes.items():
        pos = token_position(name, spec)
        if isinstance(value, int):
            if not 0 <= value < spec.base:
                raise ValueError(f"intervene.set.{name}={value} is invalid: a digit is in 0..{spec.base - 1}")
            out[:, pos] = value
        elif value == "not":
            out[:, pos] = 1 - tokens[:, pos].clamp(max=1)
        else:
            out[:, pos] = torch.remainder(tokens[:, pos] + int(value[1:]), spec.base)
    return out


def check_options(set: dict | None = None, by: list | None = None, size: int = 20_000, seed: int = 0) -> None:  # noqa: A002 - the option's name
    if not isinstance(set, dict) or not set:
        raise ValueError(
            f"intervene.set={set!r} is invalid: give the tokens to replace, e.g. intervene.set={{c_5:not}}"
        )
    for name, value in set.items():
        kind, _ = check_feature(name)
        if kind not in ("a", "b", "c"):
            raise ValueError(f"intervene.set.{name} is invalid: only tokens can be replaced (a_j, b_j or c_j)")
        check_value(name, value)
    if by is not None and (not isinstance(by, list) or len(by) > 4):
        raise ValueError(f"intervene.by={by!r} is invalid: must be null or a list of up to 4 features")
    for name in by or []:
        check_feature(name)


@torch.no_grad()
def run(subject: Subject, set: dict | None = None, by: list | None = None, size: int = 20_000, seed: int = 0) -> dict:  # noqa: A002
    spec = subject.spec
    check_options(set, by, size, seed)
    for name in [*set, *(by or [])]:
        check_feature(name, spec)
    tokens, exact = examples(spec, size, seed)
    after_tokens = edited(tokens, set, spec)
    before_logits, after_logits = subject_logits(subject, tokens), subject_logits(subject, after_tokens)
    # Both scored against the original answer, with the original operands' naive sum; the edited
    # sequence also against the answer of its own operands.
    targets = answer_targets(tokens, spec)
    naive, _ = naive_digits(tokens, spec)
    before, after = scores(before_logits, targets, naive), scores(after_logits, targets, naive)
    a_new, b_new = operands_from_tokens(after_tokens, spec)
    after["loss_edited_answer"] = scores(after_logits, answer_digits(a_new, b_new, spec), naive)["loss"]
    after["changed"] = (after_logits.argmax(-1) != before_logits.argmax(-1)).double()
    a, b = operands_from_tokens(tokens, spec)
    values = {name: feature_values(name, a, b, spec) for name in by} if by else {"all": torch.zeros(len(tokens))}
    return {
        "analysis": "intervene",
        **subject_info(subject),
        "places": list(range(spec.n_places)),
        "base": spec.base,
        "set": dict(set),
        "by": list(by or []),
        "examples": len(tokens),
        "exact": exact,
        "before": cells(values, before),
        "after": cells(values, after),
    }


def summarize(result: dict) -> dict[str, float]:
    """Per place: the change of the mean loss (original answer) and the fraction of changed predictions,
    over all examples."""
    out = {}
    total = sum(c["count"] for c in result["before"])
    for j in result["places"]:
        before = sum(c["loss"][j] * c["count"] for c in result["before"]) / total
        after = sum(c["loss"][j] * c["count"] for c in result["after"]) / total
        out[f"place_{j}/loss_change"] = after - before
        out[f"place_{j}/changed"] = sum(c["changed"][j] * c["count"] for c in result["after"]) / total
    return out


def plot(result: dict) -> Any:
    places = result["places"]
    before, after = result["before"], result["after"]
    fig, axes = new_figure(1, 2, width=max(4.5, 0.5 * len(places) * max(len(before), 1) ** 0.5 + 2), height=3.4)
    x = np.arange(len(places))
    n = len(before)
    width = 0.8 / max(n, 1)
    labels = [cell_label(b["values"]) if result["by"] else "all examples" for b in before]
    # A legend names up to 12 cells; more are coloured in their order along a colour bar that names some.
    many = n > 12
    colours = [plt.cm.viridis(i / max(n - 1, 1)) if many else f"C{i % 10}" for i in range(n)]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        offset = (i - (n - 1) / 2) * width
        loss = np.array(a["loss"]) - np.array(b["loss"])
        axes[0][0].bar(x + offset, loss, width, yerr=a["loss_se"], label=labels[i], color=colours[i])
        axes[0][1].bar(x + offset, a["changed"], width, label=labels[i], color=colours[i])
    axes[0][0].axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("Δ mean loss (nats, original answer)")
    axes[0][1].set_ylabel("fraction of predictions changed")
    axes[0][1].set_ylim(0, 1)
    for ax in axes[0]:
        ax.set_xticks(x, [f"place {j}" for j in places], fontsize=7)
        if not many:
            ax.legend(fontsize=6)
    edits = ", ".join(f"{k}→{v}" for k, v in result["set"].items())
    fig.suptitle(analysis_title(result, f"intervene ({edits})"), fontsize=9)
    fig.tight_layout()
    if many:  # after the layout: the bar takes its room from both panels
        scale = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, n - 1))
        bar = fig.colorbar(scale, ax=axes[0].tolist(), fraction=0.03, pad=0.02)
        ticks = sorted({round(k) for k in np.linspace(0, n - 1, min(n, 6))})
        bar.set_ticks(ticks, labels=[labels[k] for k in ticks], fontsize=6)
        bar.set_label("cell (bars in this order)", fontsize=7)
    return fig
