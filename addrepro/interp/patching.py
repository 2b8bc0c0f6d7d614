"""Activation patching and path patching between clean/corrupted pairs built for one place.

Pairs, for place j (``kind``):

* ``carry``: the two differ only in the carry into place j. The clean one has a carry in, the
  corrupted one has none: their digits below j are redrawn until it does, and ``a_j + b_j`` is kept
  away from base-1 so no answer digit above j changes. (Places 1..n.)
* ``a`` / ``b``: the two differ only in ``a_j`` / ``b_j`` (the top pair ``n-1`` for the carry-out),
  redrawn until the place's answer differs.

Metric: at place j's answer position, ``LD = logit(clean answer) - logit(corrupted answer)``; for
carry pairs that is the right digit against the naive sum. A patch copies one clean activation into
the corrupted run; the **restored fraction** is ``(LD_patched - LD_corrupted) / (LD_clean -
LD_corrupted)`` (means over the pairs): 1 when that activation alone carries the difference. Where the
model barely tells the pair apart (``|LD_clean - LD_corrupted|`` below ``patching.min_gap``, e.g. a
place that has not learned its carry yet) the fraction would divide by almost nothing: it is NaN, and
the result says ``told_apart: false``.

Patched, with TransformerLens's own patching functions: every head's output by layer and position
(``hook_z``), every MLP's output by position (``hook_mlp_out``), the residual stream before each
layer by position.

Path patching (2+ layers): every edge from a head or an MLP into a head of a later layer, through
that head's query, key or value input, at all positions. The source's clean-minus-corrupted write
``delta`` (``z_h W_O[h]``, or the MLP's output) is added to the destination head's own copy of the
residual only: its ``hook_q/k/v`` slice is recomputed as ``LN1(resid_pre + delta) W + b`` from the
corrupted run's ``resid_pre``; every other reader still sees the corrupted write. (TransformerLens's
``get_act_patch_direct_path`` does the same through the per-head ``hook_{q,k,v}_input`` fork, which
the exported models' attention does not have.)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from addrepro.interp.common import (
    Subject,
    analysis_title,
    answer_positions,
    answer_targets,
    inputs,
    new_figure,
    subject_info,
)
from addrepro.model.transformer import layer_norm
from addrepro.task.encoding import carries_in, encode, sample_operands
from addrepro.task.spec import TaskSpec


def tl_patching() -> Any:
    """TransformerLens's patching module (imported on first use: it brings pandas, seconds of start-up)."""
    from tqdm.auto import tqdm  # noqa: PLC0415 - with the module below
    from transformer_lens import patching  # noqa: PLC0415 - seconds of start-up, only for this analysis

    # Its sweeps draw a progress bar each; these take a second or two.
    patching.tqdm = partial(tqdm, disable=True)
    return patching


KINDS = ("carry", "a", "b")


