"""``spikes.md``: each loss spike of a run examined from the weights saved around it.

Training saves, for every spike, the weights at the logging step before it, at its first point and
at the logging step after (``checkpoints/spike_<first step>_{before,at,after}.ckpt``). From them and
the run's held-out set this reports, per spike: the per-place loss at the three points, the size of
the two updates (L2 norm of the weight change), per parameter group Adam's sqrt(v̂) at each point (the
snapshots keep the second moments) and the update-to-weight ratios, the mean L2 norm of the answer
logits, the held-out examples whose loss rose most, and the attention masses and carry probes that
changed most from before to after. Everything is computed from the saved snapshots; nothing is taken
from the run's logs except the spike list itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from addrepro.metrics.mechanism import MECHANISM_EXAMPLES, mechanism_metric_dict
from addrepro.metrics.place import stats_from_logits
from addrepro.model.transformer import Transformer, model_from_checkpoint, parameter_group
from addrepro.rundir.atomic import atomic_write_text
from addrepro.rundir.checkpoints import CheckpointError, checkpoint_dir, load_checkpoint
from addrepro.task.encoding import decode, split_tokens
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec
from addrepro.task.streams import configured_validation_tokens

POINTS = ("before", "at", "after")


def spike_checkpoints(job_dir: Path, spike: dict) -> dict[str, Path]:
    """The saved weights around ``spike`` that exist (a run killed right after it may lack ``after``)."""
    first = spike.get("first_step", spike["step"])
    found = {p: checkpoint_dir(job_dir) / f"spike_{first}_{p}.ckpt" for p in POINTS}
    return {p: path for p, path in found.items() if path.exists()}


def update_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 norm of the change of all weights from ``a`` to ``b``."""
    return math.sqrt(sum(float((b[n].double() - a[n].double()).square().sum()) for n in a))


def relative_updates(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per weight: the norm of its change from ``a`` to ``b`` over its norm in ``a`` (the update-to-weight
    ratio; inf for a weight that was zero)."""
    out = {}
    for name in a:
        before = a[name].double()
        change = float((b[name].double() - before).norm())
        size = float(before.norm())
        out[name] = change / size if size > 0 else (0.0 if change == 0 else math.inf)
    return out


def group_updates(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter group (and ``global``): ‖ΔW‖/‖W‖ of the group's weights together, from ``a`` to ``b``."""
    change: dict[str, float] = {}
    size: dict[str, float] = {}
    for name in a:
        for group in ("global", parameter_group(name)):
            change[group] = change.get(group, 0.0) + float((b[name].double() - a[name].double()).square().sum())
            size[group] = size.get(group, 0.0) + float(a[name].double().square().sum())
    return {g: math.sqrt(change[g] / size[g]) if size[g] > 0 else math.inf for g in change}


def adam_scale(ckpt: dict) -> dict[str, float] | None:
    """Per parameter group (and ``global``): the RMS over its weights of Adam's bias-corrected sqrt(v̂),
    from a snapshot's ``second_moments`` (taken once the step's update had taken in its gradient, the
    ``step + 1``-th); None without them (or when they do not match the weights)."""
    moments, weights = ckpt.get("second_moments"), ckpt["model"]
    if not isinstance(moments, dict) or set(moments) != set(weights):
        return None
    if any(not isinstance(v, torch.Tensor) or v.shape != weights[n].shape for n, v in moments.items()):
        return None
    betas = (ckpt.get("config") or {}).get("optimizer", {}).get("betas", (0.9, 0.999))
    bias = 1.0 - float(betas[1]) ** (ckpt["step"] + 1)
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, v in moments.items():
        for group in ("global", parameter_group(name)):
            total[group] = total.get(group, 0.0) + float(v.double().sum())
            count[group] = count.get(group, 0) + v.numel()
    return {g: math.sqrt(total[g] / count[g] / bias) for g in total}


def example_gradients(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Gradient ``(E, n_params)`` of each example's loss (summed over places) with respect to every weight,
    one backward pass per example: inputs ``(E, T)``, targets ``(E, n+1)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    with torch.enable_grad():
        for i in range(len(inputs)):
            logits = model(inputs[i : i + 1], last=spec.n_places)  # (1, 1, n+1, base)
            loss = stats_from_logits(logits, targets[i : i + 1].unsqueeze(0), spec).token_loss.sum()
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).detach())
    return torch.stack(rows)


