"""Every place's loss and naive-sum probabilities split by any input feature, with standard errors.

Features of an example (j a place, LSB-indexed as everywhere in addrepro):

* ``a_j``, ``b_j``: the operand digits at place j;
* ``s_j``: their sum a_j + b_j (0 .. 2 base - 2);
* ``carry_j``: the carry into place j (``carry_n`` is the carry-out);
* ``chain_j``: the carry-chain length below place j (consecutive pairs right below it summing to base - 1);
* ``c_j``: the answer digit at place j — the answer prefix a place written after it has already read.

``by=[f, g, ...]`` splits the examples into cells, one per combination of values seen. Examples are every
pair of operands when there are at most ``size`` of them (the cells are then exact), else ``size``
uniform draws (seed ``seed``): per cell and place, the mean loss, exact-match accuracy and P(naive + k)
(k = 0, 1), each with its standard error over the cell's examples.

With a single feature ``a_{j-1}`` or ``b_{j-1}`` and place j, the odds P(+0) : P(+1) of a model that reads
that one digit of the pair below and nothing else are (base - d) : d, d the digit's value: the carry into j
comes when the other digit is at least base - d (ignoring the carry into the pair below, which adds less than
1/base). ``predicted_plus1`` holds d / base beside the measured P(+1) / (P(+0) + P(+1)).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from addrepro.interp.breakdown import shifted_log_probs
from addrepro.interp.common import (
    Subject,
    analysis_title,
    answer_targets,
    naive_digits,
    subject_info,
    subject_logits,
    token_losses,
)
from addrepro.task.encoding import answer_digits, carries_in, encode, operands_from_tokens, sample_operands
from addrepro.task.sets import chain_length
from addrepro.task.spec import TaskSpec

FEATURE = re.compile(r"(a|b|s|carry|chain|c)_(\d+)")
KINDS = ("a", "b", "s", "carry", "chain", "c")


def check_feature(name: Any, spec: TaskSpec | None = None) -> tuple[str, int]:
    """``(kind, place)`` of a feature name; ``ValueError`` naming what is allowed otherwise."""
    found = FEATURE.fullmatch(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(
            f"{name!r} is not a feature: give a_j, b_j, s_j (a_j + b_j), carry_j, chain_j or c_j (j a place)"
        )
    kind, place = found.group(1), int(found.group(2))
    if spec is not None:
        top = spec.n_digits if kind in ("carry", "chain", "c") else spec.n_digits - 1
        if place > top:
            raise ValueError(f"{name} is not a feature of {spec.n_digits}-digit addition: {kind}_j needs j in 0..{top}")
    return kind, place


def feature_values(name: str, a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Value ``(N,)`` of feature ``name`` for place-indexed operand digits ``a``, ``b`` ``(N, n)``."""
    kind, j = check_feature(name, spec)
    if kind == "a":
        return a[:, j]
    if kind == "b":
        return b[:, j]
    if kind == "s":
        return a[:, j] + b[:, j]
    if kind == "carry":
        return carries_in(a, b, spec)[:, j]
    if kind == "chain":
        return chain_length(a, b, j, spec.base)
    return answer_digits(a, b, spec)[:, j]


