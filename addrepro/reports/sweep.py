"""``python -m addrepro.report <sweep folder>``: compare the jobs of a sweep from their saved files alone.

A sweep folder holds one folder per job with ``.hydra/`` (numbered ``0, 1, ...`` for a Hydra multirun,
any name for a W&B sweep's ``outputs/wandb_sweeps/<id>/``). From each job's ``csv/metrics.csv``,
``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` this writes, into the sweep folder:

* ``sweep_place_loss.png``: one panel per place, the train loss of every job on a log axis, coloured by
  the swept value (a colour per value, named in the legend; a colour bar where a numeric key takes more
  values than there are distinct colours; a second swept key sets the line style), with the atlas
  levels as dotted guides when all jobs share one task;
* ``sweep_shelves.md`` and ``sweep_shelves.json``: per job, the shelves of every place's loss curve
  (nearest atlas level and the step the place left it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import yaml
from omegaconf import OmegaConf

from addrepro.reports.descent import SEED_KEYS, write_descent
from addrepro.reports.job import atlas_guides, find_shelves, place_atlas
from addrepro.reports.plots import (
    COLOURS,
    colour,
    log_limits,
    place_label,
    running_mean,
    save,
    series,
    smoothing_label,
    smoothing_window,
    spread_labels,
)
from addrepro.reports.seed_stats import bootstrap_interval
from addrepro.reports.timeline import merge_rests
from addrepro.rundir.atomic import atomic_write_text
from addrepro.rundir.job import job_config, job_dirs, job_number
from addrepro.rundir.metrics_file import RunFileError, load_rows
from addrepro.rundir.status import read_statuses
from addrepro.task.spec import TaskSpec, place_role, role_order

PNG = "sweep_place_loss.png"
TABLE = "sweep_shelves.md"
TABLE_JSON = "sweep_shelves.json"
LINESTYLES = ["-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1, 1, 1))]


def is_sweep_dir(path: Path) -> bool:
    """A folder of job folders, not a job folder itself."""
    path = Path(path)
    return not (path / ".hydra" / "config.yaml").exists() and bool(job_dirs(path))


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) if path.exists() else []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunFileError(
            f"{path} cannot be read ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
        ) from None
    if items is not None and not isinstance(items, list):
        raise RunFileError(f"{path} holds {type(items).__name__}, not the list of overrides Hydra writes")
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _typed(cfg, key: str, raw: str) -> Any:  # noqa: ANN001
    """The job's value of an override key: from its config (typed), else the override text (config groups).
    A list or mapping (``callbacks=[early_stopping,lr_monitor]``, ``optimizer.betas=[0.9,0.99]``) stays
    its text: one value, that groups jobs and labels them as the command gave it."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if value is None or OmegaConf.is_config(value):
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
    return raw if isinstance(value, list | dict) else value


def swept_values(jobs: list[Path], configs: list) -> tuple[list[str], list[dict[str, Any]]]:
    """The override keys whose value differs between jobs, and each job's values of them."""
    overrides = [_overrides(job) for job in jobs]
    keys: list[str] = []
    for ov in overrides:
        for key in ov:
            if key not in keys and len({o.get(key) for o in overrides}) > 1:
                keys.append(key)
    values = [{k: _typed(cfg, k, ov.get(k, "")) for k in keys} for cfg, ov in zip(configs, overrides, strict=True)]
    return keys, values


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:g}" if isinstance(v, float) else str(v)


def job_label(values: dict[str, Any], job: Path) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()) or job.name


def _colours(keys: list[str], values: list[dict[str, Any]]):
    """Colour per job from the first swept key, plus a ScalarMappable for a colour bar when the key is
    numeric with more distinct values than the colour-blind-safe palette has colours (a few values
    get a colour each, named in the legend)."""
    n = len(values)
    if not keys:
        return [colour(i) for i in range(n)], None
    key = keys[0]
    vals = [v.get(key) for v in values]
    numeric = all(_is_number(x) for x in vals)
    distinct = sorted(set(vals)) if numeric else list(dict.fromkeys(str(x) for x in vals))
    if len(distinct) <= len(COLOURS):
        return [colour(distinct.index(x if numeric else str(x))) for x in vals], None
    if numeric:
        lo, hi = min(vals), max(vals)
        norm = matplotlib.colors.LogNorm(lo, hi) if lo > 0 and hi / lo >= 4 else matplotlib.colors.Normalize(lo, hi)
        # viridis without its pale yellow end, which is hard to see on white
        cmap = matplotlib.colors.ListedColormap(plt.cm.viridis(np.linspace(0.0, 0.8, 256)))
        mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        return [cmap(norm(x)) for x in vals], (key, mappable)
    return [colour(distinct.index(str(x))) for x in vals], None