@torch.no_grad()
def examine_spike(job_dir: Path, spike: dict, worst: int = 5) -> dict | None:
    """The numbers of ``spikes.md`` for one spike, or None when its weights were not saved."""
    paths = spike_checkpoints(job_dir, spike)
    if "at" not in paths:
        return None
    ckpts = {p: load_checkpoint(path) for p, path in paths.items()}
    models: dict[str, Transformer] = {}
    spec: TaskSpec | None = None
    for p, ckpt in ckpts.items():
        models[p], spec = model_from_checkpoint(ckpt)
    val = configured_validation_tokens(ckpts["at"].get("config", {}), spec)
    inputs, targets = split_tokens(val, spec)
    out: dict = {"step": spike["step"], "first_step": spike.get("first_step", spike["step"]), "points": {}}
    losses = {}
    for p, model in models.items():
        logits = model(inputs, last=spec.n_places)  # (1, V, n+1, base), emission order
        stats = stats_from_logits(logits, targets.unsqueeze(0), spec)
        losses[p] = stats.token_loss[0]  # (V, n+1)
        out["points"][p] = {
            "step": ckpts[p]["step"],
            "place_loss": {j: float(v) for j, v in enumerate(stats.loss_by_place[0].tolist())},
            "logit_norm": float(logits.norm(dim=-1).mean()),
            "adam": adam_scale(ckpts[p]),
        }
    for a, b in (("before", "at"), ("at", "after")):
        if a in ckpts and b in ckpts:
            out[f"update_{a}_{b}"] = update_norm(ckpts[a]["model"], ckpts[b]["model"])
            ratios = relative_updates(ckpts[a]["model"], ckpts[b]["model"])
            top = sorted(ratios, key=lambda n: -ratios[n])[:worst]
            out[f"relative_{a}_{b}"] = {n: ratios[n] for n in top}
            out[f"groups_{a}_{b}"] = group_updates(ckpts[a]["model"], ckpts[b]["model"])
    base = losses.get("before")
    rise = losses["at"] - base if base is not None else losses["at"]  # (V, n+1)
    per_example = rise.sum(-1)
    order = per_example.argsort(descending=True)[:worst].tolist()
    triples = decode(val[order], spec)
    out["worst"] = [
        {
            "example": f"{a} + {b} = {c}",
            "place": int(rise[i].argmax()),
            "loss_before": float(base[i].sum()) if base is not None else None,
            "loss_at": float(losses["at"][i].sum()),
        }
        for i, (a, b, c) in zip(order, triples, strict=True)
    ]
    # How hard each of those examples pulls on the weights, before and at the spike.
    for p in ("before", "at", "after"):
        if p in models:
            norms = example_gradients(models[p], inputs[order], targets[order], spec).norm(dim=-1)
            for w, g in zip(out["worst"], norms.tolist(), strict=True):
                w[f"grad_norm_{p}"] = g
    if "before" in models and "after" in models:
        sets = CarrySets.build(spec, 64, 8)
        sample = val[:MECHANISM_EXAMPLES].unsqueeze(0)
        mech = {p: mechanism_metric_dict(models[p], sample, sets, spec) for p in ("before", "after")}
        changes = [(k, float(mech["before"][k][0]), float(mech["after"][k][0])) for k in mech["before"]]
        changes.sort(key=lambda c: -abs(c[2] - c[1]))
        out["mechanism"] = [{"key": k, "before": x, "after": y} for k, x, y in changes[:worst]]
    return out


