"""Linear probes on the residual stream, and its PCA coloured by carry case.

Targets, per place j: ``carry`` (the carry into j, places >= 1 of task=add), ``generate``
(``a_j + b_j >= base``), ``propagate`` (``a_j + b_j = base - 1``; both places < n) and ``digit`` (the
answer digit at place j). Features: the residual stream before every layer (``hook_resid_pre``) and
after the last (``resid_final``), at every input position.

Probe: closed-form ridge regression of the one-hot target on the features (plus a constant),
predicting the arg-max, fitted on the first ``1 - test_fraction`` of a fixed set (the run's
validation set) and scored on the rest. ``baseline`` is the test accuracy of always predicting the
training set's most common class, so a probe that finds nothing scores about that.

PCA: the top two principal components of each residual point at place j's answer position,
with the carry into j for colour.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from addrepro.interp.common import (
    Subject,
    analysis_title,
    answer_positions,
    answer_targets,
    inputs,
    naive_digits,
    new_figure,
    subject_info,
)
from addrepro.metrics.ridge import ridge_weights
from addrepro.task.encoding import operands_from_tokens
from addrepro.task.spec import TaskSpec

TARGETS = ("carry", "generate", "propagate", "digit")


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, test_fraction: float = 0.25, ridge: float = 1e-2):
    """Ridge probe(s) of labels ``y (N,)`` on features ``x (..., N, d)``; returns test accuracy ``(...)``.

    Features are standardised on the training part; ``ridge`` is relative to the mean feature variance
    (1 after standardising), so it means the same for every layer's scale."""
    x = x.double()
    n_train = int(round(len(y) * (1 - test_fraction)))
    mean = x[..., :n_train, :].mean(-2, keepdim=True)
    std = x[..., :n_train, :].std(-2, keepdim=True).clamp(min=1e-6)
    x = (x - mean) / std
    x = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # (..., N, d+1)
    onehot = torch.nn.functional.one_hot(y, n_classes).double()
    xt, yt = x[..., :n_train, :], onehot[:n_train]
    w = ridge_weights(xt, yt, ridge)  # (..., d+1, classes)
    pred = (x[..., n_train:, :] @ w).argmax(-1)
    return (pred == y[n_train:]).double().mean(-1)


def majority_baseline(y: torch.Tensor, n_classes: int, test_fraction: float = 0.25) -> float:
    n_train = int(round(len(y) * (1 - test_fraction)))
    common = torch.bincount(y[:n_train], minlength=n_classes).argmax()
    return float((y[n_train:] == common).double().mean())


def labels(tokens: torch.Tensor, spec: TaskSpec) -> dict[str, dict[int, torch.Tensor]]:
    """``{target: {place: labels (N,)}}`` for every target defined at the place."""
    a, b = operands_from_tokens(tokens, spec)
    _, carry = naive_digits(tokens, spec)
    digits = answer_targets(tokens, spec)
    out: dict[str, dict[int, torch.Tensor]] = {t: {} for t in TARGETS}
    for j in range(spec.n_places):
        if j >= 1 and spec.task == "add":
            out["carry"][j] = carry[:, j]
        if j < spec.n_digits:
            out["generate"][j] = (a[:, j] + b[:, j] >= spec.base).long()
            out["propagate"][j] = (a[:, j] + b[:, j] == spec.base - 1).long()
        out["digit"][j] = digits[:, j]
    return out


def pca2(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Coordinates on the top two principal components ``(N, 2)`` and their explained variance ratios."""
    x = x.double() - x.double().mean(0)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    var = s**2 / max(float((s**2).sum()), 1e-30)
    return x @ v[:2].T, var[:2].tolist()


def check_options(
    max_examples: int = 2048, test_fraction: float = 0.25, ridge: float = 1e-2, pca_points: int = 512
) -> None:
    """Raise ValueError naming the option for a value ``run`` cannot use (before a model is loaded)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"probes.test_fraction={test_fraction!r} is invalid: must be a number in (0, 1)")
    if not 1e-9 <= ridge <= 1e6:  # below, the standardised Gram matrix is singular in float32
        raise ValueError(f"probes.ridge={ridge!r} is invalid: must be a number in [1e-9, 1e6]")
    n_train = int(round(max_examples * (1 - test_fraction)))
    if n_train < 8 or max_examples - n_train < 2:  # a probe needs examples to fit and to score
        raise ValueError(
            f"probes.max_examples={max_examples} with test_fraction={test_fraction} leaves {n_train} examples to fit "
            f"and {max_examples - n_train} to score: at least 8 and 2"
        )
    if pca_points < 3:
        raise ValueError(f"probes.pca_points={pca_points} is invalid: a PCA of the residual needs at least 3 points")


