"""Per-example breakdowns of each place's loss: over the operand pair, by carry case, and split into
where the loss comes from.

Grid: for place j < n the pair is ``(a_j, b_j)``; for the carry-out (place n) it is the top pair
``(a_{n-1}, b_{n-1})``, the pair that decides most of it. Every cell gets ``per_cell`` sequences
with that pair and uniform other digits (a fixed seed), so every cell is measured equally well.
Per cell: the mean loss and ``P(naive + k)`` for k = 0 .. base-1, naive = ``(a_j + b_j) mod base``
(0 for the carry-out), so ``k = 1`` is the mass on "a carry came in". ``by_sum`` averages the cells
with the same ``a_j + b_j`` (all equally likely given the sum).

Decomposition, on the validation set (per place) and on every carry-conditioned set (at its
place): with ``p`` the probability of the right digit and ``m`` the mean mass off naive+0 and
naive+1 (the right digit is always one of them),

    E[-log p] = -log(1 - m)                    "other": mass on digits that are never right
              + -log(E[p] / (1 - m))           "split": a wrong split between +0 and +1
              + (E[-log p] + log E[p])         "spread": per-example spread (the Jensen gap, >= 0)

which adds up to the loss exactly (the first two telescope to -log E[p]).
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
    subject_info,
    subject_logits,
)
from addrepro.task.encoding import encode, sample_operands
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec

TERMS = ("other", "split", "spread")


def grid_tokens(spec: TaskSpec, place: int, per_cell: int, seed: int = 11) -> torch.Tensor:
    """``per_cell`` sequences for every ``(x, y)`` of the place's pair, cell-major: ``(base^2 * per_cell, T)``."""
    g = torch.Generator().manual_seed(seed + place)
    base = spec.base
    pair = min(place, spec.n_digits - 1)
    a, b = sample_operands(spec, base * base * per_cell, g)
    cells = torch.arange(base * base).repeat_interleave(per_cell)
    a, b = a.clone(), b.clone()
    a[:, pair], b[:, pair] = cells // base, cells % base
    return encode(a, b, spec)


@torch.no_grad()
def shifted_log_probs(logits: torch.Tensor, naive: torch.Tensor) -> torch.Tensor:
    """``log P(naive + k)`` for k = 0 .. base-1 ``(..., base)`` from logits ``(..., base)``."""
    base = logits.shape[-1]
    idx = torch.remainder(naive[..., None] + torch.arange(base), base)
    return logits.double().log_softmax(-1).gather(-1, idx)


def decompose(logp_right: torch.Tensor, logp_shift: torch.Tensor) -> dict[str, float]:
    """The loss decomposition of one set of examples: ``logp_right`` ``(N,)`` is log p of the right
    digit, ``logp_shift`` ``(N, base)`` is log P(naive + k). Terms add up to ``loss`` exactly."""
    logp_right, probs = logp_right.double(), logp_shift.double().exp()
    loss = float(-logp_right.mean())
    mean_p = float(logp_right.exp().mean())
    near = probs[:, 0] + (probs[:, 1] if probs.shape[1] > 1 else 0)
    m = float(1 - near.mean()) if probs.shape[1] > 2 else 0.0
    m = min(max(m, 0.0), 1.0 - 1e-300)
    other = -float(np.log1p(-m))
    split = -float(np.log(mean_p)) - other
    n = len(logp_right)
    return {
        "loss": loss,
        # standard error of the loss from the set's size (its examples are independent draws)
        "loss_se": float(logp_right.std(unbiased=True) / n**0.5) if n > 1 else 0.0,
        "n": n,
        "other": other,
        "split": split,
        "spread": loss + float(np.log(mean_p)),
        "m": m,
        "mean_p": mean_p,
        "p_plus0": float(probs[:, 0].mean()),
        "p_plus1": float(probs[:, 1].mean()) if probs.shape[1] > 1 else 0.0,
    }


@torch.no_grad()
def run(subject: Subject, per_cell: int = 16) -> dict:
    spec = subject.spec
    base, places = spec.base, spec.n_places
    sets = subject.carry_sets or CarrySets.build(spec)

    grid = {}
    for j in range(places):
        tokens = grid_tokens(spec, j, per_cell)
        logits = subject_logits(subject, tokens)[:, j]  # (N, base)
        naive, _ = naive_digits(tokens, spec)
        target = answer_targets(tokens, spec)[:, j]
        logp = logits.double().log_softmax(-1)
        loss = -logp.gather(-1, target[:, None]).squeeze(-1)
        shift = shifted_log_probs(logits, naive[:, j]).exp()
        loss_grid = loss.view(base, base, per_cell).mean(-1)
        shift_grid = shift.view(base, base, per_cell, base).mean(2)  # (x, y, k)
        sums = torch.arange(base)[:, None] + torch.arange(base)[None, :]
        by_sum = [float(loss_grid[sums == s].mean()) for s in range(2 * base - 1)]
        grid[j] = {"loss": loss_grid, "p_shift": shift_grid, "by_sum": by_sum}

    decomposition: dict[str, Any] = {"val": {}, "carry": {}}
    for key, tokens in (("val", subject.val_tokens), ("carry", sets.tokens)):
        if len(tokens) == 0:
            continue
        logits = subject_logits(subject, tokens)
        naive, _ = naive_digits(tokens, spec)
        shift = shifted_log_probs(logits, naive)  # (N, P, base)
        right = logits.double().log_softmax(-1).gather(-1, answer_targets(tokens, spec)[..., None]).squeeze(-1)
        if key == "val":
            decomposition["val"] = {f"place_{j}": decompose(right[:, j], shift[:, j]) for j in range(places)}
        else:
            for name, (j, lo, hi) in sets.slices.items():
                decomposition["carry"][name] = decompose(right[lo:hi, j], shift[lo:hi, j])
    return {
        "analysis": "breakdown",
        **subject_info(subject),
        "places": list(range(places)),
        "base": base,
        "per_cell": per_cell,
        "grid": {f"place_{j}": g for j, g in grid.items()},
        "decomposition": decomposition,
    }