def spikes_markdown(examined: list[tuple[dict, dict | None]]) -> str:
    lines = ["# Loss spikes, examined from the weights saved around them", ""]
    if not examined:
        lines.append("No spike was detected.")
    else:
        lines += [
            "Every step around each spike, with Adam's second moments and the update-to-weight ratios per "
            "parameter group: `python -m addrepro.analyze checkpoint=<this job> analysis=spikes`.",
            "",
        ]
    for spike, ex in examined:
        lines += [f"## Step {spike['step']}: train loss {spike['loss']:.4g}, {spike['ratio']:.3g}x its trend", ""]
        if ex is None:
            lines += ["No weights were saved around this spike.", ""]
            continue
        pts = ex["points"]
        places = sorted(pts["at"]["place_loss"], reverse=True)
        head = "| | step | " + " | ".join(f"place {j}" for j in places) + " | logit norm |"
        lines += ["Held-out loss per place (nats):", "", head, "|" + "---|" * (len(places) + 3)]
        for p in POINTS:
            if p in pts:
                cells = " | ".join(f"{pts[p]['place_loss'][j]:.4g}" for j in places)
                lines.append(f"| {p} | {pts[p]['step']} | {cells} | {pts[p]['logit_norm']:.4g} |")
        lines.append("")
        pairs = [(a, b) for a, b in (("before", "at"), ("at", "after")) if f"update_{a}_{b}" in ex]
        if pairs:
            lines += [
                "Weight change (L2): " + "; ".join(f"{a} → {b}: {ex[f'update_{a}_{b}']:.4g}" for a, b in pairs),
                "",
            ]
        groups = sorted({g for p in POINTS if p in pts and pts[p].get("adam") for g in pts[p]["adam"]})
        groups = groups or sorted({g for a, b in pairs for g in ex.get(f"groups_{a}_{b}", {})})
        if groups:
            lines += [
                "Per parameter group: Adam's sqrt(v̂) (RMS over the group's weights, once each step's update had "
                "taken in its gradient) at each point, and the update-to-weight ratio ‖ΔW‖/‖W‖ between points:",
                "",
                "| group | "
                + " | ".join(f"sqrt(v̂) {p}" for p in POINTS if p in pts)
                + " | "
                + " | ".join(f"‖ΔW‖/‖W‖ {a} → {b}" for a, b in pairs)
                + " |",
                "|---|" + "---|" * (sum(p in pts for p in POINTS) + len(pairs)),
            ]
            for g in groups:
                cells = [f"{pts[p]['adam'][g]:.3g}" if pts[p].get("adam") else "—" for p in POINTS if p in pts]
                cells += [f"{ex[f'groups_{a}_{b}'][g]:.3g}" for a, b in pairs]
                lines.append(f"| {g} | " + " | ".join(cells) + " |")
            lines.append("")
        for a, b in pairs:
            if f"relative_{a}_{b}" in ex:
                top = ", ".join(f"`{n}` {r:.3g}" for n, r in ex[f"relative_{a}_{b}"].items())
                lines += [f"Largest update-to-weight ratios ‖ΔW‖/‖W‖, {a} → {b}: {top}", ""]
        lines += [
            "Held-out examples whose loss rose most (summed over places), with the norm of that example's "
            "loss gradient over all weights (before / at / after):",
            "",
        ]
        for w in ex["worst"]:
            was = f"{w['loss_before']:.3g} → " if w["loss_before"] is not None else ""
            grads = " / ".join(f"{w[f'grad_norm_{p}']:.3g}" for p in POINTS if f"grad_norm_{p}" in w)
            lines.append(
                f"- `{w['example']}`: {was}{w['loss_at']:.3g} nats, most at place {w['place']}; gradient norm {grads}"
            )
        if ex.get("mechanism"):
            lines += ["", "Largest changes inside the model, before → after:", ""]
            for m in ex["mechanism"]:
                lines.append(f"- `{m['key']}`: {m['before']:.3g} → {m['after']:.3g} ({m['after'] - m['before']:+.3g})")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_spike_report(job_dir: Path, spikes: list[dict]) -> Path:
    examined = []
    for spike in spikes:
        try:
            examined.append((spike, examine_spike(job_dir, spike)))
        except CheckpointError:
            examined.append((spike, None))
    return atomic_write_text(Path(job_dir) / "spikes.md", spikes_markdown(examined))
