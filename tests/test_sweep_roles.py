"""The sweep report across digit counts and bases: places by role, losses per log(base), descent steps.

The jobs are written by hand (config, overrides and a metrics file whose every place drops from its
starting shelf at a known step), so every number the report gives is known in advance.
"""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import addrepro.train  # noqa: F401 - registers the config schema
from addrepro.reports.descent import descents, write_descent
from addrepro.reports.job import place_atlas
from addrepro.reports.seed_stats import bootstrap_interval
from addrepro.reports.sweep import draw_sweep, rest_summary, sweep_place_figure, swept_values
from addrepro.rundir.job import job_config, job_dirs
from addrepro.rundir.metrics_file import load_rows
from addrepro.task.spec import TaskSpec, place_role, role_order

BASES, DIGITS, SEEDS = (4, 10), (3, 5), (0, 1)


def drop_step(j, n_digits, base, seed):
    """The step place j leaves its starting shelf in the hand-written job."""
    return 100 * (n_digits - j + 1) + 10 * base + 20 * seed


def rows_of(spec, seed):
    atlas = place_atlas(spec)
    rows = []
    for step in range(0, 2000, 10):
        row = {"step": step}
        for j in range(spec.n_places):
            start = atlas[j]["answer_prefix"]
            row[f"train/loss/place_{j}"] = start if step < drop_step(j, spec.n_digits, spec.base, seed) else 1e-3
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base_cfg = compose(config_name="train")
    i = 0
    for base in BASES:
        for n in DIGITS:
            for seed in SEEDS:
                job = root / str(i)
                (job / ".hydra").mkdir(parents=True)
                cfg = base_cfg.copy()
                cfg.data.base, cfg.data.n_digits, cfg.seed = base, n, seed
                OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
                overrides = [f"data.base={base}", f"data.n_digits={n}", f"seed={seed}"]
                (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
                rows = rows_of(TaskSpec(n_digits=n, base=base), seed)
                keys = list(rows[0])
                lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
                (job / "csv").mkdir()
                (job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
                i += 1
    return root


def test_roles_line_up_places_across_digit_counts():
    assert [place_role(j, 3) for j in range(3, -1, -1)] == ["carry-out", "top digit", "tens", "units"]
    assert [place_role(j, 5) for j in range(5, -1, -1)] == ["carry-out", "top digit", "top-1", "top-2", "tens", "units"]
    assert [place_role(j, 2) for j in range(2, -1, -1)] == ["carry-out", "top digit", "units"]
    assert role_order([3, 5]) == ["carry-out", "top digit", "top-1", "top-2", "tens", "units"]
    assert role_order([3]) == ["carry-out", "top digit", "tens", "units"]


def test_bootstrap_interval_of_a_mean():
    # Two values: the resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are the two values themselves.
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_interval([7.0, 7.0, 7.0]) == (7.0, 7.0) and bootstrap_interval([3.0]) == (3.0, 3.0)
    # Twenty normal draws: the interval holds the true mean in close to 95% of trials (a bootstrap of a mean
    # is a little narrow for n = 20: ~93%); with a fixed generator the count is the same on every machine.
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(400):
        lo, hi = bootstrap_interval(rng.normal(5.0, 2.0, 20), seed=trial)
        hits += lo <= 5.0 <= hi
    assert 0.90 <= hits / 400 <= 0.97
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_the_descent_step_is_where_the_loss_leaves_its_starting_shelf():
    spec = TaskSpec(n_digits=5, base=10)
    found = descents(rows_of(spec, seed=1), spec)
    assert {j: d["step"] for j, d in found.items()} == {j: drop_step(j, 5, 10, 1) for j in range(6)}
    # A digit of base 10 heads from log 10 to the naive-sum shelf (~log 2): the threshold lies between.
    levels = place_atlas(spec)[1]
    assert levels["answer_prefix"] == pytest.approx(math.log(10), rel=1e-4)
    assert math.isclose(found[1]["threshold"], math.sqrt(levels["answer_prefix"] * levels["naive_sum"]))
    flat = [{"step": s, "train/loss/place_0": math.log(10)} for s in range(0, 500, 10)]
    assert descents(flat, spec)[0]["step"] is None  # never left it


def test_sweep_report_by_role_with_seeds_as_points(sweep):
    draw_sweep(sweep)
    table = (sweep / "sweep_descent.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| role"))
    assert header.startswith(
        "| role | data.n_digits | data.base | from (nats) | seeds | descent step: mean | 95% interval of the mean "
        "| min–max |"
    )
    for base in BASES:
        for n in DIGITS:
            for j in range(n + 1):
                steps = [drop_step(j, n, base, s) for s in SEEDS]
                row = f"| {place_role(j, n)} | {n} | {base} |"
                (line,) = [line for line in table if line.startswith(row)]
                cells = [c.strip() for c in line.strip("|").split("|")]
                interval = "{:.0f}–{:.0f}".format(*bootstrap_interval(steps))
                assert cells[4:] == ["2", f"{sum(steps) / 2:.0f}", interval, f"{min(steps)}–{max(steps)}", "0"], line
    assert (sweep / "sweep_descent.png").read_bytes()[:4] == b"\x89PNG"
    shelves = (sweep / "sweep_shelves.md").read_text()
    assert (
        "| job | data.base | data.n_digits | seed | status | carry-out | top digit | top-1 | top-2 | tens | units |"
        in (shelves)
    )


def test_the_sweep_plot_has_a_panel_per_role_every_job_in_its_legend_and_losses_per_log_base(sweep):
    jobs = job_dirs(sweep)
    configs = [job_config(j) for j in jobs]
    keys, values = swept_values(jobs, configs)
    specs = [TaskSpec.from_config(c.data) for c in configs]
    rows = [load_rows(j) for j in jobs]
    fig = sweep_place_figure(jobs, rows, specs, keys, values)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == role_order(list(DIGITS))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(jobs) == len(set(labels))  # every job once, 3-digit jobs included
    # Losses in units of log(base): every curve starts at its starting shelf over log(base)
    units = next(ax for ax in fig.axes if ax.get_title() == "units")
    starts = sorted({round(line.get_ydata()[0], 6) for line in units.get_lines() if len(line.get_ydata()) > 10})
    expected = sorted({round(place_atlas(s)[0]["answer_prefix"] / math.log(s.base), 6) for s in specs})
    assert starts == expected and all(0.99 < v <= 1.0 for v in starts)
    plt.close(fig)


def test_rest_summary_counts_places_per_level_over_seeds():
    def entry(seed, rests):
        shelves = [
            {"place": p, "atlas_level": level, "atlas_loss": 0.07, "level": 0.07 * r, "start_step": a, "end_step": b}
            for p, level, r, a, b in rests
        ]
        spec = {"n_digits": 3, "base": 10, "order": "msb", "task": "add"}
        return {"swept": {"data.base": 10, "seed": seed}, "spec": spec, "shelves": shelves}

    entries = [
        entry(
            0,
            [(3, "carry_depth_1", 1.0, 100, 300), (2, "carry_depth_1", 1.1, 0, 50), (2, "carry_depth_1", 1.1, 80, 130)],
        ),
        entry(1, [(3, "carry_depth_1", 0.9, 200, 260)]),
    ]
    lines = rest_summary(entries, ["data.base", "seed"]).splitlines()
    assert lines[0] == (
        "| data.base | level | jobs | places resting there | 95% interval (over jobs) | level / atlas | steps |"
    )
    # job 0: places 2 and 3 of 4 (50%), job 1: place 3 (25%); resampled means lie in 25%-50%
    # level ratios 1.0, 1.1, 1.1, 0.9: median 1.05; steps per place: 200, 100 (two rests), 60: median 100
    assert lines[2] == "| 10 | carry_depth_1 | 2 | 38% | 25%–50% | 1.05 | 100 |"


def test_jobs_differing_in_a_list_are_reported_with_the_list_as_given(tmp_path):
    """A list-valued key (a config group's list, a list option) that differs between jobs is one value
    per job, its override text: the report groups and labels by it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base_cfg = compose(config_name="train")
    spec = TaskSpec(n_digits=3, base=10)
    lists = [("[early_stopping,lr_monitor]", "[0.9,0.99]"), ("[]", "[0.9,0.98]")]
    for i, (callbacks, betas) in enumerate(lists):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        cfg = base_cfg.copy()
        cfg.data.n_digits = 3
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
        overrides = ["data.n_digits=3", f"callbacks={callbacks}", f"optimizer.betas={betas}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        rows = rows_of(spec, i)
        (job / "csv").mkdir()
        lines = [",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]
        (job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    jobs = job_dirs(tmp_path)
    keys, values = swept_values(jobs, [job_config(j) for j in jobs])
    assert keys == ["callbacks", "optimizer.betas"]
    assert values == [{"callbacks": c, "optimizer.betas": b} for c, b in lists]
    draw_sweep(tmp_path)
    shelves = (tmp_path / "sweep_shelves.md").read_text()
    assert "| [early_stopping,lr_monitor] | [0.9,0.99] |" in shelves and "| [] | [0.9,0.98] |" in shelves


def test_a_seeds_only_sweep_has_no_setting_column_and_counts_places_not_yet_descended(tmp_path):
    spec = TaskSpec(n_digits=3, base=10)
    start = place_atlas(spec)[0]["answer_prefix"]
    jobs = []
    for seed in SEEDS:
        rows = rows_of(spec, seed)
        for r in rows:
            r["train/loss/place_0"] = start  # the units never leave their starting shelf
        jobs.append({"name": f"{seed}_seed={seed}", "spec": spec, "rows": rows, "swept": {"seed": seed}})
    write_descent(tmp_path, jobs, ["seed"])
    table = (tmp_path / "sweep_descent.md").read_text()
    assert "| role | from (nats) | seeds | descent step: mean | 95% interval of the mean | min–max | not yet |" in table
    assert f"| units | {start:.3g} | 2 | – | – | – | 2 |" in table
    tens = [drop_step(1, 3, 10, s) for s in SEEDS]
    assert f"| tens | {place_atlas(spec)[1]['answer_prefix']:.3g} | 2 | {np.mean(tens):.0f} |" in table
    assert (tmp_path / "sweep_descent.png").read_bytes()[:4] == b"\x89PNG"
