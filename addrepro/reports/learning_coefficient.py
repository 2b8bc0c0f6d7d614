"""The local learning coefficient over a run's checkpoints, beside its per-place losses and shelf exits.

For every checkpoint of a job (log-spaced weights, shelf-exit pairs, resumable ones; or those at
chosen steps) the LLC is estimated with ``addrepro.metrics.llc`` on the run's own training loss —
batches from its own training distribution (sampler, digit count, finite set) at that step — for the
whole model and, as asked, restricted to each attention head or each MLP (the other weights held at
the checkpoint's values). The figure puts the LLC curve under the per-place held-out losses, with the
shelf exits marked on both; the table beside it gives, for every shelf exit whose two checkpoints
were saved, the LLC just before and just after the exit. ``sweep`` adds the calibration that the
SGLD literature asks for: the estimate at one checkpoint over a grid of step sizes and localisations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from addrepro.metrics.llc import SGLDSettings, estimate_llc
from addrepro.metrics.place import place_stats
from addrepro.model.transformer import Transformer, model_from_checkpoint
from addrepro.rundir.checkpoints import checkpoints_by_step, load_checkpoint
from addrepro.rundir.metrics_file import load_rows, read_records
from addrepro.task.spec import SamplerSpec, TaskSpec
from addrepro.task.streams import FiniteBatches, InfiniteBatches, validation_tokens

PART_KINDS = ("all", "heads", "mlp")
EXIT_FIELDS = {"place": int, "step": int, "last_on_shelf": int}


def part_masks(model: Transformer, kinds: list[str]) -> dict[str, list[torch.Tensor | None]]:
    """Per part, one mask per parameter (None: the whole parameter moves; zeros: it stays)."""
    params = list(model.named_parameters())
    out: dict[str, list[torch.Tensor | None]] = {}
    if "all" in kinds:
        out["all"] = [None] * len(params)
    cfg = model.cfg
    for layer in range(cfg.n_layers):
        if "heads" in kinds:
            for h in range(cfg.n_heads):
                masks = []
                for name, p in params:
                    if name.startswith(f"blocks.{layer}.attn.W_"):
                        m = torch.zeros_like(p)
                        m[:, h] = 1.0  # (K, n_heads, ...): this head's slice
                        masks.append(m)
                    else:
                        masks.append(torch.zeros_like(p))
                out[f"L{layer}H{h}"] = masks
        if "mlp" in kinds and not cfg.attn_only:
            prefix = f"blocks.{layer}.mlp."
            out[f"L{layer}.mlp"] = [None if n.startswith(prefix) else torch.zeros_like(p) for n, p in params]
    return out


# The batches' generator is seeded apart from the SGLD noise's (the same seed would share one stream).
BATCH_SEED_OFFSET = 1_000_003


def batches(ckpt: dict, spec: TaskSpec, batch_size: int | None, seed: int, step: int) -> Callable[[], torch.Tensor]:
    """A draw of a batch from the run's training distribution as it was at ``step``: its sampler (a
    curriculum at that step's stage, every draw), or its finite training set (whole, when the run
    trained on whole-set batches)."""
    d = ckpt["config"]["data"]
    size = batch_size if batch_size is not None else d.get("batch_size")
    if d.get("train_size") is not None:
        train, _ = validation_tokens(spec, d["val_size"], d["val_seed"], d["train_size"], d["seed"], with_train=True)
        return FiniteBatches(train, size, seed + BATCH_SEED_OFFSET, spec).next
    stream = InfiniteBatches(spec, size or 64, seed + BATCH_SEED_OFFSET, "cpu", SamplerSpec.from_config(d))

    def draw() -> torch.Tensor:
        stream.draws.fill_(step)  # the stage of a curriculum is the checkpoint's, for every draw
        return stream.next()

    return draw


def sample_size(ckpt: dict, n: int | None) -> int:
    """The n of nβ = n / log n: as given, else a finite training set's size, else 1000."""
    if n is not None:
        return n
    train_size = ckpt["config"]["data"].get("train_size")
    return max(int(train_size), 3) if train_size is not None else SGLDSettings.n


