"""Direct logit attribution: what each component writes, through the unembedding, into each answer.

The final residual stream at an answer position is exactly the sum of ``embed``, ``pos_embed``,
every head's output ``z_h W_O[h]`` (from ``hook_z``), every MLP's output (``hook_mlp_out``; its
neurons ``post_n W_out[n]`` plus ``b_out``) and the attention output biases. With a final LayerNorm
the logits are ``((r - mean r) / scale) w W_U + b W_U + b_U``, with ``scale`` read from the cache
(``ln_final.hook_scale``): each component ``c`` contributes ``((c - mean c) / scale) w W_U`` (the
scale is the one of the whole residual, so this is exact, not an approximation) and the rest goes
to a ``bias`` term. So, per example, the components sum exactly to the logits.

Reported per place, as means over the validation set:

* ``correct``: contribution to the correct digit's logit;
* ``carry``: contribution to ``logit(naive + 1) - logit(naive)``, naive = ``(a_j + b_j) mod base``
  (0 for the carry-out place): positive pushes towards "a carry comes in";
  ``carry_signed`` multiplies it by +1 when the true carry is 1 and -1 when it is 0 (positive:
  the component helps pick the right one of the two), ``carry_cin0`` / ``carry_cin1`` split it by
  the true carry.

``centred=True`` reads every contribution through the centred unembedding (``W_U`` and ``b_U`` minus
their mean over digits): a component that raises every digit's logit alike then contributes 0 to
``correct``, which is read as "above the mean logit". Logit differences (``carry``) are the same
either way -- the mean cancels -- so the correct-vs-naive readout is always the centred one.
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


@torch.no_grad()
def residual_components(subject: Subject, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    """Components of the final residual at the answer positions ``{name: (B, P, d)}``, the neurons
    ``{layer: (B, P, d_mlp, d)}``-producing pieces ``(post, W_out)``, and the true logits ``(B, P, V)``."""
    bridge, spec = subject.bridge, subject.spec
    logits, cache = bridge.run_with_cache(inputs(tokens))
    pos = answer_positions(spec)
    comps: dict[str, torch.Tensor] = {
        "embed": cache["hook_embed"][:, pos],
        "pos_embed": cache["hook_pos_embed"][:, pos],
    }
    bias = torch.zeros_like(comps["embed"])
    neurons = {}
    for layer in range(subject.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, pos]  # (B, P, H, d_head)
        heads = torch.einsum("bphe,hed->bphd", z, bridge.W_O[layer])
        for h in range(subject.n_heads):
            comps[f"L{layer}H{h}"] = heads[:, :, h]
        bias = bias + bridge.b_O[layer]
        if subject.has_mlp:
            comps[f"L{layer}_mlp"] = cache[f"blocks.{layer}.hook_mlp_out"][:, pos]
            neurons[layer] = (cache[f"blocks.{layer}.mlp.hook_post"][:, pos], bridge.W_out[layer])
    comps["attn_bias"] = bias
    scale = cache["ln_final.hook_scale"][:, pos] if subject.has_ln else None
    return comps, {"neurons": neurons, "scale": scale}, logits[:, pos].float()


def to_logits(subject: Subject, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Direct logit contribution of residual pieces ``(..., B, P, d)`` (no biases), with the final LN's
    centring, the cached scale ``(B, P, 1)`` and its weight applied."""
    bridge = subject.bridge
    if scale is not None:
        x = (x - x.mean(-1, keepdim=True)) / scale * bridge.state_dict()["ln_final.weight"]
    return x @ bridge.W_U


def constant_logits(subject: Subject) -> torch.Tensor:
    """The part of the logits no component writes: ``b W_U + b_U`` (final LN bias) or ``b_U``."""
    bridge = subject.bridge
    out = bridge.b_U.clone()
    if subject.has_ln:
        out = out + bridge.state_dict()["ln_final.bias"] @ bridge.W_U
    return out


def _read(logits: torch.Tensor, targets: torch.Tensor, naive: torch.Tensor, base: int) -> dict[str, torch.Tensor]:
    """Per-example correct-logit and carry-difference readouts ``(..., B, P)`` of logit contributions."""
    correct = logits.gather(-1, targets.expand(*logits.shape[:-1])[..., None]).squeeze(-1)
    plus1 = torch.remainder(naive + 1, base)
    diff = logits.gather(-1, plus1.expand(*logits.shape[:-1])[..., None]).squeeze(-1) - logits.gather(
        -1, naive.expand(*logits.shape[:-1])[..., None]
    ).squeeze(-1)
    return {"correct": correct, "carry": diff}


