"""Every step around a loss spike (or any step), replayed from the run's last resumable checkpoint
before it: what rose first — the gradient, Adam's second moments, the update, or the loss.

The run logs every ``trainer.log_every_n_steps`` steps, too coarse to see a precursor: at that
resolution the gradient norm and the loss often rise in the same logged step. Here the steps of a
window (``before`` steps up to the spike's first logged step, ``after`` steps from it) are retaken
from the last resumable checkpoint ``step_<N>.ckpt`` at or before the window (or from the run's
initialisation) with ``addrepro.training.replay``, and every one is recorded. Where the run logged a
step, the replayed train loss is compared with the logged one: their largest difference says how
exactly the replay is the run.

Per window, a series *rises* at the first step of the window where it crosses from below to above
``rise`` times its median over the steps before the centre and stays there for ``HOLD`` steps; the
lead of a series is the loss's rise step minus its own (positive: it rose before the loss did).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from addrepro.reports.job import load_spikes
from addrepro.rundir.checkpoints import checkpoint_dir, load_checkpoint
from addrepro.rundir.metrics_file import load_rows
from addrepro.training.replay import MAX_REPLAY_STEPS, replay

HOLD = 3  # steps a series stays above its level to count as risen
MAX_WINDOW = 10_000  # steps on either side of a centre
WATCHED = ("train/loss", "train/grad_norm/global", "adam/global", "update/global")


def resumable_checkpoints(job_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the job's resumable checkpoints ``step_<N>.ckpt``, by step."""
    found = []
    for path in checkpoint_dir(job_dir).glob("step_*.ckpt"):
        tail = path.stem.removeprefix("step_")
        if tail.isdigit():
            found.append((int(tail), path))
    return sorted(found)


def window_start(job_dir: Path, first: int) -> tuple[int, Path | None]:
    """The step and file of the last resumable checkpoint at or before ``first`` (``(0, None)``: none,
    the replay starts from the initialisation)."""
    usable = [(s, p) for s, p in resumable_checkpoints(job_dir) if s <= first]
    return usable[-1] if usable else (0, None)


def rise_step(rows: list[dict], key: str, centre: int, rise: float, hold: int = HOLD) -> int | None:
    """The first step of ``rows`` where ``key`` crosses from below to above ``rise`` times its median
    before ``centre`` and stays above for ``hold`` steps (a noisy per-step series crosses once by chance)."""
    before = [r[key] for r in rows if r["step"] < centre and math.isfinite(r.get(key, math.nan))]
    if not before:
        return None
    level = float(np.median(before))
    above = [r.get(key, -math.inf) > rise * level for r in rows]
    for i in range(1, len(rows) - hold + 1):
        if not above[i - 1] and all(above[i : i + hold]):  # from below: a window that opens above has not risen
            return rows[i]["step"]
    return None


def examine_window(job_dir: Path, centre: int, before: int, after: int, rise: float) -> dict:
    first = max(centre - before, 0)
    start, path = window_start(job_dir, first)
    state = load_checkpoint(path) if path is not None else None
    last = state or load_checkpoint(job_dir)
    drawn_on = last.get("data", {}).get("device", "cpu")
    if drawn_on != "cpu":  # from the initialisation too: the run's batches came from another generator
        raise ValueError(f"{job_dir} drew its data on {drawn_on}: a replay on the CPU would train on other batches")
    config = last["config"]
    max_steps = int(config["trainer"]["max_steps"])
    until = min(centre + after, max_steps)
    if until - start > MAX_REPLAY_STEPS:
        raise ValueError(
            f"step {centre}: the last resumable checkpoint before it is at step {start}, over {MAX_REPLAY_STEPS} "
            "steps away (train with a smaller trainer.ckpt_every_n_steps)"
        )
    rows = replay(config, until, record_from=first, state=state)
    logged = {r["step"]: r["train/loss"] for r in load_rows(job_dir) if "train/loss" in r}
    both = [(r["train/loss"], logged[r["step"]]) for r in rows if r["step"] in logged]
    differences = [abs(a - b) for a, b in both if math.isfinite(a) and math.isfinite(b)]
    keys = [k for k in rows[0] if k.startswith(("train/loss", "train/grad_norm/", "adam/", "update/"))] if rows else []
    rises = {k: rise_step(rows, k, centre, rise) for k in keys}
    loss_rise = rises.get("train/loss")
    # Adam's denominator over the calm stretch: a second moment decaying while gradients stay small makes
    # the same gradient a larger update.
    calm = [r for r in rows if r["step"] < (loss_rise if loss_rise is not None else centre)]
    drift = {g: (calm[0][g], calm[-1][g]) for g in keys if g.startswith("adam/")} if len(calm) > 1 else {}
    calm_steps = [calm[0]["step"], calm[-1]["step"]] if len(calm) > 1 else None
    return {
        "centre": centre,
        "from_step": start,
        "from_checkpoint": str(path) if path is not None else None,
        "logged_steps_compared": len(both),
        "largest_logged_difference": max(differences) if differences else None,
        "rise_step": rises,
        "lead": {k: (loss_rise - s if loss_rise is not None and s is not None else None) for k, s in rises.items()},
        "adam_before_rise": drift,
        "calm_steps": calm_steps,
        "rows": rows,
    }


