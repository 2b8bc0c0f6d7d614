"""The shelf pictures: per-place loss curves against the atlas, with detected shelves marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from omegaconf import OmegaConf

from addrepro.reports.plots import (
    colour,
    label_without_overlap,
    log_limits,
    margin_labels,
    place_label,
    running_mean,
    save,
    series,
    smoothing_label,
    smoothing_window,
    spread_labels,
)
from addrepro.reports.spike_report import write_spike_report
from addrepro.reports.timeline import write_timeline
from addrepro.rundir.atomic import atomic_write_text
from addrepro.rundir.confusion import load_confusion
from addrepro.rundir.job import job_config
from addrepro.rundir.metrics_file import RunFileError, load_rows, read_records
from addrepro.shelves.atlas import atlas_by_place, shelf_atlas
from addrepro.shelves.detection import atlas_plateaus, detect_shelves
from addrepro.shelves.trend import shelf_trend
from addrepro.task.spec import TaskSpec

# Atlas levels drawn as guides; deeper carry levels crowd the log axis and are left out.
GUIDE_LEVELS = ("uniform", "marginal", "answer_prefix", "naive_sum", "carry_depth_1", "carry_depth_2")


def spec_words(spec: TaskSpec) -> str:
    """The task in a figure title: ``3-digit base 10 (msb, add)``."""
    return f"{spec.n_digits}-digit base {spec.base} ({spec.order}, {spec.task})"


def run_name(job_dir: Path, cfg) -> str:  # noqa: ANN001 - the run's config
    """The run in a figure title: its folder (a sweep's job with the sweep's name) and seed."""
    job_dir = Path(job_dir)
    in_sweep = (job_dir.parent / "multirun.yaml").exists()
    folder = f"{job_dir.parent.name}/{job_dir.name}" if in_sweep else job_dir.name
    return f"{folder}, seed {cfg.get('seed')}"


def place_atlas(spec: TaskSpec) -> dict[int, dict[str, float]]:
    return atlas_by_place(shelf_atlas(spec.n_digits, spec.base, spec.order, spec.task))


def find_shelves(rows: list[dict], spec: TaskSpec, prefix: str = "train") -> dict[int, list]:
    """Shelves of every place's loss curve: rests near atlas levels, plus other flat segments."""
    atlas = place_atlas(spec)
    out = {}
    for j in range(spec.n_places):
        steps, loss = series(rows, f"{prefix}/loss/place_{j}")
        if not len(steps):
            out[j] = []
            continue
        rests = atlas_plateaus(steps, loss, atlas[j])
        # Several levels can be 0 (naive_sum of the units digit): a loss near 0 is called "exact".
        levels = {name: v for name, v in atlas[j].items() if v > 0 or name == "exact"}
        flat = [
            s
            for s in detect_shelves(steps, loss, levels)
            if not any(s.start_step <= r.end_step and r.start_step <= s.end_step for r in rests)
        ]
        out[j] = sorted(rests + flat, key=lambda s: s.start_step)
    return out


def atlas_guides(ax: plt.Axes, levels: dict[str, float], floor: float) -> list:
    """Dotted lines at the atlas levels, named in the right margin; returns the labels (to be spread
    again with ``spread_labels`` once the layout is final)."""
    named: list[tuple[float, str]] = []
    for name in GUIDE_LEVELS:
        value = levels.get(name)
        # Skip zero levels (not on a log axis) and near-duplicates, which would stack their labels.
        if value is None or value < floor or any(abs(np.log(value / v)) < 0.03 for v, _ in named):
            continue
        named.append((value, f"{name} {value:.3g}"))
        ax.axhline(value, color="0.6", lw=0.8, ls=":", zorder=0)
    return margin_labels(ax, named, fontsize=6, color="0.35")