def measure(ckpt: dict, settings: SGLDSettings, kinds: list[str], batch_size: int | None) -> dict[str, dict]:
    """LLC estimates of one checkpoint, per part."""
    model, spec = model_from_checkpoint(ckpt)
    model.train(False)
    params = [p for _, p in model.named_parameters()]
    out = {}
    for name, masks in part_masks(model, kinds).items():
        next_batch = batches(ckpt, spec, batch_size, settings.seed, int(ckpt["step"]))

        def loss_of(tokens: torch.Tensor) -> torch.Tensor:
            return place_stats(model, tokens.unsqueeze(0), spec).loss[0]

        out[name] = estimate_llc(params, loss_of, next_batch, settings, masks)
    return out


def run(
    job_dir: str | Path,
    steps: list[int] | None = None,
    parts: list[str] | None = None,
    n: int | None = None,
    eps: float = SGLDSettings.eps,
    gamma: float = SGLDSettings.gamma,
    chains: int = SGLDSettings.chains,
    draws: int = SGLDSettings.draws,
    burn_in: int = SGLDSettings.burn_in,
    batch_size: int | None = None,
    seed: int = 0,
    sweep: bool = False,
) -> dict:
    """The LLC at every checkpoint of ``job_dir`` (or those at ``steps``; ``job_dir`` may be one file)."""
    path = Path(job_dir)
    kinds = list(parts or ["all"])
    if path.is_file():
        found, job = [(int(load_checkpoint(path)["step"]), path)], path.parent.parent
    else:
        found, job = checkpoints_by_step(path, steps, "llc.steps"), path
    if not found:
        raise ValueError(f"checkpoint={job_dir}: no checkpoints to estimate the LLC of")
    n = sample_size(load_checkpoint(found[0][1]), n)
    settings = SGLDSettings(n=n, eps=eps, gamma=gamma, chains=chains, draws=draws, burn_in=burn_in, seed=seed)
    points = []
    for step, ckpt_path in found:
        estimates = measure(load_checkpoint(ckpt_path), settings, kinds, batch_size)
        points.append({"step": step, "checkpoint": str(ckpt_path), "parts": estimates})
    result = {
        "analysis": "llc",
        "job_dir": str(job),
        "settings": settings.as_dict(),
        "batch_size": batch_size,
        "points": points,
        "exits": exit_changes(job, points),
    }
    if sweep:
        result["sweep"] = calibration(load_checkpoint(found[-1][1]), settings, batch_size)
        result["sweep_step"] = found[-1][0]
    return result


def calibration(ckpt: dict, settings: SGLDSettings, batch_size: int | None) -> list[dict]:
    """The whole model's estimate over step sizes ε/3, ε, 3ε and localisations γ/10, γ, 10γ."""
    out = []
    for eps in (settings.eps / 3, settings.eps, settings.eps * 3):
        for gamma in (settings.gamma / 10, settings.gamma, settings.gamma * 10):
            e = measure(ckpt, replace(settings, eps=eps, gamma=gamma), ["all"], batch_size)["all"]
            out.append(
                {"eps": eps, "gamma": gamma, "llc": e["llc"], "llc_se": e["llc_se"], "warnings": e["diagnostics"]}
            )
    return out


def shelf_exits(job: Path) -> list[dict]:
    """The job's shelf exits (``shelf_exits.json``; none when it has no readable file)."""
    try:
        return read_records(job / "shelf_exits.json", EXIT_FIELDS)
    except ValueError:
        return []


def exit_changes(job: Path, points: list[dict]) -> list[dict]:
    """For each shelf exit whose ``before`` and ``after`` checkpoints were measured: the LLC at each."""
    at = {p["step"]: p["parts"]["all"]["llc"] for p in points if "all" in p["parts"]}
    out = []
    for e in shelf_exits(job):
        before, after = e["last_on_shelf"], e["step"]
        if before in at and after in at:
            out.append({"place": e["place"], "level": e.get("level"), "before": before, "after": after,
                        "llc_before": at[before], "llc_after": at[after]})  # fmt: skip
    return out


def summarize(result: dict) -> dict[str, float]:
    last = result["points"][-1]
    return {f"{name}/step_{last['step']}": e["llc"] for name, e in last["parts"].items()}