def run(job_dir: str | Path, at: list[int] | None = None, before: int = 30, after: int = 30, rise: float = 2.0) -> dict:
    """Windows around the steps ``at`` (default: the first step of every spike in ``spikes.json``)."""
    job_dir = Path(job_dir)
    if at is None:
        at = [int(s.get("first_step", s["step"])) for s in load_spikes(job_dir)]
        if not at:
            raise ValueError(f"{job_dir}/spikes.json lists no spike: give spikes.at=[...] to look at chosen steps")
    windows = [examine_window(job_dir, s, before, after, rise) for s in sorted(set(at))]
    return {
        "analysis": "spikes",
        "job_dir": str(job_dir),
        "before": before,
        "after": after,
        "rise": rise,
        "windows": windows,
    }


def summarize(result: dict) -> dict[str, float]:
    out = {}
    for w in result["windows"]:
        for key, lead in w["lead"].items():
            if key in WATCHED[1:] and lead is not None:
                out[f"step_{w['centre']}/lead/{key}"] = float(lead)
    return out


def plot(result: dict) -> Any:
    import matplotlib  # noqa: PLC0415 - for the figure only

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    windows = result["windows"]
    panels = (
        ("train/loss/place_", "train loss per place (nats)"),
        ("train/grad_norm/", "gradient norm per group"),
        ("adam/", "Adam sqrt(v̂), RMS per group"),
        ("update/", "update-to-weight ratio per group"),
    )
    cols = max(len(windows), 1)
    fig, axes = plt.subplots(len(panels), cols, figsize=(4.2 * cols, 2.6 * len(panels)), squeeze=False)
    for col, w in enumerate(windows):
        steps = [r["step"] for r in w["rows"]]
        for row, (prefix, title) in enumerate(panels):
            ax = axes[row, col]
            keys = sorted(k for k in (w["rows"][0] if w["rows"] else {}) if k.startswith(prefix) and "/layer_" not in k)
            for key in keys:
                values = [r[key] for r in w["rows"]]
                if any(v > 0 for v in values):
                    ax.plot(steps, values, lw=1, label=key.removeprefix(prefix))
            ax.axvline(w["centre"], color="k", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{title}, step {w['centre']}", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.legend(fontsize=6)
        axes[-1, col].set_xlabel("step")
    fig.tight_layout()
    return fig


def markdown(result: dict) -> str:
    lines = [
        "# Every step around each spike",
        "",
        f"Replayed from the last resumable checkpoint before each window ({result['before']} steps before, "
        f"{result['after']} from the spike's first logged step). A series *rises* where it first exceeds "
        f"{result['rise']}× its median before that step and stays above for {HOLD} steps; its lead is the "
        "loss's rise step minus its own (positive: it rose first).",
        "",
    ]
    for w in result["windows"]:
        diff = w["largest_logged_difference"]
        same = (
            f"the {w['logged_steps_compared']} logged steps in it replayed to within {diff:.3g} nats"
            if diff is not None
            else "no logged step in it"
        )
        source = Path(w["from_checkpoint"]).name if w["from_checkpoint"] else "the initialisation"
        lines += [f"## Step {w['centre']}", "", f"From {source} (step {w['from_step']}); {same}.", ""]
        lines += ["| series | rises at | lead (steps) |", "|---|---|---|"]
        for key in WATCHED:
            at, lead = w["rise_step"].get(key), w["lead"].get(key)
            lines.append(f"| `{key}` | {at if at is not None else '—'} | {lead if lead is not None else '—'} |")
        lines.append("")
        drift = w["adam_before_rise"]
        if drift:
            first, last = w["calm_steps"]
            cells = ", ".join(
                f"{g.removeprefix('adam/')} {a:.3g} → {b:.3g}" for g, (a, b) in drift.items() if "/layer_" not in g
            )
            lines += [f"Adam sqrt(v̂) (RMS) from step {first} to {last}, before the loss rose: {cells}.", ""]
    return "\n".join(lines) + "\n"