def _linestyles(keys: list[str], values: list[dict[str, Any]]) -> list:
    if len(keys) < 2:
        return ["-"] * len(values)
    distinct = list(dict.fromkeys(str(v.get(keys[1])) for v in values))
    return [LINESTYLES[distinct.index(str(v.get(keys[1]))) % len(LINESTYLES)] for v in values]


def role_place(role: str, spec: TaskSpec) -> int | None:
    """The place of ``spec`` that has ``role`` (None if its digit count has no such place)."""
    return next((j for j in range(spec.n_places) if place_role(j, spec.n_digits) == role), None)


def sweep_place_figure(
    jobs: list[Path],
    rows: list[list[dict]],
    specs: list[TaskSpec],
    keys: list[str],
    values: list[dict[str, Any]],
    title: str = "",
    per_log_base: bool | None = None,
) -> plt.Figure:
    """One panel per place role (carry-out, top digit, …, units: the same role across digit counts),
    one train-loss line per job (running mean; the raw logs faint), atlas guides if the task is shared.

    ``per_log_base``: losses divided by log(base), so bases share an axis (1 = a uniform guess);
    None: when the jobs differ in base.
    """
    shared = len({(s.n_digits, s.base, s.order, s.task) for s in specs}) == 1
    if per_log_base is None:
        per_log_base = len({s.base for s in specs}) > 1
    roles = role_order([s.n_digits for s in specs])
    atlas = place_atlas(specs[0]) if shared and not per_log_base else None
    colours, mappable = _colours(keys, values)
    styles = _linestyles(keys, values)
    n = len(roles)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.4 * cols + 1.2, 3.2 * nrows + 0.8), squeeze=False, sharex=True, layout="constrained"
    )
    fig.get_layout_engine().set(w_pad=0.15, wspace=0.08)
    shown: list[np.ndarray] = []
    smoothing = "train loss, every log"
    legend: dict[str, Any] = {}  # label -> handle, from every panel: a job may lack the first panel's role
    for ax, role in zip(axes.flat, roles, strict=False):
        for job, job_rows, spec, shade, style, vals in zip(jobs, rows, specs, colours, styles, values, strict=True):
            j = role_place(role, spec)
            if j is None:
                continue
            steps, loss = series(job_rows, f"train/loss/place_{j}")
            if not len(steps):
                continue
            if per_log_base:
                loss = loss / math.log(spec.base)
            # Single batches are noisy and the jobs' lines cross: each is drawn as its running mean.
            window = smoothing_window(len(loss))
            if window > 1:
                smoothing = smoothing_label(steps, window, "train loss")
                ax.plot(steps, loss, color=shade, lw=0.5, alpha=0.15)
            line = running_mean(loss, window) if window > 1 else loss
            label = job_label(vals, job)
            (handle,) = ax.plot(steps, line, color=shade, ls=style, lw=1.1, label=label)
            legend.setdefault(label, handle)
            shown.append(loss)
    # One range for every panel, from every curve: nothing clipped, places compared at a glance.
    floor, top = log_limits(shown, top=2.0 if per_log_base else 4.0)
    margins = []
    for ax, role in zip(axes.flat, roles, strict=False):
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        if atlas is not None:
            margins.append((ax, atlas_guides(ax, atlas[role_place(role, specs[0])], floor)))
        ax.set_title(place_label(role_place(role, specs[0]), specs[0]) if shared else role, fontsize=9)
        ax.grid(alpha=0.2)
        ax.tick_params(labelbottom=True)  # also above an empty cell of the grid
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("train loss / log(base)" if per_log_base else "train loss (nats)")
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend),
            title=smoothing + "; raw logs faint",
            title_fontsize=7,
            loc="outside lower center",
            ncol=min(4, len(legend)),
            fontsize=7,
            frameon=False,
        )
    if mappable is not None:
        key, sm = mappable
        bar = fig.colorbar(sm, ax=axes, shrink=0.8, label=key)
        ticks = sorted({v[key] for v in values})
        bar.set_ticks(ticks, labels=[_fmt(t) for t in ticks])
        bar.minorticks_off()
    if shared:
        s = specs[0]
        head = f"{s.n_digits}-digit base {s.base} ({s.order}, {s.task})"
        head += "; dotted: atlas levels" if atlas is not None else ""
    else:
        head = "places matched by role across tasks" + ("; loss in units of log(base)" if per_log_base else "")
    by = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "") if keys else "job"
    fig.suptitle(title or f"per-place train loss, {len(jobs)} jobs by {by} — {head}", fontsize=10)
    if margins:
        fig.draw_without_rendering()  # the constrained layout, so the atlas labels are spread at their final size
        for ax, texts in margins:
            spread_labels(ax, texts)
    return fig


