"""Zero- and mean-ablation of every head, every whole MLP and every MLP neuron.

* a head: its ``blocks.{l}.attn.hook_z`` slice (so its whole output ``z_h W_O[h]`` goes);
* a whole MLP: ``blocks.{l}.hook_mlp_out`` (the output bias ``b_out`` goes with it);
* a neuron: its ``blocks.{l}.mlp.hook_post`` column.

"mean" replaces the activation by its mean over the validation set at the same position.
Each ablation reports the change of every place's loss on the validation set, and of the loss at
the conditioned place on every carry-conditioned set (``CarrySets``). Neurons are ranked by the
increase of the mean validation loss over all places; the top ``top_k`` are reported per mode.

Neurons of the last layer are ablated exactly without rerunning the model: their ablation only
adds ``-(post_n - fill_n) W_out[n]`` to the cached final residual, which is then put through the
final LayerNorm and unembedding. Neurons of earlier layers are ablated with hooks, several neurons
per forward pass (the batch is repeated, one copy per neuron).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from addrepro.interp.common import (
    EvalBatch,
    Subject,
    analysis_title,
    answer_logits,
    answer_positions,
    answer_targets,
    inputs,
    loss_delta,
    new_figure,
    subject_info,
    token_losses,
    unembed,
)

MODES = ("zero", "mean")


def components(subject: Subject) -> list[tuple[str, str, int | None]]:
    """``(name, hook name, head index or None)`` of every head and whole MLP."""
    out: list[tuple[str, str, int | None]] = []
    for layer in range(subject.n_layers):
        out += [(f"L{layer}H{h}", f"blocks.{layer}.attn.hook_z", h) for h in range(subject.n_heads)]
        if subject.has_mlp:
            out.append((f"L{layer}_mlp", f"blocks.{layer}.hook_mlp_out", None))
    return out


@torch.no_grad()
def position_means(bridge: Any, tokens: torch.Tensor, hook_names: set[str]) -> dict[str, torch.Tensor]:
    """Mean activation over the batch at every position, ``(T, ...)`` per hook."""
    _, cache = bridge.run_with_cache(inputs(tokens), names_filter=lambda name: name in hook_names)
    return {name: cache[name].mean(0) for name in hook_names}


def ablate(index: int | None, fill: torch.Tensor | None) -> Callable:
    """A hook replacing the activation (or its ``[:, :, index]`` slice) by 0 or by ``fill`` ``(T, ...)``."""

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        t = act.shape[1]
        value = 0.0 if fill is None else fill[:t]
        if index is None:
            act[:] = value
        else:
            act[:, :, index] = value if fill is None else value[:, index]
        return act

    return hook


def _losses(subject: Subject, batch: EvalBatch, hooks: list = ()) -> dict:
    logits = answer_logits(subject.bridge, batch.tokens, subject.spec, hooks)
    return batch.losses(token_losses(logits, answer_targets(batch.tokens, subject.spec)))


def component_ablations(subject: Subject, batch: EvalBatch, means: dict, baseline: dict) -> dict:
    out = {}
    for name, hook_name, index in components(subject):
        out[name] = {
            mode: loss_delta(
                _losses(subject, batch, [(hook_name, ablate(index, means[hook_name] if mode == "mean" else None))]),
                baseline,
            )
            for mode in MODES
        }
    return out


@torch.no_grad()
def _last_layer_neuron_losses(subject: Subject, batch: EvalBatch, fill: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token losses ``(N, B, n+1)`` with each last-layer neuron ablated, by patching the final residual."""
    bridge, spec = subject.bridge, subject.spec
    last = subject.n_layers - 1
    post_name, resid_name = f"blocks.{last}.mlp.hook_post", f"blocks.{last}.hook_resid_post"
    _, cache = bridge.run_with_cache(inputs(batch.tokens), names_filter=lambda n: n in (post_name, resid_name))
    pos = answer_positions(spec)
    post, resid = cache[post_name][:, pos], cache[resid_name][:, pos]  # (B, P, d_mlp), (B, P, d)
    delta = post - fill[pos]  # what each neuron adds beyond its fill value
    w_out = bridge.W_out[last]  # (d_mlp, d)
    targets = answer_targets(batch.tokens, spec)
    out = []
    for lo in range(0, w_out.shape[0], chunk):
        patched = resid[None] - torch.einsum("bpc,cd->cbpd", delta[..., lo : lo + chunk], w_out[lo : lo + chunk])
        logits = unembed(bridge, patched).float()  # (C, B, P, base)
        out.append(token_losses(logits, targets.expand(len(logits), *targets.shape)))
    return torch.cat(out)


