"""Neuron maps and what they read, clusters of neurons, their group ablation, and attribution patching.

Maps: every MLP neuron's mean activation (``hook_post``) at the position predicting place j, over the
grid of place j's operand pair ``(a_j, b_j)`` (the top pair for the carry-out; the same grid sets
as ``breakdown``): ``maps (layer, neuron, place, base, base)``.

Decomposition: each map's variance over the grid split into four orthogonal parts, ``shares (..., 4)``
summing to 1 — a function of a_j alone, of b_j alone (the two-way main effects), the part of what is
left that is a function of a_j + b_j (a sum feature), and the rest (other interactions). A neuron that
reads the sum, as a lookup of the digit would, has a large sum share; one built from separate
functions of each operand (a Fourier-style feature, cos(w a) + cos(w b)) has its variance in the
operand shares. ``wave``: the strongest 2-D frequency (k_a, k_b) of the centred map over
Z_base x Z_base and ``wave_share`` its share of the power (k_a = k_b: a wave in (a_j + b_j) mod base).

Clusters: neurons whose maps (centred, unit norm, all places together) are alike, by k-means with
a deterministic farthest-point start; dead neurons (map constant) form their own group. Every
cluster is zero- and mean-ablated as a group, reporting each place's validation loss change.

Attribution patching: the first-order estimate of mean-ablating each neuron alone,
``(mean - act) . d loss / d act``, for every neuron of every layer from one forward and one backward
pass; ``check`` compares it with real mean-ablation of the ``n_check`` neurons it ranks highest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from addrepro.interp.ablation import position_means
from addrepro.interp.breakdown import grid_tokens
from addrepro.interp.common import (
    Subject,
    analysis_title,
    answer_logits,
    answer_positions,
    answer_targets,
    inputs,
    new_figure,
    subject_info,
    token_losses,
)
from addrepro.task.encoding import operands_from_tokens


@torch.no_grad()
def neuron_maps(subject: Subject, per_cell: int) -> torch.Tensor:
    """Mean activation ``(L, d_mlp, P, base, base)`` of every neuron over each place's pair grid."""
    spec, base = subject.spec, subject.spec.base
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(subject.n_layers)]
    maps = []
    for j, pos in enumerate(answer_positions(spec)):
        tokens = grid_tokens(spec, j, per_cell)
        _, cache = subject.bridge.run_with_cache(inputs(tokens), names_filter=lambda n: n in names)
        acts = torch.stack([cache[n][:, pos] for n in names])  # (L, N, d_mlp)
        maps.append(acts.view(len(names), base, base, per_cell, -1).mean(3).permute(0, 3, 1, 2))
    return torch.stack(maps, 2)  # (L, d_mlp, P, base, base)


SHARE_NAMES = ("a_j", "b_j", "a_j+b_j", "other")
SHARE_COLOURS = ("#0072B2", "#56B4E9", "#D55E00", "#999999")  # colour-blind safe (Okabe-Ito)


def sum_basis(base: int) -> torch.Tensor:
    """Orthonormal basis ``(base*base, r)`` of the grid functions that depend on a + b alone and have no
    main effect (every row and column mean zero); r = 2 base - 3 (affine functions of a + b are additive)."""
    s = (torch.arange(base)[:, None] + torch.arange(base)[None, :]).flatten()
    x = (s[:, None] == torch.arange(2 * base - 1)[None, :]).double().view(base, base, -1)
    x = x - x.mean(0, keepdim=True) - x.mean(1, keepdim=True) + x.mean((0, 1), keepdim=True)
    u, sv, _ = torch.linalg.svd(x.reshape(base * base, -1), full_matrices=False)
    return u[:, sv > 1e-9 * sv.max()]


