"""Q/K/V composition scores between heads of different layers (Elhage et al., 2021).

For an earlier head A (``W_OV^A = W_V^A W_O^A``) and a later head B, the score is
``||W_OV^A M_B||_F / (||W_OV^A||_F ||M_B||_F)`` with ``M_B = W_QK^B = W_Q^B W_K^B^T`` (Q-composition),
``W_QK^B^T`` (K-composition) or ``W_OV^B`` (V-composition), in TransformerLens' row-vector
convention (``x W``). By submultiplicativity of the Frobenius norm it lies in [0, 1]. Computed with
``TransformerBridge.all_composition_scores``; LayerNorms are ignored, as in the paper.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from addrepro.interp.common import Subject, analysis_title, new_figure, subject_info

COMPOSITION_MODES = ("Q", "K", "V")


@torch.no_grad()
def scores(subject: Subject) -> dict[str, torch.Tensor]:
    """``{mode: (n_layers, n_heads, n_layers, n_heads)}``, zero where the left head is not earlier."""
    return {mode: subject.bridge.all_composition_scores(mode).scores.detach().float() for mode in COMPOSITION_MODES}


def hand_score(w_ov_a: torch.Tensor, right_b: torch.Tensor) -> float:
    """The formula itself, on explicit ``d_model x d_model`` matrices."""
    return ((w_ov_a @ right_b).norm() / (w_ov_a.norm() * right_b.norm())).item()


def run(subject: Subject) -> dict:
    if subject.n_layers < 2:  # no earlier head for any head to read from
        raise ValueError(
            f"analysis=composition needs a model of at least 2 layers: this one has {subject.n_layers} (model.depth)"
        )
    heads = subject.head_names()
    out = {"analysis": "composition", **subject_info(subject), "heads": heads, "pairs": {}, "matrix": {}}
    h = subject.n_heads
    for mode, s in scores(subject).items():
        flat = s.reshape(len(heads), len(heads))
        out["matrix"][mode] = flat  # [earlier head][later head]
        out["pairs"][mode] = {
            f"{heads[i]}->{heads[k]}": flat[i, k].item()
            for i in range(len(heads))
            for k in range(len(heads))
            if i // h < k // h
        }
    return out


def summarize(result: dict) -> dict[str, float]:
    return {f"{mode}/{pair}": v for mode, pairs in result["pairs"].items() for pair, v in pairs.items()}


def plot(result: dict) -> Any:
    fig, axes = new_figure(1, 3, width=4.5, height=4.0)
    heads = result["heads"]
    for ax, mode in zip(axes[0], COMPOSITION_MODES, strict=True):
        im = ax.imshow(np.asarray(result["matrix"][mode]), cmap="viridis", vmin=0, aspect="auto")
        ax.set_xticks(range(len(heads)), heads, rotation=90, fontsize=7)
        ax.set_yticks(range(len(heads)), heads, fontsize=7)
        ax.set_xlabel("later head (reads)")
        ax.set_ylabel("earlier head (writes)")
        ax.set_title(f"{mode}-composition")
        fig.colorbar(im, ax=ax)
    fig.suptitle(analysis_title(result, "composition scores"))
    fig.tight_layout()
    return fig