def _summary(read: dict[str, torch.Tensor], carry: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over the batch (dim -2) per place: ``correct``, ``carry``, ``carry_signed``, ``carry_cin0/1``."""
    c = carry.float()
    sign = 2 * c - 1
    n1, n0 = c.sum(0).clamp(min=1), (1 - c).sum(0).clamp(min=1)
    diff = read["carry"]
    return {
        "correct": read["correct"].mean(-2),
        "carry": diff.mean(-2),
        "carry_signed": (diff * sign).mean(-2),
        "carry_cin0": (diff * (1 - c)).sum(-2) / n0,
        "carry_cin1": (diff * c).sum(-2) / n1,
    }


@torch.no_grad()
def run(subject: Subject, top_neurons: int = 10, max_examples: int = 1024, centred: bool = False) -> dict:
    spec = subject.spec
    tokens = subject.val_tokens[:max_examples]
    comps, extra, logits = residual_components(subject, tokens)
    targets = answer_targets(tokens, spec)
    naive, carry = naive_digits(tokens, spec)
    names = list(comps)
    contrib = to_logits(subject, torch.stack([comps[n] for n in names]), extra["scale"])  # (C, B, P, V)
    contrib = torch.cat([contrib, constant_logits(subject).expand(1, *contrib.shape[1:])])
    names.append("bias")
    if centred:  # the same as centring W_U and b_U: every piece is linear in them
        contrib = contrib - contrib.mean(-1, keepdim=True)
        logits = logits - logits.mean(-1, keepdim=True)
    per_component = _summary(_read(contrib, targets, naive, spec.base), carry)
    actual = _summary(_read(logits[None], targets, naive, spec.base), carry)
    residual_error = (contrib.sum(0) - logits).abs().max().item()

    neurons = {}
    for layer, (post, w_out) in extra["neurons"].items():
        neurons[f"L{layer}"] = _top_neurons(
            subject, post, w_out, extra["scale"], targets, naive, carry, top_neurons, centred
        )
    return {
        "analysis": "logit_attribution",
        **subject_info(subject),
        "n_examples": len(tokens),
        "centred": centred,
        "places": list(range(spec.n_places)),
        "components": {n: {k: v[i].tolist() for k, v in per_component.items()} for i, n in enumerate(names)},
        "actual": {k: v[0].tolist() for k, v in actual.items()},
        "sum_error": residual_error,  # max |sum of components - logits|, over all examples and logits
        "neurons": neurons,
    }


def _top_neurons(
    subject: Subject, post, w_out, scale, targets, naive, carry, k: int, centred: bool = False
) -> list[dict]:
    """The ``k`` neurons with the largest mean |contribution to the correct logit| over all places."""
    spec = subject.spec
    # Direct effect of neuron n: post_n W_out[n]; read through W_U per neuron without materialising
    # (B, P, d_mlp, d): for a linear readout r (d,), contribution = post_n (W_out[n] . r').
    w = w_out  # (d_mlp, d)
    if scale is None:
        per = post[..., None] * (w @ subject.bridge.W_U)  # (B, P, d_mlp, V)
    else:
        lnw = subject.bridge.state_dict()["ln_final.weight"]
        w_ln = (w - w.mean(-1, keepdim=True)) * lnw  # (d_mlp, d), through the final LN's centring
        per = post[..., None] * (w_ln @ subject.bridge.W_U) / scale[..., None]
    per = per.permute(2, 0, 1, 3)  # (d_mlp, B, P, V)
    if centred:
        per = per - per.mean(-1, keepdim=True)
    summary = _summary(_read(per, targets, naive, spec.base), carry)
    rank = summary["correct"].abs().mean(-1).argsort(descending=True)[:k]
    return [
        {"name": f"N{int(n)}", "neuron": int(n), **{key: v[n].tolist() for key, v in summary.items()}} for n in rank
    ]


def summarize(result: dict) -> dict[str, float]:
    return {f"place_{j}/{name}": d["correct"][j] for name, d in result["components"].items() for j in result["places"]}


def plot(result: dict) -> Any:
    names = list(result["components"])
    places = result["places"]
    fig, axes = new_figure(1, 3, width=5.0, height=max(3.0, 0.3 * len(names) + 1))
    for ax, key, title in zip(
        axes[0],
        ("correct", "carry_signed", "carry"),
        ("→ correct logit", "→ carry logit diff, signed by true carry", "→ logit(naive+1) − logit(naive)"),
        strict=True,
    ):
        values = np.array([result["components"][n][key] for n in names])
        lim = max(float(np.nanmax(np.abs(values))), 1e-6)
        im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(places)), [f"place {j}" for j in places], rotation=45)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(analysis_title(result, "direct logit attribution"))
    fig.tight_layout()
    return fig