@torch.no_grad()
def _hooked_neuron_losses(subject: Subject, batch: EvalBatch, layer: int, fill: torch.Tensor, chunk: int):
    """Per-token losses ``(N, B, n+1)`` with each neuron of ``layer`` ablated, ``chunk`` neurons per pass."""
    bridge, spec = subject.bridge, subject.spec
    d_mlp, n_seq = bridge.cfg.d_mlp, len(batch.tokens)
    targets = answer_targets(batch.tokens, spec)
    out = []
    for lo in range(0, d_mlp, chunk):
        neurons = list(range(lo, min(lo + chunk, d_mlp)))

        def hook(act: torch.Tensor, hook: Any = None, neurons: list[int] = neurons) -> torch.Tensor:
            act = act.clone().view(len(neurons), n_seq, *act.shape[1:])
            for c, n in enumerate(neurons):
                act[c, :, :, n] = fill[: act.shape[2], n]
            return act.view(-1, *act.shape[2:])

        tokens = batch.tokens.repeat(len(neurons), 1)
        logits = answer_logits(bridge, tokens, spec, [(f"blocks.{layer}.mlp.hook_post", hook)])
        out.append(token_losses(logits, targets.repeat(len(neurons), 1)).view(len(neurons), n_seq, -1))
    return torch.cat(out)


def neuron_ablations(
    subject: Subject, batch: EvalBatch, means: dict, baseline: dict, top_k: int = 20, max_batch: int = 16384
) -> dict:
    """Top ``top_k`` neurons per mode by mean validation-loss increase, with their per-place changes."""
    if not subject.has_mlp or top_k <= 0:
        return {mode: [] for mode in MODES}
    d_mlp = subject.bridge.cfg.d_mlp
    chunk = max(1, max_batch // len(batch.tokens))
    ranked = {}
    for mode in MODES:
        rows = []
        for layer in range(subject.n_layers):
            post_name = f"blocks.{layer}.mlp.hook_post"
            fill = means[post_name] if mode == "mean" else torch.zeros_like(means[post_name])
            if layer == subject.n_layers - 1:
                losses = _last_layer_neuron_losses(subject, batch, fill, chunk)
            else:
                losses = _hooked_neuron_losses(subject, batch, layer, fill, chunk)
            for n in range(d_mlp):
                delta = loss_delta(batch.losses(losses[n]), baseline)
                total = float(np.mean(delta["val"]))
                rows.append({"name": f"L{layer}N{n}", "layer": layer, "neuron": n, "total": total, **delta})
        ranked[mode] = sorted(rows, key=lambda r: -r["total"])[:top_k]
    return ranked


def run(subject: Subject, top_k: int = 20) -> dict:
    """All ablations; loss changes are ``ablated - baseline`` (positive: the component helps)."""
    batch = EvalBatch.of(subject)
    hook_names = {h for _, h, _ in components(subject)}
    if subject.has_mlp:
        hook_names |= {f"blocks.{layer}.mlp.hook_post" for layer in range(subject.n_layers)}
    means = position_means(subject.bridge, subject.val_tokens, hook_names)
    baseline = _losses(subject, batch)
    return {
        "analysis": "ablation",
        **subject_info(subject),
        "places": list(range(subject.spec.n_places)),
        "modes": list(MODES),
        "baseline": baseline,
        "components": component_ablations(subject, batch, means, baseline),
        "neurons": neuron_ablations(subject, batch, means, baseline, top_k),
    }


def summarize(result: dict) -> dict[str, float]:
    """Scalar series for plots over training: zero-ablation validation-loss change, per place and component."""
    return {
        f"place_{j}/{name}": d["zero"]["val"][j] for name, d in result["components"].items() for j in result["places"]
    }


def plot(result: dict) -> Any:
    names = list(result["components"])
    sets = list(result["baseline"]["carry"])
    fig, axes = new_figure(3, 2, width=6.0, height=max(2.5, 0.35 * len(names) + 1))
    for col, mode in enumerate(MODES):
        val = np.array([result["components"][n][mode]["val"] for n in names])
        _heatmap(axes[0, col], val, names, [f"place {j}" for j in result["places"]], f"{mode}-ablation: Δ val loss")
        if sets:
            carry = np.array([[result["components"][n][mode]["carry"][s] for s in sets] for n in names])
            short = [s.replace("carry/place_", "cin p").replace("chain/place_", "chain p") for s in sets]
            _heatmap(axes[1, col], carry, names, short, f"{mode}-ablation: Δ loss at the conditioned place")
        else:
            axes[1, col].axis("off")
        top = result["neurons"][mode]
        ax = axes[2, col]
        if top:
            ax.barh([r["name"] for r in top][::-1], [r["total"] for r in top][::-1])
            ax.tick_params(axis="y", labelsize=6)
            ax.set_xlabel("Δ mean val loss")
            ax.set_title(f"top neurons, {mode}-ablation")
        else:
            ax.axis("off")
    fig.suptitle(analysis_title(result, "ablation"))
    fig.tight_layout()
    return fig


def _heatmap(ax: Any, values: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    lim = max(float(np.abs(values).max()), 1e-6)
    im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax)