def shelf_records(rows: list[dict], spec: TaskSpec) -> list[dict]:
    """Every shelf of every place (consecutive rests at one atlas level merged unless the loss truly
    left it): atlas level, level, start, the step the place left it, and the place's role."""
    out = []
    for j, shelves in find_shelves(rows, spec).items():
        steps, loss = series(rows, f"train/loss/place_{j}")
        last = int(steps.max()) if len(steps) else None
        for s in merge_rests(shelves, steps, loss):
            left = last is not None and s.end_step < last
            out.append({"place": j, "role": place_role(j, spec.n_digits), **s.as_dict(), "left": left})
    return out


def _cell(records: list[dict], role: str) -> str:
    parts = []
    for r in records:
        if r["role"] != role:
            continue
        name = r["atlas_level"] or f"{r['level']:.3g}"
        parts.append(f"{name}→{r['end_step']}" if r["left"] else f"{name}→(still)")
    return ", ".join(parts) or "–"


def shelf_table(entries: list[dict], keys: list[str], roles: list[str]) -> str:
    head = ["job", *keys, "status", *roles]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        # The job's number where it has one: the swept values its folder is also named by have columns.
        number = job_number(Path(e["folder"]))
        cells = [str(number) if number is not None else e["job"], *(_fmt(e["swept"].get(k, "")) for k in keys)]
        cells.append(e["status"] + (" (unreadable)" if e.get("unreadable") else ""))
        cells += [_cell(e["shelves"], role) if e["shelves"] is not None else "–" for role in roles]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def rest_summary(entries: list[dict], keys: list[str]) -> str:
    """Per setting (the swept values other than seeds) and atlas level: the share of places that rested
    there at least once, with a bootstrap interval over the setting's jobs, the median rest's level
    against the atlas level, and the median steps a place spent there in all."""
    settings = [k for k in keys if k not in SEED_KEYS]
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        if e["spec"] and e["shelves"] is not None:
            groups.setdefault(tuple(e["swept"].get(k) for k in settings), []).append(e)
    head = [*settings, "level", "jobs", "places resting there", "95% interval (over jobs)", "level / atlas", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, jobs in sorted(groups.items(), key=lambda kv: tuple(_order_key(v) for v in kv[0])):
        levels = sorted({s["atlas_level"] for e in jobs for s in e["shelves"] if s["atlas_level"]})
        for level in levels:
            shares, ratios, steps = [], [], []
            for e in jobs:
                n_places = e["spec"]["n_digits"] + 1
                rests = [s for s in e["shelves"] if s["atlas_level"] == level]
                shares.append(len({s["place"] for s in rests}) / n_places)
                ratios += [s["level"] / s["atlas_loss"] for s in rests if s["atlas_loss"]]
                for place in {s["place"] for s in rests}:
                    steps.append(sum(s["end_step"] - s["start_step"] for s in rests if s["place"] == place))
            lo, hi = bootstrap_interval(shares)
            ratio = f"{np.median(ratios):.3g}" if ratios else "–"
            cells = [*(_fmt(v) for v in setting), level, str(len(jobs)), f"{np.mean(shares):.0%}"]
            cells += [f"{lo:.0%}–{hi:.0%}", ratio, f"{np.median(steps):.0f}" if steps else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order_key(value: Any) -> tuple:
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


def draw_sweep(sweep_dir: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """``sweep_place_loss.png``, ``sweep_shelves.md`` and ``sweep_shelves.json`` of a sweep folder.

    A job whose files cannot be read (a damaged metrics file or config) is left out of the figure,
    named with the reason in the table and the JSON, and passed to ``warn``; a job without a metrics
    file yet (pending, or failed before its first row) is shown by its status alone."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (subfolders with .hydra/)")
    configs = [job_config(job) for job in jobs]
    keys, values = swept_values(jobs, configs)
    statuses = read_statuses(sweep_dir)
    entries, plotted, unread = [], [], []
    for job, cfg, vals in zip(jobs, configs, values, strict=True):
        status = statuses.get(job.name, {}).get("status", "unknown")
        problem = None
        try:
            spec = TaskSpec.from_config(cfg.data)
            rows = [r for r in load_rows(job) if r.get("member", 0) == 0]
        except FileNotFoundError:
            rows, spec = [], None
        except (TypeError, ValueError, AttributeError) as e:  # RunFileError, or a config edited out of shape
            rows, spec, problem = [], None, str(e).splitlines()[0]
            unread.append(f"{job.name}: {problem}")
            if warn is not None:
                warn(f"left out {job}: {problem}")
        has_curve = spec is not None and any("train/loss/place_0" in r for r in rows)
        shelves = shelf_records(rows, spec) if has_curve else None
        entries.append(
            {
                "job": job.name,
                "folder": str(job),
                "swept": vals,
                "status": status,
                "spec": None
                if spec is None
                else {"n_digits": spec.n_digits, "base": spec.base, "order": spec.order, "task": spec.task},
                "shelves": shelves,
                "unreadable": problem,
            }
        )
        if has_curve:
            plotted.append((job, rows, spec, vals))
    paths = []
    if plotted:
        p_jobs, p_rows, p_specs, p_vals = (list(x) for x in zip(*plotted, strict=True))
        paths.append(save(sweep_place_figure(p_jobs, p_rows, p_specs, keys, p_vals), sweep_dir / PNG))
        described = [{"name": job.name, "spec": spec, "rows": rows, "swept": vals} for job, rows, spec, vals in plotted]
        paths += write_descent(sweep_dir, described, keys)
    roles = role_order([e["spec"]["n_digits"] for e in entries if e["spec"]] or [1])
    table = shelf_table(entries, keys, roles)
    legend = (
        "Shelves of each place's train loss, per job, places by role (carry-out, top digit, …, units): "
        "`level→step` is the nearest atlas level (or the loss when none is near) and the last step on the "
        "shelf; consecutive rests at one level count as one unless the loss left it in between; "
        "`(still)`: on it at the end of training."
    )
    left_out = "".join(f"\n- {line}" for line in unread)
    left_out = f"\nLeft out, their files cannot be read:{left_out}\n" if unread else ""
    rests = (
        "## How many places rest on each level\n\nPer setting and atlas level: the share of a job's places "
        "that rested there at least once (mean over the setting's jobs, with a percentile-bootstrap interval "
        "over them: narrow and optimistic with few seeds), the median rest's loss against the atlas level, and "
        "the median steps a place spent there.\n\n" + rest_summary(entries, keys) + "\n"
    )
    md = atomic_write_text(
        sweep_dir / TABLE,
        f"# Sweep {sweep_dir.name}: {len(jobs)} jobs, swept {', '.join(keys) or 'nothing'}\n\n{legend}\n\n{table}\n"
        + left_out
        + "\n"
        + rests,
    )
    payload = {"sweep": str(sweep_dir), "swept_keys": keys, "jobs": entries}
    js = atomic_write_text(sweep_dir / TABLE_JSON, json.dumps(payload, indent=1, default=str))
    return [*paths, md, js]
