"""When each place leaves its starting shelf, across the jobs of a sweep: ``sweep_descent.png`` and ``.md``.

Every place starts on the shelf of a model that knows the answer's earlier digits but nothing of this
place's operands: the atlas level ``answer_prefix`` (log b for most digits of base b, about 2.11 for
the top digit of base 10, log 2 or less for the carry-out). A place's *descent step* is the first
logged step at which the running median (9 logs) of its train loss falls below the geometric mean of
that level and the next atlas level below it (half the level if there is none): for a digit of base
b, the moment it heads from log b to the naive-sum shelf log 2.

Places are compared by role (carry-out, top digit, …, units) so that digit counts share a panel; the
x axis is the first swept key other than the seeds, the colour the second; each seed is a point and
the line joins the means over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from addrepro.reports.job import place_atlas
from addrepro.reports.plots import save, series
from addrepro.reports.seed_stats import bootstrap_interval
from addrepro.rundir.atomic import atomic_write_text
from addrepro.shelves.detection import running_median
from addrepro.shelves.exits import distinct_levels
from addrepro.task.spec import TaskSpec, place_role, role_order

SEED_KEYS = ("seed", "data.seed")
PNG = "sweep_descent.png"
TABLE = "sweep_descent.md"


def descents(rows: list[dict], spec: TaskSpec) -> dict[int, dict]:
    """Per place: ``{"from": starting level, "threshold": nats, "step": descent step or None}``."""
    atlas = place_atlas(spec)
    out = {}
    for j in range(spec.n_places):
        steps, loss = series(rows, f"train/loss/place_{j}")
        start = atlas[j].get("answer_prefix")
        if not len(steps) or not start:
            continue
        below = sorted((v for v in distinct_levels(atlas[j]).values() if v < start * 0.97), reverse=True)
        threshold = math.sqrt(start * below[0]) if below else start / 2
        under = np.nonzero(running_median(loss, 9) < threshold)[0]
        step = int(steps[under[0]]) if under.size else None
        out[j] = {"from": f"{start:.3g}", "threshold": threshold, "step": step}
    return out


def axes_keys(keys: list[str]) -> tuple[str | None, str | None]:
    """The swept keys for the x axis and the colour: the first two that are not seeds."""
    rest = [k for k in keys if k not in SEED_KEYS]
    return (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


def descent_points(jobs: list[dict], keys: list[str]) -> list[dict]:
    """One point per job and role: ``{"role", "x", "group", "step", "from", "job"}``."""
    x_key, group_key = axes_keys(keys)
    points = []
    for job in jobs:
        spec = job["spec"]
        for j, d in descents(job["rows"], spec).items():
            points.append(
                {
                    "role": place_role(j, spec.n_digits),
                    "x": job["swept"].get(x_key) if x_key else 0,
                    "group": job["swept"].get(group_key) if group_key else None,
                    "step": d["step"],
                    "from": d["from"],
                    "job": job["name"],
                }
            )
    return points


def _grouped(points: list[dict]) -> dict[tuple, list[dict]]:
    by: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        by[(p["role"], p["group"], p["x"])].append(p)
    return by


def plot_descent(points: list[dict], roles: list[str], keys: list[str], path: Path) -> Path:
    x_key, group_key = axes_keys(keys)
    groups = sorted({p["group"] for p in points}, key=_order)
    cols = min(3, len(roles))
    nrows = math.ceil(len(roles) / cols)
    # One y scale for every panel, from 0: places are compared, and a drop from 40 to 30 steps must not
    # look like one from 890 to 270.
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.6 * cols, 3.2 * nrows + 0.6), squeeze=False, layout="constrained", sharey=True
    )
    by = _grouped(points)
    xs = sorted({p["x"] for p in points}, key=_order)
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    position = {x: (x if numeric else i) for i, x in enumerate(xs)}
    span = (max(position.values()) - min(position.values())) if len(xs) > 1 else 1
    for ax, role in zip(axes.flat, roles, strict=False):
        waiting = [p for p in points if p["role"] == role and p["step"] is None]
        if len(waiting) == sum(p["role"] == role for p in points):  # no job has left the shelf yet
            note = f"no descent yet\n(still on its starting shelf in all {len(waiting)} jobs)"
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4")
        for g, group in enumerate(groups):
            colour = plt.cm.tab10(g % 10)
            offset = (g - (len(groups) - 1) / 2) * 0.015 * span  # groups side by side at one x
            means_x, means_y = [], []
            for x in xs:
                pts = [p for p in by.get((role, group, x), []) if p["step"] is not None]
                if not pts:
                    continue
                px = position[x] + offset
                ys = [p["step"] for p in pts]
                ax.scatter([px] * len(ys), ys, s=14, color=colour, alpha=0.8, zorder=3)
                ax.vlines(px, min(ys), max(ys), color=colour, lw=1.0, alpha=0.6)
                means_x.append(px)
                means_y.append(float(np.mean(ys)))
            label = f"{group_key}={group}" if group_key else "mean over seeds"
            if means_x:
                ax.plot(means_x, means_y, color=colour, lw=1.2, label=label)
        ax.set_title(role, fontsize=9)
        ax.set_xticks([position[x] for x in xs], [str(x) for x in xs] if x_key else ["all jobs"])
        ax.set_xlabel(x_key or "no swept setting but seeds")
        lo, hi = min(position.values()), max(position.values())
        pad = 0.08 * (hi - lo) if hi > lo else 0.5
        ax.set_xlim(lo - pad, hi + pad)  # every panel alike, those without a point too
        ax.set_ylabel("descent step")
        ax.grid(alpha=0.2)
    axes.flat[0].set_ylim(bottom=0)  # after every panel is drawn: the shared top fits all of them
    for ax in axes.flat[len(roles) :]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    seeds = max((len(pts) for pts in by.values()), default=1)
    what = "points are seeds, bars their range, lines the mean" if seeds > 1 else "one run per point"
    fig.suptitle(f"step each place left its starting shelf: {what}", fontsize=10)
    return save(fig, path)


def _order(value: object) -> tuple:
    """Numbers by value, before anything else by text."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def descent_table(points: list[dict], roles: list[str], keys: list[str]) -> str:
    x_key, group_key = axes_keys(keys)
    head = ["role", *([group_key] if group_key else []), *([x_key] if x_key else []), "from (nats)", "seeds"]
    head += ["descent step: mean"]
    head += ["95% interval of the mean", "min–max", "not yet"]
    lines = ["| " + " | ".join(h for h in head) + " |", "|" + "---|" * len(head)]
    by = _grouped(points)
    for role in roles:
        for (r, group, x), pts in sorted(by.items(), key=lambda kv: (_order(kv[0][1]), _order(kv[0][2]))):
            if r != role:
                continue
            done = [p["step"] for p in pts if p["step"] is not None]
            mean = f"{np.mean(done):.0f}" if done else "–"
            interval = "{:.0f}–{:.0f}".format(*bootstrap_interval(done)) if len(done) > 1 else "–"
            spread = f"{min(done)}–{max(done)}" if done else "–"
            levels = ", ".join(sorted({p["from"] for p in pts}))
            cells = [role, *([str(group)] if group_key else []), *([str(x)] if x_key else []), levels, str(len(pts))]
            cells += [mean, interval, spread]
            lines.append("| " + " | ".join([*cells, str(len(pts) - len(done))]) + " |")
    return "\n".join(lines)


def write_descent(sweep_dir: Path, jobs: list[dict], keys: list[str]) -> list[Path]:
    """``sweep_descent.png`` and ``sweep_descent.md``; ``jobs``: ``{"name", "spec", "rows", "swept"}``."""
    points = descent_points(jobs, keys)
    if not points:
        return []
    roles = role_order([j["spec"].n_digits for j in jobs])
    roles = [r for r in roles if any(p["role"] == r for p in points)]
    text = (
        f"# When each place left its starting shelf, {len(jobs)} jobs\n\n"
        "Descent step: the first step at which the running median of the place's train loss fell below the "
        "geometric mean of its starting shelf and the next atlas level below it. `from`: the loss of that "
        "starting shelf, in nats (the atlas level of a model that knows only the answer digits before the place). "
        "`not yet`: jobs in which it had not by the end of training. The interval is a percentile bootstrap of the "
        "mean over the seeds that descended (10,000 resamples): with few seeds it is narrow and optimistic.\n\n"
        + descent_table(points, roles, keys)
        + "\n"
    )
    return [plot_descent(points, roles, keys, sweep_dir / PNG), atomic_write_text(sweep_dir / TABLE, text)]