@torch.no_grad()
def run(
    subject: Subject, max_examples: int = 2048, test_fraction: float = 0.25, ridge: float = 1e-2, pca_points: int = 512
) -> dict:
    bridge, spec = subject.bridge, subject.spec
    tokens = subject.val_tokens[:max_examples]
    check_options(len(tokens), test_fraction, ridge, pca_points)  # the validation set may hold fewer
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(subject.n_layers)]
    final = f"blocks.{subject.n_layers - 1}.hook_resid_post"
    _, cache = bridge.run_with_cache(inputs(tokens), names_filter=lambda n: n in (*names, final))
    resid = torch.stack([cache[n] for n in (*names, final)]).permute(0, 2, 1, 3)  # (R, T, N, d)
    points = [f"resid_pre_{layer}" for layer in range(subject.n_layers)] + ["resid_final"]
    y = labels(tokens, spec)
    accuracy: dict[str, dict[str, Any]] = {}
    for target, per_place in y.items():
        for j, lab in per_place.items():
            n_classes = spec.base if target == "digit" else 2
            acc = fit_probe(resid, lab, n_classes, test_fraction, ridge)  # (R, T)
            accuracy[f"place_{j}/{target}"] = {"accuracy": acc, "baseline": majority_baseline(lab, n_classes)}
    _, carry = naive_digits(tokens, spec)
    pca = {}
    for j, pos in enumerate(answer_positions(spec)):
        per_point = {}
        for r, point in enumerate(points):
            coords, var = pca2(resid[r, pos, :pca_points])
            per_point[point] = {"coords": coords.float(), "explained": var}
        pca[f"place_{j}"] = {"carry": carry[:pca_points, j], "points": per_point}
    return {
        "analysis": "probes",
        **subject_info(subject),
        "n_examples": len(tokens),
        "test_fraction": test_fraction,
        "ridge": ridge,
        "points": points,
        "positions": answer_positions(spec),
        "token_labels": spec.token_labels()[:-1],
        "accuracy": accuracy,
        "pca": pca,
    }


def summarize(result: dict) -> dict[str, float]:
    """Per place and target: test accuracy at the place's answer position after the last layer, and the
    best over all residual points and positions."""
    out = {}
    for key, d in result["accuracy"].items():
        place = int(key.split("/")[0].removeprefix("place_"))
        acc = np.asarray(d["accuracy"], dtype=float)
        out[f"{key}_final"] = float(acc[-1, result["positions"][place]])
        out[f"{key}_best"] = float(acc.max())
    return out


def plot(result: dict) -> Any:
    keys = list(result["accuracy"])
    places = sorted({k.split("/")[0] for k in keys}, key=lambda p: int(p.removeprefix("place_")))
    fig, axes = new_figure(len(places), 5, width=3.6, height=2.8)
    for row, place in zip(axes, places, strict=False):
        for ax, target in zip(row[:4], TARGETS, strict=False):
            d = result["accuracy"].get(f"{place}/{target}")
            if d is None:
                ax.axis("off")
                continue
            acc = np.asarray(d["accuracy"], dtype=float)
            im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(result["points"])), result["points"], fontsize=6)
            ax.set_xticks(range(acc.shape[1]), result["token_labels"], fontsize=6, rotation=90)
            ax.set_title(f"{place} {target} (baseline {d['baseline']:.2f})", fontsize=8)
            fig.colorbar(im, ax=ax)
        p = result["pca"][place]
        coords = np.asarray(p["points"]["resid_final"]["coords"], dtype=float)
        carry = np.asarray(p["carry"])
        ax = row[4]
        for c, colour in ((0, "tab:blue"), (1, "tab:red")):
            sel = carry == c
            ax.scatter(coords[sel, 0], coords[sel, 1], s=4, c=colour, label=f"carry in {c}")
        ax.set_title(f"{place}: PCA of the final residual", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(analysis_title(result, "linear probes"))
    fig.tight_layout()
    return fig
