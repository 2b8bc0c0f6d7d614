"""Mean attention patterns from the answer-predicting positions, per head (``hook_pattern``).

``pattern[l][h][j][k]``: mean attention (over the validation set) of head ``h`` of layer ``l`` from
the position predicting place ``j`` (place-indexed: 0 = units) to input position ``k``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from addrepro.interp.common import Subject, analysis_title, answer_positions, inputs, new_figure, subject_info


@torch.no_grad()
def mean_patterns(subject: Subject, tokens: torch.Tensor) -> torch.Tensor:
    """``(n_layers, n_heads, n+1, T)`` mean attention from each place's predicting position."""
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(subject.n_layers)}
    _, cache = subject.bridge.run_with_cache(inputs(tokens), names_filter=lambda n: n in names)
    pos = answer_positions(subject.spec)
    return torch.stack(
        [cache[f"blocks.{layer}.attn.hook_pattern"][:, :, pos].mean(0) for layer in range(subject.n_layers)]
    )


def operand_positions(subject: Subject, place: int) -> list[int]:
    """Input positions of ``a_place`` and ``b_place`` (none for the carry-out place)."""
    n = subject.spec.n_digits
    if place >= n:
        return []
    return [n - 1 - place, 2 * n - place]


def run(subject: Subject, max_examples: int = 1024, top: int = 3) -> dict:
    spec = subject.spec
    patterns = mean_patterns(subject, subject.val_tokens[:max_examples])
    labels = spec.token_labels()
    key_labels = labels[:-1]
    pos = answer_positions(spec)
    heads = {}
    for layer in range(subject.n_layers):
        for h in range(subject.n_heads):
            p = patterns[layer, h]
            heads[f"L{layer}H{h}"] = {
                "top": {
                    f"place_{j}": [[key_labels[k], p[j, k].item()] for k in p[j].argsort(descending=True)[:top]]
                    for j in range(spec.n_places)
                },
                "own_operands": [p[j, operand_positions(subject, j)].sum().item() for j in range(spec.n_places)],
            }
    return {
        "analysis": "attention",
        **subject_info(subject),
        "n_examples": min(max_examples, len(subject.val_tokens)),
        "places": list(range(spec.n_places)),
        "query_positions": pos,
        "query_labels": [f"{key_labels[p]}→c{j}" for j, p in enumerate(pos)],
        "key_labels": key_labels,
        "pattern": patterns,  # (n_layers, n_heads, n+1, T)
        "heads": heads,  # per head: top keys per place; attention on a_j + b_j per place
    }


def summarize(result: dict) -> dict[str, float]:
    """Attention from each place's position to its own operand digits a_j, b_j, per head."""
    return {
        f"{name}/place_{j}": v
        for name, d in result["heads"].items()
        for j, v in enumerate(d["own_operands"])
        if j < len(result["places"]) - 1
    }


def plot(result: dict) -> Any:
    pattern = np.asarray(result["pattern"])
    n_layers, n_heads = pattern.shape[:2]
    fig, axes = new_figure(n_layers, n_heads, width=4.5, height=0.4 * pattern.shape[2] + 1.2)
    for layer in range(n_layers):
        for h in range(n_heads):
            ax = axes[layer, h]
            image = ax.imshow(pattern[layer, h], cmap="Blues", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(result["key_labels"])), result["key_labels"], fontsize=7, rotation=90)
            ax.set_yticks(range(len(result["query_labels"])), result["query_labels"], fontsize=7)
            ax.set_title(f"L{layer}H{h}", fontsize=9)
    fig.suptitle(analysis_title(result, "mean attention from answer-predicting positions"))
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar = fig.colorbar(image, cax=fig.add_axes((0.92, 0.2, 0.015, 0.6)))
    bar.set_label("mean attention", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig
