"""The mechanism timeline: per-place loss, attention and carry probes on one step axis, and its narrative.

``timeline.png`` aligns, per run: (1) each place's train loss (running mean) with its detected shelves,
(2) per place, the largest attention mass any head puts from the position predicting it onto its own
operands (a_j, b_j) and onto those of the place below, and (3) the carry-in probe accuracy per place,
one fixed colour per place in every panel. ``timeline.md`` says, per place (consecutive rests at one
atlas level merged), each shelf (atlas level, steps), what changed inside the model while the place left it (the head
whose attention on a_j, b_j and on a_{j-1}, b_{j-1} rose most, the carry probe) and the spikes.
Every number in it is read from the logged metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from addrepro.reports.plots import colour, place_label, running_mean, save, series, smoothing_window
from addrepro.rundir.atomic import atomic_write_text
from addrepro.rundir.metrics_file import RunFileError, read_records
from addrepro.shelves.detection import Shelf, running_median
from addrepro.shelves.trend import describe_trend, shelf_trend
from addrepro.task.spec import TaskSpec

ATTN_KEY = re.compile(r"^mech/attn/L(\d+)H(\d+)/place_(\d+)/(own|lower)$")


def place_colour(j: int, spec: TaskSpec) -> tuple | str:
    """The colour of place j in every timeline panel: distinct for every place."""
    return colour(j)


def attention_keys(rows: list[dict]) -> dict[tuple[str, int, str], str]:
    """``(head, place, own|lower) -> key`` for every attention-mass key in the rows."""
    out = {}
    for key in sorted({k for r in rows for k in r}):
        m = ATTN_KEY.match(key)
        if m:
            out[(f"L{m[1]}H{m[2]}", int(m[3]), m[4])] = key
    return out


def value_at(rows: list[dict], key: str, step: float, after: bool = False) -> tuple[float, float] | None:
    """``(step, value)`` of ``key``: the last logged at or before ``step`` (or, ``after``, the first at or after)."""
    steps, values = series(rows, key)
    if not len(steps):
        return None
    if after:
        i = int(np.searchsorted(steps, step, side="left"))
        i = min(i, len(steps) - 1)
    else:
        i = int(np.searchsorted(steps, step, side="right")) - 1
        i = max(i, 0)
    return float(steps[i]), float(values[i])


@dataclass
class Change:
    """A logged quantity before and after a shelf exit."""

    name: str  # e.g. "L0H2 on a3, b3"
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class Exit:
    """A place leaving a shelf: from the shelf's last step to the start of what came next."""

    place: int
    shelf: Shelf
    until: float  # the start of the next shelf, else the first log clearly below this one (or the last log)
    next_level: str | None
    changes: list[Change]


def operand_names(spec: TaskSpec, j: int) -> str:
    return f"a{j}, b{j}"


def merge_rests(shelves: list[Shelf], steps: np.ndarray | None = None, loss: np.ndarray | None = None) -> list[Shelf]:
    """Consecutive shelves at the same atlas level as one rest: noise cuts a long rest into pieces,
    and the loss in between stays at that level (it would otherwise be detected at another).

    Given the curve (``steps``, ``loss``), pieces stay apart when the loss truly left the level in
    between: its running median fell below half the level or rose above twice it.
    """
    merged: list[Shelf] = []
    smooth = running_median(np.asarray(loss, dtype=float), 9) if loss is not None and len(loss) else None
    for shelf in shelves:
        last = merged[-1] if merged else None
        if last is not None and shelf.atlas_level is not None and shelf.atlas_level == last.atlas_level:
            if smooth is not None and steps is not None:
                gap = smooth[(steps > last.end_step) & (steps < shelf.start_step)]
                level = last.atlas_loss or last.level
                if gap.size and (gap.min() < level / 2 or gap.max() > level * 2):
                    merged.append(shelf)
                    continue
            a, b = last.end_step - last.start_step + 1, shelf.end_step - shelf.start_step + 1
            level = (last.level * a + shelf.level * b) / (a + b)  # weighted by length
            merged[-1] = replace(last, end_step=shelf.end_step, level=level)
        else:
            merged.append(shelf)
    return merged


def shelf_exits(rows: list[dict], spec: TaskSpec, shelves: dict[int, list[Shelf]]) -> list[Exit]:
    """Every shelf a place left, with the largest attention rises and the carry-probe change across it."""
    keys = attention_keys(rows)
    exits = []
    for j in range(spec.n_places):
        steps, loss = series(rows, f"train/loss/place_{j}")
        last_step = float(steps.max()) if len(steps) else 0.0  # the place's own curve ends here
        rests = merge_rests(shelves.get(j, []))
        for i, shelf in enumerate(rests):
            following = rests[i + 1] if i + 1 < len(rests) else None
            if shelf.end_step >= last_step or shelf.atlas_level == "exact":
                continue  # still resting there when the run ended; or exact, left only by noise or a spike
            until = following.start_step if following is not None else last_step
            # ... or earlier, where the loss was already clearly below this level (it went on falling)
            level = shelf.atlas_loss or shelf.level
            below = np.nonzero((steps > shelf.end_step) & (running_median(loss, 9) < level / 2))[0]
            until = min(until, float(steps[below[0]])) if below.size else until
            changes = []
            for kind, place in (("own", j), ("lower", j - 1)):
                best = None
                for (head, p, k), key in keys.items():
                    if p != j or k != kind:
                        continue
                    before, after = value_at(rows, key, shelf.end_step), value_at(rows, key, until, after=True)
                    if before is None or after is None:
                        continue
                    change = Change(f"{head} on {operand_names(spec, place)}", before[1], after[1])
                    if best is None or change.delta > best.delta:
                        best = change
                if best is not None:
                    changes.append(best)
            probe = f"mech/probe/carry_in/place_{j}/acc"
            before, after = value_at(rows, probe, shelf.end_step), value_at(rows, probe, until, after=True)
            if before is not None and after is not None:
                changes.append(Change(f"carry-in probe at place {j}", before[1], after[1]))
            exits.append(Exit(j, shelf, until, following.atlas_level if following else None, changes))
    return exits


def shelf_name(shelf: Shelf) -> str:
    return shelf.atlas_level or "an unnamed level"


def timeline_markdown(
    rows: list[dict],
    spec: TaskSpec,
    shelves: dict[int, list[Shelf]],
    spikes: list[dict],
    saved_exits: list[dict] = (),
) -> str:
    """The narrative: per place (carry-out first), each shelf and what changed as the place left it;
    the spikes; and the checkpoints saved at shelf exits during training (``saved_exits``, from
    ``shelf_exits.json``)."""
    exits = {(e.place, e.shelf.start_step): e for e in shelf_exits(rows, spec, shelves)}
    lines = [f"# Timeline: {spec.n_digits}-digit base {spec.base} ({spec.order}, {spec.task})", ""]
    for j in range(spec.n_places - 1, -1, -1):
        lines.append(f"## {place_label(j, spec)}")
        if not shelves.get(j):
            lines.append("No shelf detected.")
        for shelf in merge_rests(shelves.get(j, [])):
            atlas = f" (atlas {shelf.atlas_loss:.4g})" if shelf.atlas_loss is not None else ""
            steps, loss = series(rows, f"train/loss/place_{j}")
            trend = describe_trend(shelf_trend(steps, loss, shelf.start_step, shelf.end_step))
            line = (
                f"- Rested at {shelf_name(shelf)}, loss {shelf.level:.4g}{atlas}, "
                f"steps {shelf.start_step}–{shelf.end_step} ({trend})"
            )
            exit_ = exits.get((j, shelf.start_step))
            if exit_ is None:
                still = shelf.end_step >= max((r["step"] for r in rows if f"train/loss/place_{j}" in r), default=0)
                lines.append(line + ("; still there at the end of the run." if still else "."))
                continue
            then = f" for {exit_.next_level}" if exit_.next_level else ""
            lines.append(f"{line}; left it between steps {shelf.end_step} and {exit_.until:g}{then}.")
            for change in exit_.changes:
                lines.append(f"  - {change.name}: {change.before:.3g} → {change.after:.3g} ({change.delta:+.3g})")
        lines.append("")
    lines.append("## Spikes")
    if not spikes:
        lines.append("None detected.")
    for s in spikes:
        lines.append(f"- step {s['step']}: train loss {s['loss']:.4g}, {s['ratio']:.3g}x its trend {s['baseline']:.4g}")
    if spikes:
        lines += ["", "Each is examined from the weights saved around it in `spikes.md`."]
    if saved_exits:
        lines += ["", "## Checkpoints at shelf exits", ""]
        lines.append(
            "Saved during training, to analyse exactly there (`python -m addrepro.analyze checkpoint=<file>`). "
            "The detector that saves them sees only the logs so far and calls an exit once the loss is clearly "
            "off the shelf (below half its level, or settled on a lower one), so its steps can come later than "
            "the whole-curve detection above, which finds where the curve bends; each line gives both."
        )
        for e in saved_exits:
            stem = f"checkpoints/shelf_exit_{e['step']}_place{e['place']}"
            after = [
                x
                for x in exits.values()
                if x.place == e["place"]
                and x.shelf.start_step <= e["last_on_shelf"]
                and e["start_step"] <= x.shelf.end_step
            ]
            whole = (
                f"; whole curve: left between steps {after[0].shelf.end_step} and {after[0].until:g}"
                if after
                else "; the whole-curve detection found no shelf there"
            )
            lines.append(
                f"- {place_label(e['place'], spec)} left {e['level']} (rested from step {e['start_step']}): "
                f"`{stem}_before.ckpt` (step {e['last_on_shelf']}), `{stem}_after.ckpt` (step {e['step']}){whole}"
            )
    return "\n".join(lines) + "\n"


# Legends beside the panels, never over the curves they name.
OUTSIDE = {"fontsize": 7, "title_fontsize": 7, "loc": "center left", "bbox_to_anchor": (1.01, 0.5), "frameon": False}


def plot_timeline(
    rows: list[dict], spec: TaskSpec, shelves: dict[int, list[Shelf]], spikes: list[dict], path: Path, name: str = ""
) -> Path:
    """Loss with shelves, attention on own operands per head, carry probes: one step axis."""
    fig, (ax_loss, ax_attn, ax_probe) = plt.subplots(3, 1, figsize=(10.5, 9), sharex=True)
    for j in range(spec.n_places - 1, -1, -1):
        shade = place_colour(j, spec)
        steps, loss = series(rows, f"train/loss/place_{j}")
        if len(steps):
            ax_loss.plot(
                steps, running_mean(loss, smoothing_window(len(loss))), color=shade, lw=1.2, label=place_label(j, spec)
            )
        for shelf in shelves.get(j, []):
            ax_loss.hlines(shelf.level, shelf.start_step, shelf.end_step, color=shade, lw=4, alpha=0.35)
    for s in spikes:
        for ax in (ax_loss, ax_attn, ax_probe):
            ax.axvline(s["step"], color="C3", lw=0.8, ls="--", alpha=0.7)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("train loss (nats)")
    if ax_loss.lines:
        ax_loss.legend(**OUTSIDE, title="thick bars: shelves\ndashed red: spikes")
    keys = attention_keys(rows)
    for j in range(spec.n_places - 1, -1, -1):
        for kind, style in (("own", "-"), ("lower", "--")):
            per_head = [series(rows, k) for (_, p, kd), k in keys.items() if p == j and kd == kind]
            per_head = [(s, v) for s, v in per_head if len(s)]
            if not per_head:
                continue
            steps = per_head[0][0]
            best = np.max(np.stack([v for _, v in per_head if len(v) == len(steps)]), axis=0)
            label = place_label(j, spec) if kind == "own" or j == spec.n_digits else None
            ax_attn.plot(steps, best, color=place_colour(j, spec), ls=style, lw=1.2, label=label)
    ax_attn.set_ylim(0, 1.05)
    ax_attn.set_ylabel("attention of the place's\nmost attentive head")
    if ax_attn.lines:
        ax_attn.legend(**OUTSIDE, title="solid: on a_j, b_j\ndashed: on a_(j-1), b_(j-1)")
    for j in range(1, spec.n_places):
        steps, acc = series(rows, f"mech/probe/carry_in/place_{j}/acc")
        if len(steps):
            ax_probe.plot(steps, acc, color=place_colour(j, spec), lw=1.2, marker=".", ms=3, label=place_label(j, spec))
    ax_probe.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax_probe.set_ylim(0.4, 1.02)
    ax_probe.set_ylabel("carry-in probe accuracy")
    ax_probe.set_xlabel("step")
    if ax_probe.get_legend_handles_labels()[0]:
        ax_probe.legend(**OUTSIDE)
    else:  # no carries to probe (the digitwise task, one digit)
        ax_probe.text(0.5, 0.5, "no carry-in probe: the task has no carries", ha="center", transform=ax_probe.transAxes)
    for ax in (ax_loss, ax_attn, ax_probe):
        ax.grid(alpha=0.2)
    fig.suptitle(
        f"{name}{': ' if name else ''}timeline, {spec.n_digits}-digit base {spec.base} ({spec.order}, {spec.task})"
    )
    fig.tight_layout()
    return save(fig, path)


def write_timeline(
    job_dir: Path,
    rows: list[dict],
    spec: TaskSpec,
    shelves: dict[int, list[Shelf]],
    spikes: list[dict],
    plot: bool = True,
    name: str = "",
) -> list[Path]:
    """``timeline.md`` and (with ``plot``) ``timeline.png`` (``name``: the run, for its title)."""
    exit_fields = {"place": int, "level": str, "start_step": int, "last_on_shelf": int, "step": int}
    exits = read_records(Path(job_dir) / "shelf_exits.json", exit_fields)
    for i, e in enumerate(exits):  # records of this task: an edited or foreign file is named, not drawn
        if not 0 <= e["place"] < spec.n_places or min(e["start_step"], e["last_on_shelf"], e["step"]) < 0:
            raise RunFileError(
                f"{Path(job_dir) / 'shelf_exits.json'}: record {i} has place {e['place']} or a negative step "
                f"(this task's places are 0..{spec.n_places - 1})"
            )
    md = atomic_write_text(Path(job_dir) / "timeline.md", timeline_markdown(rows, spec, shelves, spikes, exits))
    if not plot:
        return [md]
    return [plot_timeline(rows, spec, shelves, spikes, Path(job_dir) / "timeline.png", name), md]