def plot_place_losses(
    rows: list[dict],
    spec: TaskSpec,
    path: Path,
    reference: dict | None = None,
    title: str = "",
    spikes: list[dict] | None = None,
) -> Path:
    """One panel per place: train (and val) loss on a log axis, atlas guides, detected shelves and
    the steps of the run's loss spikes (``spikes.json``: spikes of the total train loss)."""
    atlas = place_atlas(spec)
    shelves = find_shelves(rows, spec)
    n = spec.n_places
    cols = min(3, n)
    nrows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.0 * nrows), squeeze=False, sharex=True)
    # One y range for every panel, from the data: places compare at a glance, and nothing is clipped.
    shown = [series(rows, f"{kind}/loss/place_{j}")[1] for kind in ("train", "val") for j in range(n)]
    if reference is not None:
        shown += [np.asarray(v, dtype=float) for v in reference["places"].values()]
    bottom, top = log_limits(shown)
    shelf_labels = []
    margins = []
    smoothing = "train"
    # Carry-out first, as the answer is read.
    for ax, j in zip(axes.flat, range(n - 1, -1, -1), strict=False):
        steps, loss = series(rows, f"train/loss/place_{j}")
        window = smoothing_window(len(loss))
        if window > 1:  # single batches are noisy: the raw curve faint, its running mean on top
            ax.plot(steps, loss, lw=0.6, color="C0", alpha=0.3)
            smoothing = smoothing_label(steps, window)
            ax.plot(steps, running_mean(loss, window), lw=1.2, color="C0")
        else:
            ax.plot(steps, loss, lw=1.0, color="C0")
        vsteps, vloss = series(rows, f"val/loss/place_{j}")
        if len(vsteps):
            ax.plot(vsteps, vloss, lw=1.0, color="C1", marker=".", ms=3)
        if reference is not None and str(j) in reference["places"]:
            ref = reference["places"][str(j)]
            ax.plot(reference["steps"], ref, "k--", lw=1.2, marker="x", ms=4)
        # One label per level, over the middle of its first shelf: repeated rests on one level
        # (a shelf broken by noise) would otherwise write the same name side by side.
        named: dict[str, tuple[float, float]] = {}
        for shelf in shelves[j]:
            ax.hlines(shelf.level, shelf.start_step, shelf.end_step, color="C3", lw=3, alpha=0.5)
            named.setdefault(
                shelf.atlas_level or f"{shelf.level:.3g}", ((shelf.start_step + shelf.end_step) / 2, shelf.level)
            )
        shelf_labels.append((ax, [(x, y, name) for name, (x, y) in named.items()]))
        for spike in spikes or []:  # every panel: which places the spike touched is what one looks for
            ax.axvline(spike["step"], color="C3", lw=0.8, ls="--", alpha=0.7)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        margins.append((ax, atlas_guides(ax, atlas[j], bottom)))
        ax.set_title(place_label(j, spec), fontsize=9)
        ax.grid(alpha=0.2)
    for ax in axes.flat[n:]:
        ax.axis("off")
    _label_grid(fig, list(zip(axes.flat, range(n - 1, -1, -1), strict=False)), "loss (nats)")
    handles = [Line2D([], [], color="C0", lw=1.2, label=smoothing)]
    if smoothing != "train":
        handles.append(Line2D([], [], color="C0", lw=0.6, alpha=0.3, label="train, every log"))
    if any(series(rows, f"val/loss/place_{j}")[0].size for j in range(n)):
        handles.append(Line2D([], [], color="C1", marker=".", ms=3, label="val"))
    if reference is not None:
        handles.append(Line2D([], [], color="k", ls="--", marker="x", ms=4, label=reference["label"]))
    handles.append(Line2D([], [], color="C3", lw=3, alpha=0.5, label="detected shelf (nearest atlas level)"))
    handles.append(Line2D([], [], color="0.6", lw=0.8, ls=":", label="atlas level (right)"))
    if spikes:
        handles.append(Line2D([], [], color="C3", lw=0.8, ls="--", alpha=0.7, label="loss spike (total train loss)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"{title}{': ' if title else ''}per-place loss, {spec_words(spec)}")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    for ax, texts in margins:  # after the layout: spacing them needs the panels' final size
        spread_labels(ax, texts)
    for ax, labels in shelf_labels:
        label_without_overlap(ax, labels, fontsize=6.5, color="C3", zorder=5)
    return save(fig, path)


def write_shelves_json(rows: list[dict], spec: TaskSpec, path: Path) -> Path:
    """Every shelf of every place, with its trend over the rest (flat or a slow passage, ``shelves.trend``)."""
    shelves = find_shelves(rows, spec)
    payload = []
    for j, found in shelves.items():
        steps, loss = series(rows, f"train/loss/place_{j}")
        for s in found:
            payload.append({"place": j, **s.as_dict(), "trend": shelf_trend(steps, loss, s.start_step, s.end_step)})
    return atomic_write_text(path, json.dumps(payload, indent=1))


def _label_grid(fig: plt.Figure, cells: list, y_label: str) -> None:
    """``step`` under the bottom panel of every column and ``y_label`` left of every row."""
    axes = [ax for ax, _ in cells]
    grid = axes[0].get_gridspec()
    for ax in axes:
        spec = ax.get_subplotspec()
        if spec.colspan.start == 0:
            ax.set_ylabel(y_label)
        below = [other for other in axes if other.get_subplotspec().colspan == spec.colspan]
        if ax is below[-1] or spec.rowspan.stop == grid.nrows:
            ax.set_xlabel("step")
            ax.tick_params(labelbottom=True)


def _place_grid(spec: TaskSpec, places: list[int], height: float = 2.8):
    cols = min(3, len(places))
    nrows = int(np.ceil(len(places) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, height * nrows), squeeze=False, sharex=True)
    for ax in axes.flat[len(places) :]:
        ax.axis("off")
    return fig, list(zip(axes.flat, places, strict=False))


def plot_naive_sum(rows: list[dict], spec: TaskSpec, path: Path, title: str = "") -> Path | None:
    """P(naive sum + k) per place over training (k = 0, 1, 2, base-1) and the depth-d sums; at the
    carry-out, the probability of the right carry-out per true carry-out (runs from before it was
    logged: P(0), P(1) averaged over all examples)."""
    if not series(rows, "val/naive/place_0/plus_0")[0].size:
        return None
    places = list(range(spec.n_places - 1, -1, -1))
    fig, cells = _place_grid(spec, places)
    offsets = sorted({0, 1, min(2, spec.base - 1), spec.base - 1})
    # One colour per curve kind across all panels, so a single legend below the grid serves them all.
    handles: dict[str, Line2D] = {}

    def draw(ax: plt.Axes, key: str, label: str, shade: str, **style) -> None:  # noqa: ANN003
        steps, p = series(rows, key)
        if len(steps):
            handles[label] = ax.plot(steps, p, color=shade, label=label, **({"lw": 1.0} | style))[0]

    # Depth-d sums often coincide with each other: each its own dash pattern and width, so both show.
    depth_styles = [{"ls": (0, (4, 2)), "lw": 2.0}, {"ls": (0, (1, 1.5)), "lw": 1.2}]
    for ax, j in cells:
        if j == spec.n_digits:
            by_truth = series(rows, "val/carry_out/true_0")[0].size or series(rows, "val/carry_out/true_1")[0].size
            for c in (0, 1):
                if by_truth:
                    draw(ax, f"val/carry_out/true_{c}", f"carry-out: P(right | carry-out {c})", colour(5 + c))
                else:
                    draw(ax, f"val/carry_out/p{c}", f"carry-out P({c}), all examples", colour(5 + c))
        else:
            for i, k in enumerate(offsets):
                draw(ax, f"val/naive/place_{j}/plus_{k}", f"naive sum +{k}", colour(i))
            for d in range(1, min(j, 3)):
                draw(
                    ax,
                    f"val/depth_sum/place_{j}/depth_{d}",
                    f"depth-{d} sum (carry from {d} pair{'s' if d > 1 else ''} below)",
                    colour(4) if d == 1 else "0.25",
                    **depth_styles[d - 1],
                )
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(place_label(j, spec), fontsize=9)
        ax.grid(alpha=0.2)
    _label_grid(fig, cells, "probability")
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    fig.suptitle(
        f"{title}{': ' if title else ''}probability on the naive sum + k, (a_j + b_j + k) mod {spec.base}"
        f" ({spec_words(spec)}, validation set)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.035 * (1 + (len(handles) - 1) // 4), 1, 1))
    return save(fig, path)


def with_band(ax: Any, rows: list[dict], prefix: str, shade: Any, label: str) -> None:
    """The loss of a carry or chain set, with a ±2 standard-error band: what the set's size allows."""
    steps, loss = series(rows, f"{prefix}/loss")
    if not len(steps):
        return
    ax.plot(steps, loss, color=shade, label=label)
    se_steps, se = series(rows, f"{prefix}/loss_se")
    if np.array_equal(se_steps, steps):
        ax.fill_between(steps, np.maximum(loss - 2 * se, loss * 0.1), loss + 2 * se, color=shade, alpha=0.2, lw=0)


def plot_carry_conditioned(rows: list[dict], spec: TaskSpec, path: Path, title: str = "") -> Path | None:
    """Per place: loss (with a ±2 standard-error band from the set's size) and P(+0)/P(+1) on the carry-in-0
    and carry-in-1 sets, and loss per chain length."""
    places = [j for j in range(spec.n_places - 1, 0, -1) if series(rows, f"carry/place_{j}/cin_0/loss")[0].size]
    if not places:
        return None
    fig, axes = plt.subplots(len(places), 3, figsize=(13, 2.3 * len(places) + 1.6), squeeze=False, sharex=True)
    lengths = range(0, spec.n_digits)
    for row, j in zip(axes, places, strict=True):
        for c in (0, 1):
            shade = colour(2 * c)
            with_band(row[0], rows, f"carry/place_{j}/cin_{c}", shade, f"carry in {c}")
            row[1].plot(*series(rows, f"carry/place_{j}/cin_{c}/p_plus0"), color=shade, label=f"P(+0 | carry in {c})")
            row[1].plot(
                *series(rows, f"carry/place_{j}/cin_{c}/p_plus1"), color=shade, ls="--", label=f"P(+1 | carry in {c})"
            )
        for length in lengths:
            with_band(row[2], rows, f"chain/place_{j}/len_{length}", colour(length), f"chain length {length}")
        row[0].set_yscale("log")
        row[2].set_yscale("log")
        row[0].set_ylabel(f"{place_label(j, spec)}\nloss (nats)", fontsize=8)
        row[1].set_ylabel("probability", fontsize=8)
        row[1].set_ylim(-0.02, 1.02)
        row[2].set_ylabel("loss (nats)", fontsize=8)
        for ax in row:
            ax.grid(alpha=0.2)
    # Per column, one legend under it: the curves mean the same in every row.
    for col, ax in enumerate(axes[-1]):
        seen: dict[str, Line2D] = {}
        for a in axes[:, col]:
            for line in a.get_lines():
                seen.setdefault(line.get_label(), line)
        ax.legend(
            list(seen.values()),
            list(seen),
            fontsize=7,
            ncol=2 if col < 2 else 3,
            frameon=False,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.32),
        )
    axes[0][0].set_title("loss, by carry into the place (±2 SE)", fontsize=9)
    axes[0][1].set_title("P(naive sum +0), P(naive sum +1), by carry in", fontsize=9)
    axes[0][2].set_title("loss, by carry-chain length (±2 SE)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{title}{': ' if title else ''}carry-conditioned sets, {spec_words(spec)}", fontsize=10)
    fig.text(
        0.5,
        0.005,
        f"chain length L: the L pairs right below the place each sum to {spec.base - 1} and pass a carry on, so"
        f" the pair L + 1 places down decides the carry in. Place 0 (units) has no carry in: no row.",
        ha="center",
        va="bottom",
        fontsize=7.5,
        color="0.3",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save(fig, path)


def plot_confusion_evolution(
    steps: np.ndarray, confusion: np.ndarray, spec: TaskSpec, path: Path, max_columns: int = 6, title: str = ""
) -> Path | None:
    """Rows: places (carry-out first); columns: checkpoints in time; cells: mean P(pred | true).

    The carry-out digit is 0 or 1, so its row of tiles is 2 x 2 (true 0/1, predicted 0/1); what is
    missing from a row's sum there went to digits a carry-out never takes.
    """
    if len(steps) == 0:
        return None
    pick = np.unique(np.linspace(0, len(steps) - 1, min(max_columns, len(steps))).round().astype(int))
    places = list(range(spec.n_places - 1, -1, -1))
    sizes = [2 if j == spec.n_digits and spec.task == "add" else spec.base for j in places]
    heights = [0.6 if size == 2 < spec.base else 1.0 for size in sizes]  # the 2 x 2 carry-out row is shorter
    fig, axes = plt.subplots(
        len(places),
        len(pick),
        figsize=(1.6 * len(pick) + 1.6, 1.6 * sum(heights) + 0.4),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for r, (j, digits) in enumerate(zip(places, sizes, strict=True)):
        for c, i in enumerate(pick):
            ax = axes[r][c]
            image = ax.imshow(confusion[i, j, :digits, :digits], vmin=0, vmax=1, cmap="magma_r")
            ticks = list(range(0, digits, 1 if digits <= 12 else 2))  # every digit (every other in large bases)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=5, length=2, pad=1)
            if r == 0:
                ax.set_title(f"step {int(steps[i])}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{place_label(j, spec).replace('place ', 'p')}\ntrue digit", fontsize=7)
            if r == len(places) - 1 or digits == 2:
                ax.set_xlabel("predicted digit", fontsize=7, labelpad=1)
    fig.suptitle(
        f"{title}{': ' if title else ''}confusion, {spec_words(spec)}: mean predicted probability of each digit,"
        " per true digit (validation set)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    bar = fig.colorbar(image, cax=fig.add_axes((0.9, 0.15, 0.015, 0.7)))
    bar.set_label("mean probability", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return save(fig, path)


def draw_all(
    job_dir: Path,
    rows: list[dict],
    spec: TaskSpec,
    reference: dict | None = None,
    confusion: tuple[np.ndarray, np.ndarray] | None = None,
    plots: bool = True,
    name: str = "",
) -> list[Path]:
    """The job's text reports (shelves, timeline) and, with ``plots``, its PNGs (``name``: the run,
    for their titles)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    spikes = load_spikes(job_dir)
    shelves = find_shelves(rows, spec)
    paths = [write_shelves_json(rows, spec, job_dir / "shelves_detected.json")]
    if plots:
        paths += [
            plot_place_losses(rows, spec, job_dir / "place_loss.png", reference, name, spikes),
            plot_naive_sum(rows, spec, job_dir / "naive_sum.png", name),
            plot_carry_conditioned(rows, spec, job_dir / "carry_conditioned.png", name),
        ]
        if confusion is not None:
            paths.append(plot_confusion_evolution(*confusion, spec, job_dir / "confusion.png", title=name))
    paths += write_timeline(job_dir, rows, spec, shelves, spikes, plots, name)
    paths.append(write_spike_report(job_dir, spikes))
    return [p for p in paths if p is not None]


SPIKE_FIELDS = {"step": int, "loss": (int, float), "ratio": (int, float), "baseline": (int, float)}


def load_spikes(job_dir: Path) -> list[dict]:
    return read_records(Path(job_dir) / "spikes.json", SPIKE_FIELDS)


REFERENCE_DIR = Path(__file__).parent / "reference"


def load_reference(name: str | None, job_dir: Path | str = ".") -> dict | None:
    """A published per-place loss curve shipped with addrepro (see ``addrepro/reports/reference``)."""
    if not name:
        return None
    shipped = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
    if name not in shipped:  # an edited config: only the shipped curves are read, never a path
        raise RunFileError(
            f"{job_dir}/.hydra/config.yaml names reference={name!r}: not a curve shipped with addrepro "
            f"({', '.join(shipped)})"
        )
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text())


def reference_table(rows: list[dict], reference: dict, spec: TaskSpec, window: int = 25) -> str:
    """Markdown table of the run's per-place train loss (mean over step ± window) against the reference."""
    places = sorted((int(p) for p in reference["places"]), reverse=True)
    head = "| step | " + " | ".join(f"place {j} run / ref" for j in places) + " |"
    lines = [head, "|" + "---|" * (len(places) + 1)]
    for i, step in enumerate(reference["steps"]):
        cells = []
        for j in places:
            near = [
                r[f"train/loss/place_{j}"]
                for r in rows
                if f"train/loss/place_{j}" in r and abs(r["step"] - step) <= window
            ]
            run = f"{sum(near) / len(near):.3g}" if near else "–"  # the run never logged near this step
            cells.append(f"{run} / {reference['places'][str(j)][i]:.3g}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_job(
    job_dir: Path,
    rows: list[dict] | None = None,
    confusion=None,  # noqa: ANN001 - (steps, matrices) as load_confusion returns them
    plots: bool = True,
    config: dict | None = None,
) -> list[Path]:
    """All reports of one job (PNGs with ``plots``), plus ``reference_comparison.md`` when the run has a
    reference curve. ``config``: the run's resolved config (default: the job's ``.hydra/config.yaml``)."""
    job_dir = Path(job_dir)
    cfg = OmegaConf.create(config) if config is not None else job_config(job_dir)
    try:
        spec = TaskSpec.from_config(cfg.data)
    except Exception as e:  # noqa: BLE001 - edited values: wrong types, out of range, unresolvable
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{job_dir}/.hydra/config.yaml holds no valid task in its data section ({reason})") from None
    rows = load_rows(job_dir) if rows is None else rows
    if not rows:
        path = Path(job_dir) / "csv" / "metrics.csv"
        header = path.read_text().partition("\n")[0].split(",") if path.is_file() else []
        what = "has no step column" if header and "step" not in header else "holds no metric rows"
        raise RunFileError(f"{job_dir}/csv/metrics.csv {what} (nothing to draw)")
    confusion = load_confusion(job_dir) if confusion is None else confusion
    if confusion is not None and confusion[1].shape[1:] != (spec.n_places, spec.base, spec.base):
        raise RunFileError(
            f"{job_dir}/confusion.npz holds matrices {confusion[1].shape[1:]}, not this task's"
            f" {(spec.n_places, spec.base, spec.base)} (places, true digit, predicted digit)"
        )
    reference = load_reference(cfg.get("reference"), job_dir)
    paths = draw_all(job_dir, rows, spec, reference, confusion, plots, run_name(job_dir, cfg))
    if reference is not None:
        table = job_dir / "reference_comparison.md"
        atomic_write_text(table, f"{reference['label']}\n\n{reference_table(rows, reference, spec)}\n")
        paths.append(table)
    return paths
