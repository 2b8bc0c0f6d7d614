"""Neuron maps for lookup tables, clusters of neurons, their group ablation, and attribution patching.

Maps: every MLP neuron's mean activation (``hook_post``) at the position predicting place j, over the
grid of place j's operand pair ``(a_j, b_j)`` (the top pair for the carry-out; the same grid sets
as ``breakdown``): ``maps (layer, neuron, place, base, base)``.

Periodicity: each map averaged over cells with the same ``(a_j + b_j) mod base`` and Fourier
transformed; ``frequency`` is the strongest non-constant frequency and ``periodic`` its share of the
non-constant power (1: a pure wave in the pair sum modulo the base, as for a lookup of the digit).

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


def periodicity(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strongest non-constant frequency ``(...,)`` and its share of the non-constant power over
    ``(a + b) mod base``, from maps ``(..., base, base)``."""
    base = maps.shape[-1]
    sums = (torch.arange(base)[:, None] + torch.arange(base)[None, :]) % base
    profile = torch.stack([maps[..., sums == r].mean(-1) for r in range(base)], -1)  # (..., base)
    power = torch.fft.rfft(profile.double(), dim=-1).abs() ** 2
    power = power[..., 1:]
    if base % 2 == 0:  # the Nyquist term appears once, the others stand for two conjugate terms
        power[..., :-1] *= 2
    else:
        power *= 2
    total = power.sum(-1)
    best = power.argmax(-1)
    share = torch.where(total > 1e-12, power.gather(-1, best[..., None]).squeeze(-1) / total.clamp(min=1e-30), 0)
    return best + 1, share


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
    frequency, share = periodicity(maps)  # (L, d_mlp, P)
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
        "frequency": frequency,
        "periodic": share.float(),
        "baseline": baseline.tolist(),
        "clusters": groups,
        "attribution": estimate.float(),
        "check": check,
    }


def summarize(result: dict) -> dict[str, float]:
    """Largest group-ablation effect per place, and the attribution check's worst relative error."""
    out = {}
    for j in result["places"]:
        out[f"place_{j}/max_cluster_zero"] = max((g["zero"][j] for g in result["clusters"]), default=0.0)
        out[f"place_{j}/max_cluster_mean"] = max((g["mean"][j] for g in result["clusters"]), default=0.0)
    if result["check"]:
        out["attribution/top_actual"] = result["check"][0]["actual"]
        out["attribution/top_estimate"] = result["check"][0]["estimate"]
    return out


def plot(result: dict, per_cluster: int = 3) -> Any:
    maps = np.asarray(result["maps"], dtype=float)  # (L, d_mlp, P, base, base)
    places = result["places"]
    groups = [g for g in result["clusters"] if g["cluster"] >= 0]
    shown = [(g, n) for g in groups for n in g["neurons"][:per_cluster]]
    rows = max(len(shown), 1)
    fig, axes = new_figure(rows + 1, len(places), width=2.2, height=2.0)
    for row, (g, n) in zip(axes, shown, strict=False):
        for ax, j in zip(row, places, strict=False):
            ax.imshow(maps[g["layer"], n, j], origin="lower", cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{g['layer']}N{n} c{g['cluster']} p{j}", fontsize=6)
    last = axes[-1]
    names = [f"L{g['layer']}c{g['cluster']} ({len(g['neurons'])})" for g in result["clusters"]]
    values = np.array([g["zero"] for g in result["clusters"]])
    last[0].imshow(values, cmap="magma", aspect="auto")
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
    for ax in last[2:]:
        ax.axis("off")
    fig.suptitle(analysis_title(result, "neurons"))
    fig.tight_layout()
    return fig
