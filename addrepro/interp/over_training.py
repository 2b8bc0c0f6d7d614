"""Any analysis over all checkpoints of a run folder, as time-evolution plots.

Checkpoints are ``<job>/checkpoints/*.ckpt`` ordered by their stored step (``last.ckpt`` is skipped
when a periodic checkpoint has the same step). Each analysis' ``summarize`` turns one result into
named scalars ``"group/series"``; the plot draws one panel per group, with the series that move most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from addrepro.interp.common import Subject, load_subject, new_figure
from addrepro.interp.registry import ANALYSES
from addrepro.rundir.checkpoints import checkpoint_dir, checkpoints_by_step, load_checkpoint


def run(
    job_dir: str | Path, of: str, subject_options: dict | None = None, steps: list[int] | None = None, **options: Any
) -> dict:
    """Run analysis ``of`` on every checkpoint (or those at ``steps``); ``series[name]`` lists its value at
    each step."""
    module = ANALYSES[of]
    if not checkpoints_by_step(job_dir):
        raise ValueError(f"checkpoint={job_dir}: no checkpoints in {checkpoint_dir(job_dir)} to follow over training")
    checkpoints = checkpoints_by_step(job_dir, steps)
    first = load_checkpoint(checkpoints[0][1])
    for _, path in checkpoints[1:]:  # one run's checkpoints: a copied-in one of another model is named
        other = load_checkpoint(path)
        if other.get("task") != first.get("task") or other.get("model_config") != first.get("model_config"):
            raise ValueError(
                f"checkpoint={job_dir}: {path.name} holds another task or model than {checkpoints[0][1].name}; "
                "over_training follows one run"
            )
    steps, series = [], {}
    for i, (step, path) in enumerate(checkpoints):
        subject: Subject = load_subject(path, **(subject_options or {}))
        values = module.summarize(module.run(subject, **options))
        for name, value in values.items():
            series.setdefault(name, [float("nan")] * i).append(value)
        for name in set(series) - set(values):
            series[name].append(float("nan"))
        steps.append(step)
    return {
        "analysis": "over_training",
        "of": of,
        "job_dir": str(job_dir),
        "steps": steps,
        "checkpoints": [str(p) for _, p in checkpoints],
        "series": series,
    }


# What the followed summary values are, where an analysis's values all mean one thing.
Y_LABELS = {
    "ablation": "val loss change, zero-ablated (nats)",
    "logit_attribution": "direct logit of the right digit",
    "attention": "attention on the own operands",
    "composition": "composition score",
    "patching": "restored fraction",
    "probes": "probe accuracy",
    "breakdown": "loss term (nats)",
    "condition": "loss range over the cells (nats)",
}


def plot(result: dict, max_series: int = 8) -> Any:
    groups: dict[str, list[str]] = {}
    for name in result["series"]:
        groups.setdefault(name.split("/", 1)[0], []).append(name)
    n = max(len(groups), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = new_figure(rows, cols, width=5.0, height=3.2)
    steps = result["steps"]
    # One colour per series label (a place, a component) in every panel: place_1 is one colour throughout.
    labels = list(dict.fromkeys(name.split("/", 1)[-1] for name in result["series"]))
    palette = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
    colours = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    for ax, (group, names) in zip(axes.flat, groups.items(), strict=False):
        movement = {m: np.nanmax(np.abs(result["series"][m])) if result["series"][m] else 0 for m in names}
        for m in sorted(names, key=lambda m: -movement[m])[:max_series]:
            label = m.split("/", 1)[-1]
            ax.plot(steps, result["series"][m], marker=".", label=label, color=colours[label])
        ax.set_xscale("symlog", linthresh=max(1, min([s for s in steps if s > 0], default=1)))
        ax.set_xlabel("step")
        ax.set_ylabel(Y_LABELS.get(result["of"], ""), fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"{result['of']} over training")
    fig.tight_layout()
    return fig