def map_parts(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map ``(..., base, base)`` as its mean ``(...,)`` plus four orthogonal parts ``(..., 4, base, base)``:
    a function of a alone, of b alone, the part of the rest that is a function of a + b, and the rest."""
    base = maps.shape[-1]
    mean = maps.double().mean((-2, -1))
    x = maps.double() - mean[..., None, None]
    row = x.mean(-1, keepdim=True).expand_as(x)  # (..., base, base): the function of a
    col = x.mean(-2, keepdim=True).expand_as(x)  # the function of b
    inter = (x - row - col).flatten(-2)  # (..., base*base)
    q = sum_basis(base)
    sums = ((inter @ q) @ q.T).view_as(x)
    return mean, torch.stack([row, col, sums, x - row - col - sums], -3)


def decompose(maps: torch.Tensor) -> torch.Tensor:
    """Shares ``(..., 4)`` of each map's variance (maps ``(..., base, base)``, indexed [a, b]): a alone,
    b alone, a + b beyond the main effects, the rest; they sum to 1 (0 everywhere for a constant map)."""
    _, parts = map_parts(maps)
    power = parts.pow(2).sum((-2, -1))  # (..., 4): orthogonal parts, so their powers add up
    total = power.sum(-1)
    shares = power / total.clamp(min=1e-30)[..., None]
    return torch.where(total[..., None] > 1e-24, shares, 0.0)


def part_hook(parts: torch.Tensor, mean: torch.Tensor, cells: torch.Tensor, positions: list[int], keep: bool):
    """A ``hook_post`` hook that, at each place's position, removes one part of every neuron's map from its
    activation (``keep=False``: the excluded loss) or puts the map's mean plus that part alone in its place
    (``keep=True``: the restricted loss). ``parts`` ``(d_mlp, P, base, base)``, ``mean`` ``(d_mlp, P)``,
    ``cells`` ``(N, P, 2)``: the (a, b) of each example's pair for each place."""

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        for j, pos in enumerate(positions):
            a, b = cells[: act.shape[0], j, 0], cells[: act.shape[0], j, 1]
            part = parts[:, j, a, b].T.to(act.dtype)  # (N, d_mlp)
            if keep:
                act[:, pos] = mean[:, j].to(act.dtype) + part
            else:
                act[:, pos] = act[:, pos] - part
        return act

    return hook


def part_ablation(subject: Subject, maps: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per layer and part (``SHARE_NAMES``): each place's validation loss change when that part of every
    neuron's map is removed from its activation (``excluded``), and when the activation is only the map's
    mean plus that part (``restricted``), at every answer position at once."""
    spec = subject.spec
    positions = answer_positions(spec)
    a, b = operands_from_tokens(tokens, spec)
    pairs = [min(j, spec.n_digits - 1) for j in range(spec.n_places)]
    cells = torch.stack([torch.stack([a[:, i], b[:, i]], -1) for i in pairs], 1)  # (N, P, 2)
    baseline = val_losses(subject, tokens)
    out: dict = {}
    for layer in range(maps.shape[0]):
        mean, parts = map_parts(maps[layer])  # (d_mlp, P), (d_mlp, P, 4, base, base)
        name = f"blocks.{layer}.mlp.hook_post"
        for k, part in enumerate(SHARE_NAMES):
            for mode, keep in (("excluded", False), ("restricted", True)):
                hook = part_hook(parts[:, :, k], mean, cells, positions, keep)
                change = val_losses(subject, tokens, [(name, hook)]) - baseline
                out[f"L{layer}/{mode}/{part}"] = change.tolist()
    return out


def strongest_wave(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The strongest 2-D frequency ``(..., 2)`` of each centred map over Z_base x Z_base, as (k_a, k_b)
    with 0 <= k_a <= base/2, and the share of the power it holds with its conjugate ``(...,)``."""
    base = maps.shape[-1]
    x = maps.double() - maps.double().mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).flatten(-2)  # (..., base*base)
    k = torch.arange(base)
    ka, kb = k.repeat_interleave(base), k.repeat(base)
    conjugate = ((-ka) % base) * base + (-kb) % base
    paired = power + power[..., conjugate] * (conjugate != torch.arange(base * base))
    best = paired.argmax(-1)
    share = paired.gather(-1, best[..., None]).squeeze(-1) / power.sum(-1).clamp(min=1e-30)
    a, b = best // base, best % base
    flip = a > base // 2  # name each pair by its member with k_a <= base/2
    a, b = torch.where(flip, (-a) % base, a), torch.where(flip, (-b) % base, b)
    return torch.stack([a, b], -1), torch.where(power.sum(-1) > 1e-24, share, 0.0)


def cluster_maps(maps: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """Cluster labels ``(N,)`` of maps ``(N, F)``; -1 for dead (constant) maps; k-means on the centred,
    normalised maps with a farthest-point start (deterministic)."""
    x = maps.double() - maps.double().mean(-1, keepdim=True)
    norm = x.norm(dim=-1)
    alive = norm > 1e-6 * max(float(norm.max()), 1e-30)
    labels = torch.full((len(x),), -1, dtype=torch.long)
    idx = alive.nonzero().squeeze(-1)
    if len(idx) == 0:
        return labels
    x = x[idx] / norm[idx, None]
    k = min(k, len(idx))
    centres = [x[int(norm[idx].argmax())]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centres)).min(-1).values
        centres.append(x[int(dist.argmax())])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)
        new = torch.stack([x[assign == i].mean(0) if (assign == i).any() else c[i] for i in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    labels[idx] = torch.cdist(x, c).argmin(-1)
    return labels


def _group_hook(neurons: list[int], fill: torch.Tensor | None):
    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        act[..., neurons] = 0.0 if fill is None else fill[: act.shape[1], neurons]
        return act

    return hook


@torch.no_grad()
def val_losses(subject: Subject, tokens: torch.Tensor, hooks: list = ()) -> torch.Tensor:
    """Per-place mean loss ``(P,)`` on ``tokens``, optionally under hooks."""
    logits = answer_logits(subject.bridge, tokens, subject.spec, hooks)
    return token_losses(logits, answer_targets(tokens, subject.spec)).mean(0)


def attribution(subject: Subject, tokens: torch.Tensor, means: dict) -> torch.Tensor:
    """First-order change of the mean loss over all places ``(L, d_mlp)`` when each neuron is replaced
    by its position mean: ``sum over examples and positions of (mean - act) * dloss/dact``."""
    bridge, spec = subject.bridge, subject.spec
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(subject.n_layers)]
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            act.retain_grad()
            acts[name] = act
            return act

        return hook

    with torch.enable_grad():
        logits = bridge.run_with_hooks(inputs(tokens), fwd_hooks=[(n, keep(n)) for n in names])
        answer = logits[:, answer_positions(spec)].float()
        loss = token_losses(answer, answer_targets(tokens, spec)).mean()
        loss.backward()
    bridge.zero_grad(set_to_none=True)  # only the activations' gradients are wanted
    out = []
    for n in names:
        act = acts[n]
        fill = means[n][: act.shape[1]]
        out.append(((fill - act.detach()) * act.grad).sum((0, 1)))
    return torch.stack(out)


def run(subject: Subject, per_cell: int = 8, clusters: int = 8, max_examples: int = 1024, n_check: int = 8) -> dict:
    if not subject.has_mlp:
        raise ValueError("neurons: the model has no MLP (attn_only)")
    spec = subject.spec
    tokens = subject.val_tokens[:max_examples]
    maps = neuron_maps(subject, per_cell)  # (L, d_mlp, P, base, base)
    n_layers, d_mlp = maps.shape[:2]
    shares = decompose(maps)  # (L, d_mlp, P, 4)
    ablation = part_ablation(subject, maps, tokens)
    wave, wave_share = strongest_wave(maps)  # (L, d_mlp, P, 2), (L, d_mlp, P)
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    means = position_means(subject.bridge, subject.val_tokens, set(names))
    baseline = val_losses(subject, tokens)

    groups = []
    for layer in range(n_layers):
        labels = cluster_maps(maps[layer].flatten(1), clusters)
        for c in sorted(set(labels.tolist())):
            members = (labels == c).nonzero().squeeze(-1).tolist()
            row = {"layer": layer, "cluster": c, "neurons": members}
            for mode, fill in (("zero", None), ("mean", means[names[layer]])):
                hooked = val_losses(subject, tokens, [(names[layer], _group_hook(members, fill))])
                row[mode] = (hooked - baseline).tolist()
            groups.append(row)

    estimate = attribution(subject, tokens, means)  # (L, d_mlp)
    ranked = estimate.flatten().abs().argsort(descending=True)[:n_check].tolist()
    check = []
    for flat in ranked:
        layer, n = divmod(flat, d_mlp)
        real = val_losses(subject, tokens, [(names[layer], _group_hook([n], means[names[layer]]))])
        check.append(
            {
                "layer": layer,
                "neuron": n,
                "estimate": float(estimate[layer, n]),
                "actual": float((real - baseline).mean()),
            }
        )
    return {
        "analysis": "neurons",
        **subject_info(subject),
        "places": list(range(spec.n_places)),
        "base": spec.base,
        "maps": maps.float(),
        "share_names": list(SHARE_NAMES),
        "shares": shares.float(),
        "wave": wave,
        "part_ablation": ablation,
        "wave_share": wave_share.float(),
        "baseline": baseline.tolist(),
        "clusters": groups,
        "attribution": estimate.float(),
        "check": check,
    }


def median_shares(result: dict) -> np.ndarray:
    """Median share of each part ``(P, 4)`` over the neurons whose map at that place is not constant."""
    shares = np.asarray(result["shares"], dtype=float)  # (L, d_mlp, P, 4)
    flat = shares.reshape(-1, *shares.shape[2:])  # (L*d_mlp, P, 4)
    out = np.zeros(flat.shape[1:])
    for j in range(flat.shape[1]):
        live = flat[:, j][flat[:, j].sum(-1) > 0]
        out[j] = np.median(live, 0) if len(live) else 0.0
    return out


def summarize(result: dict) -> dict[str, float]:
    """Largest group-ablation effect per place, the median share of each part of the live neurons' maps
    per place, and the attribution check's top neuron."""
    out = {}
    shares = median_shares(result)  # (P, 4)
    for j in result["places"]:
        for name, value in zip(result["share_names"], shares[j], strict=True):
            out[f"place_{j}/median_share_{name}"] = float(value)
        out[f"place_{j}/max_cluster_zero"] = max((g["zero"][j] for g in result["clusters"]), default=0.0)
        out[f"place_{j}/max_cluster_mean"] = max((g["mean"][j] for g in result["clusters"]), default=0.0)
    for key, changes in result.get("part_ablation", {}).items():  # L0/excluded/a_j+b_j -> (P,)
        for j, change in zip(result["places"], changes, strict=True):
            out[f"{key}/place_{j}"] = change
    if result["check"]:
        out["attribution/top_actual"] = result["check"][0]["actual"]
        out["attribution/top_estimate"] = result["check"][0]["estimate"]
    return out


def plot(result: dict, per_cluster: int = 2, max_rows: int = 12) -> Any:
    """Maps of ``per_cluster`` neurons of each cluster, the clusters with the largest zero-ablation
    effect first, at most ``max_rows`` rows (every neuron's map is in the JSON); then the clusters'
    ablation effects, the attribution check and the map shares."""
    maps = np.asarray(result["maps"], dtype=float)  # (L, d_mlp, P, base, base), indexed [a_j, b_j]
    places = result["places"]
    groups = sorted((g for g in result["clusters"] if g["cluster"] >= 0), key=lambda g: -max(g["zero"], default=0))
    shown = [(g, n) for g in groups for n in g["neurons"][:per_cluster]][:max_rows]
    rows = max(len(shown), 1)
    fig, axes = new_figure(rows + 1, len(places), width=2.2, height=2.0)
    for i, (row, (g, n)) in enumerate(zip(axes, shown, strict=False)):
        for ax, j in zip(row, places, strict=False):
            ax.imshow(maps[g["layer"], n, j], origin="lower", cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{g['layer']}N{n} c{g['cluster']} p{j}", fontsize=6)
            if i == 0 and j == places[0]:
                ax.set_xlabel("b_j →", fontsize=6, labelpad=1)
                ax.set_ylabel("a_j →", fontsize=6, labelpad=1)
    last = axes[-1]
    names = [f"L{g['layer']}c{g['cluster']} ({len(g['neurons'])})" for g in result["clusters"]]
    values = np.array([g["zero"] for g in result["clusters"]])
    im = last[0].imshow(values, cmap="magma", aspect="auto")
    fig.colorbar(im, ax=last[0])
    last[0].set_yticks(range(len(names)), names, fontsize=5)
    last[0].set_xticks(range(len(places)), [f"p{j}" for j in places], fontsize=6)
    last[0].set_title("cluster zero-ablation Δ loss", fontsize=7)
    if result["check"] and len(last) > 1:
        est = [c["estimate"] for c in result["check"]]
        act = [c["actual"] for c in result["check"]]
        last[1].scatter(act, est, s=8)
        lim = max(max(map(abs, est + act)), 1e-9)
        last[1].plot([-lim, lim], [-lim, lim], color="grey", lw=0.5)
        last[1].set_xlabel("mean-ablation Δ loss", fontsize=6)
        last[1].set_ylabel("attribution estimate", fontsize=6)
        last[1].set_title("attribution patching check", fontsize=7)
    if len(last) > 2:
        medians = median_shares(result)  # (P, 4)
        x = np.arange(len(places))
        for i, name in enumerate(result["share_names"]):  # medians need not sum to 1: side by side
            last[2].bar(x + (i - 1.5) * 0.2, medians[:, i], width=0.2, label=name, color=SHARE_COLOURS[i])
        last[2].set_xticks(range(len(places)), [f"p{j}" for j in places], fontsize=6)
        last[2].set_ylim(0, 1)
        last[2].set_title("median share of a neuron's map", fontsize=7)
        last[2].legend(fontsize=5, loc="upper right")
    for ax in last[3:]:
        ax.axis("off")
    clusters = len({(g["layer"], g["cluster"]) for g, _ in shown})
    fig.suptitle(
        f"{analysis_title(result, 'neurons')}\nmean activation over each place's (a_j, b_j) grid, each map on its"
        f" own scale; {len(shown)} neurons of the {clusters} clusters with the largest ablation effect",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))  # room for the two-line title
    return fig