def examples(spec: TaskSpec, size: int, seed: int) -> tuple[torch.Tensor, bool]:
    """Tokens ``(N, T)``: every pair of operands when there are at most ``size``, else ``size`` uniform
    draws; and whether they are every pair (exact cells)."""
    n_pairs = spec.base ** (2 * spec.n_digits)
    if n_pairs <= size:
        index = torch.arange(n_pairs)
        digits = torch.stack([(index // spec.base**i) % spec.base for i in range(2 * spec.n_digits)], -1)
        return encode(digits[:, : spec.n_digits], digits[:, spec.n_digits :], spec), True
    a, b = sample_operands(spec, size, torch.Generator().manual_seed(seed))
    return encode(a, b, spec), False


def _mean_and_error(x: torch.Tensor) -> tuple[float, float]:
    """Mean of ``x`` ``(N,)`` and its standard error (0 for a single example)."""
    x = x.double()
    n = len(x)
    error = float(x.std(unbiased=True) / n**0.5) if n > 1 else 0.0
    return float(x.mean()), error


@torch.no_grad()
def scores(logits: torch.Tensor, targets: torch.Tensor, naive: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per example and place ``(N, P)``: loss, exact match of the argmax, P(naive + 0), P(naive + 1)."""
    shift = shifted_log_probs(logits, naive).exp()  # (N, P, base)
    return {
        "loss": token_losses(logits.double(), targets),
        "acc": (logits.argmax(-1) == targets).double(),
        "p_plus0": shift[..., 0],
        "p_plus1": shift[..., 1] if shift.shape[-1] > 1 else torch.zeros_like(shift[..., 0]),
    }


def measure(subject: Subject, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``scores`` of the model on ``tokens`` against their own answers."""
    naive, _ = naive_digits(tokens, subject.spec)
    return scores(subject_logits(subject, tokens), answer_targets(tokens, subject.spec), naive)


def cells(values: dict[str, torch.Tensor], measured: dict[str, torch.Tensor]) -> list[dict]:
    """One record per combination of feature values seen: its values, count, and per place the mean and
    standard error of every measured quantity."""
    names = list(values)
    stacked = torch.stack([values[n] for n in names], -1)  # (N, F)
    combos, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    out = []
    for c, combo in enumerate(combos.tolist()):
        mask = inverse == c
        record: dict[str, Any] = {"values": dict(zip(names, combo, strict=True)), "count": int(mask.sum())}
        for key, x in measured.items():
            stats = [_mean_and_error(x[mask, j]) for j in range(x.shape[1])]
            record[key] = [m for m, _ in stats]
            record[f"{key}_se"] = [e for _, e in stats]
        out.append(record)
    return out


def odds_feature(by: list[str], spec: TaskSpec) -> tuple[int, str] | None:
    """``(place j, feature)`` when ``by`` is one operand digit of the pair right below a place j >= 1."""
    if len(by) != 1 or spec.task != "add":
        return None
    kind, i = check_feature(by[0], spec)
    return (i + 1, by[0]) if kind in ("a", "b") else None


def check_options(by: list | None = None, size: int = 20_000, seed: int = 0, confusion: int | None = None) -> None:
    if confusion is not None and (type(confusion) is not int or confusion < 0):
        raise ValueError(f"condition.confusion={confusion!r} is invalid: must be null or a place (an integer >= 0)")
    if not isinstance(by, list) or not by or len(by) > 4:
        raise ValueError(
            f"condition.by={by!r} is invalid: must be a list of 1 to 4 features, e.g. [a_0] or [s_1,carry_1]"
        )
    for name in by:
        check_feature(name)
    if len(set(by)) != len(by):
        raise ValueError(f"condition.by={by!r} is invalid: names a feature twice")


def confusions(values: dict[str, torch.Tensor], probs: torch.Tensor, targets: torch.Tensor, base: int) -> list:
    """Per cell (in ``cells``' order): the mean predicted distribution of each true digit ``(base, base)``
    (row: the true digit, column: the predicted one; NaN rows for digits the cell never has)."""
    stacked = torch.stack(list(values.values()), -1)
    _, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    out = []
    for c in range(int(inverse.max()) + 1):
        mask = inverse == c
        matrix = torch.full((base, base), float("nan"), dtype=torch.float64)
        for t in range(base):
            rows = probs[mask & (targets == t)]
            if len(rows):
                matrix[t] = rows.double().mean(0)
        out.append(matrix)
    return out


@torch.no_grad()
def run(
    subject: Subject, by: list | None = None, size: int = 20_000, seed: int = 0, confusion: int | None = None
) -> dict:
    spec = subject.spec
    by = list(by or ["a_0"])
    check_options(by, size, seed, confusion)
    for name in by:
        check_feature(name, spec)
    if confusion is not None and confusion >= spec.n_places:
        raise ValueError(f"condition.confusion={confusion} is invalid: this task's places are 0..{spec.n_places - 1}")
    tokens, exact = examples(spec, size, seed)
    a, b = operands_from_tokens(tokens, spec)
    values = {name: feature_values(name, a, b, spec) for name in by}
    if confusion is not None:  # the confusion matrix of one place, per cell
        probs = subject_logits(subject, tokens)[:, confusion].float().softmax(-1)
        by_cell = confusions(values, probs, answer_targets(tokens, spec)[:, confusion], spec.base)
    result = {
        "analysis": "condition",
        **subject_info(subject),
        "places": list(range(spec.n_places)),
        "base": spec.base,
        "by": by,
        "examples": len(tokens),
        "exact": exact,
        "cells": cells(values, measure(subject, tokens)),
    }
    if confusion is not None:
        result["confusion_place"] = confusion
        for cell, matrix in zip(result["cells"], by_cell, strict=True):
            cell["confusion"] = matrix
    odds = odds_feature(by, spec)
    if odds is not None:
        j, name = odds
        result["odds_place"] = j
        for cell in result["cells"]:
            cell["predicted_plus1"] = cell["values"][name] / spec.base
    return result


def summarize(result: dict) -> dict[str, float]:
    """Per place, the spread of the loss over the cells (largest minus smallest cell mean)."""
    out = {}
    for j in result["places"]:
        losses = [c["loss"][j] for c in result["cells"]]
        out[f"place_{j}/loss_range"] = max(losses) - min(losses)
    return out


def cell_label(values: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def plot(result: dict, most: int = 12) -> Any:
    """The loss per cell and place; the naive + 1 share against (base - d) : d when ``by`` is one digit of
    the pair below a place; the chosen place's confusion matrix per cell (the first ``most``)."""
    places, cells_ = result["places"], result["cells"]
    odds = result.get("odds_place")
    shown = cells_[:most] if result.get("confusion_place") is not None else []
    n_top = 2 if odds is not None else 1
    width = max(5.0 * n_top, 0.35 * len(cells_) + 2, 1.3 * len(shown) + 1)
    fig = plt.figure(figsize=(width, 3.8 + (2.2 if shown else 0)), layout="constrained")
    outer = fig.add_gridspec(2 if shown else 1, 1, height_ratios=[3.8, 2.2] if shown else [1])
    top = outer[0].subgridspec(1, n_top)
    ax = fig.add_subplot(top[0, 0])
    x = np.arange(len(cells_))
    colours = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
    for j, colour in zip(places, itertools.cycle(colours), strict=False):
        mean = np.array([c["loss"][j] for c in cells_])
        se = np.array([c["loss_se"][j] for c in cells_])
        ax.errorbar(x, mean, yerr=se, marker="o", ms=3, lw=1, capsize=2, color=colour, label=f"place {j}")
    ax.set_xticks(x, [cell_label(c["values"]) for c in cells_], rotation=60, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("mean loss (nats) ± s.e.")
    ax.set_title(f"loss by {', '.join(result['by'])} ({'every pair' if result['exact'] else 'sampled'})", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    if odds is not None:
        ax = fig.add_subplot(top[0, 1])
        d = np.array([c["values"][result["by"][0]] for c in cells_])
        p0 = np.array([c["p_plus0"][odds] for c in cells_])
        p1 = np.array([c["p_plus1"][odds] for c in cells_])
        share = p1 / np.maximum(p0 + p1, 1e-30)
        ax.plot(d, share, "o-", color="#0072B2", label="measured P(+1) / (P(+0) + P(+1))")
        ax.plot(
            d,
            [c["predicted_plus1"] for c in cells_],
            "--",
            color="#D55E00",
            label=f"(b − d) : d  →  d / {result['base']}",
        )
        ax.set_xlabel(result["by"][0])
        ax.set_ylim(0, 1)
        ax.set_title(f"place {odds}: naive + 1 against naive + 0", fontsize=8)
        ax.legend(fontsize=6)
    if shown:
        bottom = outer[1].subgridspec(1, len(shown))
        axes = [fig.add_subplot(bottom[0, i]) for i in range(len(shown))]
        for i, (ax, cell) in enumerate(zip(axes, shown, strict=True)):
            image = ax.imshow(np.asarray(cell["confusion"], dtype=float), vmin=0, vmax=1, cmap="magma")
            ax.set_title(cell_label(cell["values"]), fontsize=6)
            ax.set_xticks(range(result["base"]))
            ax.set_yticks(range(result["base"]))
            ax.tick_params(labelsize=5)
            ax.set_xlabel("predicted", fontsize=6)
            if i == 0:
                ax.set_ylabel(f"place {result['confusion_place']}: true digit", fontsize=6)
        fig.colorbar(image, ax=axes, shrink=0.8, label="mean probability")
    fig.suptitle(analysis_title(result, "condition"), fontsize=9)
    return fig