def plot(result: dict) -> Any:
    import matplotlib  # noqa: PLC0415 - for the figure only

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    job = Path(result["job_dir"])
    try:
        rows = load_rows(job)
    except (OSError, ValueError):
        rows = []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    places = sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r if k.startswith("val/loss/place_")})
    colours = {}
    for j in places:
        pts = [(r["step"], r[f"val/loss/place_{j}"]) for r in rows if f"val/loss/place_{j}" in r]
        (line,) = top.plot(*zip(*pts, strict=True), lw=1, label=f"place {j}")
        colours[j] = line.get_color()
    top.set_yscale("log")
    top.set_ylabel("held-out loss (nats)")
    if places:
        top.legend(fontsize=7, ncol=3)
    steps = [p["step"] for p in result["points"]]
    names = list(result["points"][0]["parts"]) if result["points"] else []
    for name in names:
        values = [p["parts"][name]["llc"] for p in result["points"]]
        errors = [p["parts"][name]["llc_se"] for p in result["points"]]
        errors = [e if math.isfinite(e) else 0.0 for e in errors]
        bottom.errorbar(steps, values, yerr=errors, marker=".", lw=1 if name == "all" else 0.7, capsize=2, label=name)
    bottom.set_ylabel("local learning coefficient λ̂")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7, ncol=4)
    for e in shelf_exits(job):  # every exit, in its place's colour, whether or not its checkpoints were measured
        for ax in (top, bottom):
            ax.axvline(e["step"], color=colours.get(e["place"], "grey"), ls=":", lw=0.9)
    for ax in (top, bottom):
        ax.set_xscale("symlog", linthresh=max(1, min([s for s in steps if s > 0], default=1)))
        ax.set_xlim(left=0)  # steps are never negative: symlog would draw an empty negative side
        ax.grid(alpha=0.2)
    s = result["settings"]
    fig.suptitle(
        f"LLC by SGLD (nβ = {s['n_beta']:.0f}, ε = {s['eps']:g}, γ = {s['gamma']:g}, {s['chains']} chains × "
        f"{s['draws']} draws); dotted: shelf exits, in the colour of the place",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def markdown(result: dict) -> str:
    s = result["settings"]
    names = list(result["points"][0]["parts"]) if result["points"] else []
    lines = [
        "# Local learning coefficient over training",
        "",
        f"SGLD: n = {s['n']} (nβ = n / log n = {s['n_beta']:.1f}), ε = {s['eps']:g}, γ = {s['gamma']:g}, "
        f"{s['chains']} chains of {s['burn_in']} + {s['draws']} steps, seed {s['seed']}; ± is the standard "
        "error over chains.",
        "",
        "| step | " + " | ".join(names) + " | warnings |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for p in result["points"]:
        cells = " | ".join(f"{p['parts'][n]['llc']:.3g} ± {p['parts'][n]['llc_se']:.2g}" for n in names)
        warnings = sum(len(p["parts"][n]["diagnostics"]) for n in names)
        lines.append(f"| {p['step']} | {cells} | {warnings} |")
    lines.append("")
    if result["exits"]:
        lines += [
            "## Across each shelf exit (whole model)",
            "",
            "| place | left | before | after | Δλ̂ |",
            "|---|---|---|---|---|",
        ]
        for e in result["exits"]:
            lines.append(
                f"| {e['place']} | {e['level']} | {e['llc_before']:.3g} (step {e['before']}) | "
                f"{e['llc_after']:.3g} (step {e['after']}) | {e['llc_after'] - e['llc_before']:+.3g} |"
            )
        lines.append("")
    if result.get("sweep"):
        lines += [f"## Calibration at step {result['sweep_step']}", "", "| ε | γ | λ̂ | warnings |", "|---|---|---|---|"]
        for c in result["sweep"]:
            lines.append(
                f"| {c['eps']:.3g} | {c['gamma']:.3g} | {c['llc']:.3g} ± {c['llc_se']:.2g} | {len(c['warnings'])} |"
            )
        lines.append("")
    notes = sorted({w for p in result["points"] for n in names for w in p["parts"][n]["diagnostics"]})
    if notes:
        lines += ["## Warnings", "", *[f"- {w}" for w in notes], ""]
    return "\n".join(lines) + "\n"