def make_pairs(spec: TaskSpec, place: int, kind: str, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` (clean, corrupted) token pairs ``(size, T)`` each for ``place`` and ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose from {', '.join(KINDS)}")
    if kind == "carry" and (place == 0 or spec.task != "add"):
        raise ValueError(f"kind=carry needs place >= 1 of task=add (place={place}, task={spec.task})")
    g = torch.Generator().manual_seed(seed * 1000 + place * 10 + KINDS.index(kind))
    base, n = spec.base, spec.n_digits
    clean, corrupt = [], []
    while sum(len(c) for c in clean) < size:
        a, b = sample_operands(spec, 4 * size, g)
        a2, b2 = a.clone(), b.clone()
        if kind == "carry":
            lo_a, lo_b = sample_operands(spec, 4 * size, g)
            a2[:, :place], b2[:, :place] = lo_a[:, :place], lo_b[:, :place]
            if place < n:  # keep a_j + b_j off base-1 so the carry out of j (and every digit above) stays
                b[:, place] = torch.where(a[:, place] + b[:, place] == base - 1, (b[:, place] + 1) % base, b[:, place])
                b2[:, place] = b[:, place]
            keep = (carries_in(a, b, spec)[:, place] == 1) & (carries_in(a2, b2, spec)[:, place] == 0)
        else:
            pair = min(place, n - 1)
            x = a2 if kind == "a" else b2
            x[:, pair] = (x[:, pair] + torch.randint(1, base, (len(x),), generator=g)) % base
            keep = torch.ones(len(a), dtype=torch.bool)
        t1, t2 = encode(a[keep], b[keep], spec), encode(a2[keep], b2[keep], spec)
        j = spec.answer_start + spec.emission_index[place]
        differ = t1[:, j] != t2[:, j]
        clean.append(t1[differ])
        corrupt.append(t2[differ])
    return torch.cat(clean)[:size], torch.cat(corrupt)[:size]


def logit_diff_metric(spec: TaskSpec, place: int, clean: torch.Tensor, corrupt: torch.Tensor):
    """Mean ``logit(clean answer) - logit(corrupted answer)`` at the place's answer position."""
    pos = answer_positions(spec)[place]
    right, wrong = answer_targets(clean, spec)[:, place], answer_targets(corrupt, spec)[:, place]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[:, pos].float()
        return (at.gather(-1, right[:, None]) - at.gather(-1, wrong[:, None])).mean()

    return metric


@torch.no_grad()
def patch_place(subject: Subject, place: int, kind: str, size: int, min_gap: float = 0.1) -> dict:
    bridge, spec = subject.bridge, subject.spec
    clean, corrupt = make_pairs(spec, place, kind, size)
    metric = logit_diff_metric(spec, place, clean, corrupt)
    clean_logits, clean_cache = bridge.run_with_cache(inputs(clean))
    corrupt_logits, corrupt_cache = bridge.run_with_cache(inputs(corrupt))
    ld_clean, ld_corrupt = metric(clean_logits).item(), metric(corrupt_logits).item()
    denom = ld_clean - ld_corrupt
    told_apart = abs(denom) >= min_gap

    def scale(v: Any) -> Any:
        v = torch.as_tensor(v, dtype=torch.float64)
        return (v - ld_corrupt) / denom if told_apart else v * float("nan")

    corrupt_in = inputs(corrupt)
    tl = tl_patching()
    out = {
        "n_pairs": len(clean),
        "ld_clean": ld_clean,
        "ld_corrupted": ld_corrupt,
        "told_apart": told_apart,  # |ld_clean - ld_corrupted| >= min_gap: else no fraction
        "min_gap": min_gap,
        "heads": scale(tl.get_act_patch_attn_head_out_by_pos(bridge, corrupt_in, clean_cache, metric)),
        "resid_pre": scale(tl.get_act_patch_resid_pre(bridge, corrupt_in, clean_cache, metric)),
    }  # heads (layer, pos, head); resid_pre (layer, pos)
    if subject.has_mlp:
        out["mlp"] = scale(tl.get_act_patch_mlp_out(bridge, corrupt_in, clean_cache, metric))
    if subject.n_layers >= 2:
        paths = path_patch(subject, corrupt_in, clean_cache, corrupt_cache, metric)
        out["paths"] = {edge: scale(v) for edge, v in paths.items()}
    return out


def source_writes(subject: Subject, clean_cache: Any, corrupt_cache: Any) -> dict[str, tuple[int, torch.Tensor]]:
    """``{name: (layer, clean - corrupted write (B, T, d))}`` of every head and MLP."""
    out = {}
    for layer in range(subject.n_layers):
        z = f"blocks.{layer}.attn.hook_z"
        dz = clean_cache[z] - corrupt_cache[z]  # (B, T, H, d_head)
        for h in range(subject.n_heads):
            out[f"L{layer}H{h}"] = (layer, dz[:, :, h] @ subject.bridge.W_O[layer, h])
        if subject.has_mlp:
            m = f"blocks.{layer}.hook_mlp_out"
            out[f"L{layer}_mlp"] = (layer, clean_cache[m] - corrupt_cache[m])
    return out


def head_input_hook(subject: Subject, layer: int, head: int, component: str, resid: torch.Tensor):
    """A hook replacing head ``head``'s ``hook_{component}`` slice by its value computed from ``resid``."""
    bridge = subject.bridge
    if subject.has_ln:
        state = bridge.state_dict()
        w, b = state[f"blocks.{layer}.ln1.weight"], state[f"blocks.{layer}.ln1.bias"]
        resid = layer_norm(resid, w, b, bridge.cfg.eps)
    weight = {"q": bridge.W_Q, "k": bridge.W_K, "v": bridge.W_V}[component][layer, head]  # (d, d_head)
    bias = {"q": bridge.b_Q, "k": bridge.b_K, "v": bridge.b_V}[component][layer, head]
    value = resid @ weight + bias  # (B, T, d_head)

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        act[:, :, head] = value.to(act.dtype)
        return act

    return hook


@torch.no_grad()
def path_patch(subject: Subject, corrupt_in: torch.Tensor, clean_cache: Any, corrupt_cache: Any, metric) -> dict:
    """``{"<source>-><dst head>": [metric via q, via k, via v]}`` for every source in an earlier layer."""
    out = {}
    for name, (src_layer, delta) in source_writes(subject, clean_cache, corrupt_cache).items():
        for layer in range(src_layer + 1, subject.n_layers):
            resid = corrupt_cache[f"blocks.{layer}.hook_resid_pre"] + delta
            for h in range(subject.n_heads):
                values = []
                for c in "qkv":
                    hooks = [(f"blocks.{layer}.attn.hook_{c}", head_input_hook(subject, layer, h, c, resid))]
                    logits = subject.bridge.run_with_hooks(corrupt_in, fwd_hooks=hooks)
                    values.append(metric(logits).item())
                out[f"{name}->L{layer}H{h}"] = values
    return out


def check_options(
    size: int = 64, places: list[int] | None = None, kinds: list[str] | None = None, min_gap: float = 0.1
) -> None:
    """Raise ValueError naming the option for a value ``run`` cannot use (before a model is loaded)."""
    if isinstance(min_gap, bool) or not isinstance(min_gap, int | float) or not min_gap > 0:
        raise ValueError(f"patching.min_gap={min_gap!r} is invalid: must be a number > 0 (a logit difference)")
    if places is not None and not (
        isinstance(places, list | tuple) and places and all(type(j) is int and j >= 0 for j in places)
    ):
        raise ValueError(f"patching.places={places!r} is invalid: must be null or a non-empty list of places (>= 0)")
    if kinds is not None and not (isinstance(kinds, list | tuple) and kinds):
        raise ValueError(f"patching.kinds={kinds!r} is invalid: must be a non-empty list of {', '.join(KINDS)}")
    for kind in kinds or []:
        if kind not in KINDS:
            raise ValueError(f"patching.kinds: {kind!r} is not one of {', '.join(KINDS)}")


def run(
    subject: Subject,
    size: int = 64,
    places: list[int] | None = None,
    kinds: list[str] | None = None,
    min_gap: float = 0.1,
) -> dict:
    """Every place (or ``places``) and kind (default: carry pairs only; add ``a``, ``b``)."""
    check_options(size, places, kinds, min_gap)
    spec = subject.spec
    places = list(range(spec.n_places)) if places is None else list(places)
    if any(j >= spec.n_places for j in places):
        raise ValueError(
            f"patching.places={places} is invalid: this model's task has places 0..{spec.n_places - 1}"
            f" ({spec.n_digits} digits and the carry-out)"
        )
    kinds = ["carry"] if kinds is None else list(kinds)
    results: dict[str, dict] = {}
    for j in places:
        for kind in kinds:
            if kind == "carry" and (j == 0 or spec.task != "add"):
                continue
            results[f"place_{j}/{kind}"] = patch_place(subject, j, kind, size, min_gap)
    if not results:  # e.g. carry pairs at the units place, which no carry reaches
        raise ValueError(
            f"patching.places={places} with kinds={kinds} selects nothing to patch: carry pairs need a place >= 1 "
            "of an addition task (or add kinds a or b)"
        )
    return {
        "analysis": "patching",
        **subject_info(subject),
        "positions": answer_positions(spec),
        "token_labels": spec.token_labels()[:-1],
        "results": results,
    }


def summarize(result: dict) -> dict[str, float]:
    """Restored fraction of each head and MLP at the place's own answer position, per place and kind."""
    out = {}
    for key, r in result["results"].items():
        place = int(key.split("/")[0].removeprefix("place_"))
        pos = result["positions"][place]
        heads = np.asarray(r["heads"])
        group = key.replace("/", "_")
        for layer in range(heads.shape[0]):
            for h in range(heads.shape[2]):
                out[f"{group}/L{layer}H{h}"] = float(heads[layer, pos, h])
            if "mlp" in r:
                out[f"{group}/L{layer}_mlp"] = float(np.asarray(r["mlp"])[layer, pos])
        for edge, values in r.get("paths", {}).items():
            out[f"{group}_paths/{edge}"] = float(np.max(np.abs(np.asarray(values, dtype=float))))
    return out


def plot(result: dict) -> Any:
    keys = list(result["results"])
    fig, axes = new_figure(max(len(keys), 1), 2, width=5.0, height=2.6)
    for row, key in zip(axes, keys, strict=False):
        r = result["results"][key]
        heads = np.asarray(r["heads"], dtype=float)  # (L, T, H)
        n_layers, t, n_heads = heads.shape
        rows = heads.transpose(0, 2, 1).reshape(n_layers * n_heads, t)
        names = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
        if "mlp" in r:
            rows = np.concatenate([rows, np.asarray(r["mlp"], dtype=float)])
            names += [f"L{layer}_mlp" for layer in range(n_layers)]
        for ax, values, labels, title in (
            (row[0], rows, names, "heads and MLPs"),
            (row[1], np.asarray(r["resid_pre"], dtype=float), [f"resid_pre {i}" for i in range(n_layers)], "residual"),
        ):
            im = ax.imshow(np.nan_to_num(values), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.set_xlabel("position")
            ax.set_title(f"{key}: restored fraction, {title}", fontsize=8)
            if not r.get("told_apart", True):
                gap = r["ld_clean"] - r["ld_corrupted"]
                note = f"not told apart: clean - corrupted logit difference {gap:+.2g}"
                note += f"\n(below min_gap {r['min_gap']:g}: no fraction)"
                ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax)
    fig.suptitle(analysis_title(result, "activation patching"))
    fig.tight_layout()
    return fig