def summarize(result: dict) -> dict[str, float]:
    """Validation loss terms per place, and the loss of every carry-conditioned set."""
    out = {f"{place}/{t}": d[t] for place, d in result["decomposition"]["val"].items() for t in TERMS}
    out |= {f"sets/{name}": d["loss"] for name, d in result["decomposition"]["carry"].items()}
    return out


def plot(result: dict) -> Any:
    places = result["places"]
    base = result["base"]
    carry = result["decomposition"]["carry"]
    # A row per place, then one row for the sets' table (a line per set, text that can be read) and
    # the validation loss's terms.
    table_height = max(3.0, 0.24 * len(carry) + 1.2)
    fig = plt.figure(figsize=(14.4, 3.0 * len(places) + table_height + 0.6))
    grid = fig.add_gridspec(len(places) + 1, 4, height_ratios=[3.0] * len(places) + [table_height])
    for r, j in enumerate(places):
        row = [fig.add_subplot(grid[r, c]) for c in range(4)]
        g = result["grid"][f"place_{j}"]
        shift = np.asarray(g["p_shift"])
        panels = (
            (np.asarray(g["loss"]), "loss", "viridis"),
            (shift[..., 0], "P(naive+0)", "magma"),
            (shift[..., 1] if base > 1 else shift[..., 0] * 0, "P(naive+1)", "magma"),
        )
        pair = min(j, len(places) - 2)
        for ax, (values, title, cmap) in zip(row, panels, strict=False):
            im = ax.imshow(values, cmap=cmap, origin="lower")
            digits = range(0, base, 1 if base <= 10 else 2)
            ax.set_xticks(digits)
            ax.set_yticks(digits)
            ax.set_xlabel(f"b{pair}")
            ax.set_ylabel(f"a{pair}")
            ax.set_title(f"place {j}: {title}", fontsize=9)
            ax.figure.colorbar(im, ax=ax)
        row[3].plot(range(len(g["by_sum"])), g["by_sum"], marker=".")
        row[3].axvline(base - 0.5, color="grey", lw=0.5)
        row[3].set_xlabel(f"a{pair} + b{pair}")
        row[3].set_title(f"place {j}: loss by pair sum", fontsize=9)
    if carry:
        ax = fig.add_subplot(grid[-1, :2])
        names = list(carry)
        cols = ("loss", *TERMS, "p_plus0", "p_plus1")
        values = np.array([[carry[n][c] for c in cols] for n in names])
        # Each column coloured on its own scale: losses and probabilities differ by orders of magnitude.
        span = values.max(0) - values.min(0)
        shade = (values - values.min(0)) / np.where(span > 0, span, 1)
        ax.imshow(shade, cmap="viridis", aspect="auto", vmin=0, vmax=1)
        for (r, c), v in np.ndenumerate(values):
            ink = "black" if shade[r, c] > 0.6 else "white"  # dark text on viridis' light end
            se = carry[names[r]].get("loss_se") if cols[c] == "loss" else None
            shown = f"{v:.3g} ± {se:.2g}" if se is not None else f"{v:.3g}"
            ax.text(c, r, shown, ha="center", va="center", fontsize=7.5, color=ink)
        short = [
            n.replace("carry/place_", "place ").replace("/cin_", ", carry in ").replace("chain/place_", "place ")
            for n in names
        ]
        short = [n.replace("/len_", ", chain length ") for n in short]
        ax.set_yticks(range(len(names)), short, fontsize=8)
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.xaxis.tick_top()
        ax.set_title(
            "carry-conditioned sets: loss ± its standard error, and its terms (colour: within each column)",
            fontsize=9,
            pad=18,
        )
    val = result["decomposition"]["val"]
    ax = fig.add_subplot(grid[-1, 2:])
    bottom = np.zeros(len(places))
    for t in TERMS:
        v = np.array([val[f"place_{j}"][t] for j in places])
        ax.bar(places, v, bottom=bottom, label=t)
        bottom += v
    ax.set_xticks(places)
    ax.set_xlabel("place")
    ax.set_ylabel("loss (nats)")
    ax.set_title("validation loss = other + split + spread", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(analysis_title(result, "breakdown"))
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig
