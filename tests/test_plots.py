"""Plot helpers with known answers."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from addrepro.reports import job
from addrepro.reports.plots import label_without_overlap, running_mean, smoothing_label, smoothing_window
from addrepro.task.spec import TaskSpec


def test_running_mean_by_hand():
    values = np.array([1.0, 2.0, 3.0, 10.0, 5.0])
    # window 3, centred; the ends average the points that exist
    expected = [(1 + 2) / 2, (1 + 2 + 3) / 3, (2 + 3 + 10) / 3, (3 + 10 + 5) / 3, (10 + 5) / 2]
    assert running_mean(values, 3) == pytest.approx(expected)
    assert running_mean(values, 1) == pytest.approx(values)
    # a window wider than the curve is the mean of everything in reach
    assert running_mean(values, 99) == pytest.approx([values.mean()] * 5)


def test_running_mean_keeps_a_shelf_level_and_averages_noise():
    rng = np.random.default_rng(0)
    shelf = np.log(2) + rng.normal(0, 0.2, 400)
    smooth = running_mean(shelf, 25)
    assert smooth.mean() == pytest.approx(shelf.mean(), abs=1e-2)
    assert smooth[20:-20].std() < shelf.std() / 3  # ~1/sqrt(25) of the noise


def test_smoothing_window():
    assert [smoothing_window(n) for n in (10, 99, 100, 300, 10_000)] == [1, 1, 3, 7, 25]


def test_smoothing_label_counts_steps_not_logs():
    steps = np.arange(0, 3000, 10)  # a log every 10 steps
    assert smoothing_label(steps, 7) == "train, running mean over 70 steps"
    assert smoothing_label(np.array([0, 5, 10]), 3, "train loss") == "train loss, running mean over 15 steps"


def test_crowded_labels_never_overlap_and_stay_in_the_panel():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_yscale("log")
    ax.set_xlim(0, 3000)
    ax.set_ylim(1e-4, 4)
    fig.tight_layout()
    # Ten labels on one spot (a shelf split by noise into pieces) and two near the right edge.
    labels = [(1500.0, 0.07, f"carry_depth_{i}") for i in range(10)] + [
        (2990.0, 0.5, "naive_sum"),
        (5.0, 2.2, "uniform"),
    ]
    texts = label_without_overlap(ax, labels, fontsize=6)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for b in boxes[:i])
    plt.close(fig)


def _drawn(monkeypatch, draw, *args):
    """The figure a plot function draws, caught before it is written."""
    caught = []
    monkeypatch.setattr(job, "save", lambda fig, path: caught.append(fig) or path)
    draw(*args)
    return caught[0]


def _rows(spec, n_steps=400, every=10):
    rng = np.random.default_rng(0)
    rows = []
    for step in range(0, n_steps, every):
        row = {"step": step}
        for j in range(spec.n_places):
            row[f"train/loss/place_{j}"] = 2.3 * np.exp(-step / 200) + 0.07 + 0.01 * rng.random()
            if step % 100 == 0:
                row[f"val/loss/place_{j}"] = 2.3 * np.exp(-step / 200) + 0.07
                row[f"val/naive/place_{j}/plus_0"] = 0.5
                row[f"val/naive/place_{j}/plus_1"] = 0.5
        if step % 100 == 0:
            row["val/carry_out/p0"], row["val/carry_out/p1"] = 0.5, 0.5
        rows.append(row)
    return rows


def test_place_loss_and_naive_sum_plots_label_every_axis(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=4, base=10)  # 5 places: a 2 x 3 grid with one empty cell
    rows = _rows(spec)
    for draw in (job.plot_place_losses, job.plot_naive_sum):
        fig = _drawn(monkeypatch, draw, rows, spec, tmp_path / "x.png")
        panels = [ax for ax in fig.axes if ax.axison]
        assert len(panels) == spec.n_places
        columns = {}
        for ax in panels:
            columns.setdefault(ax.get_subplotspec().colspan.start, []).append(ax)
            if ax.get_subplotspec().colspan.start == 0:
                assert ax.get_ylabel() in ("loss (nats)", "probability")
        for column in columns.values():  # the lowest panel of each column names the x axis
            assert max(column, key=lambda a: a.get_subplotspec().rowspan.start).get_xlabel() == "step"
        legend = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        if draw is job.plot_place_losses:
            # 40 logs -> a 1-point window: no smoothing claimed
            assert legend[0] == "train"
        plt.close(fig)
    # 300 logs 10 steps apart: a 7-log running mean, i.e. 70 steps
    fig = _drawn(monkeypatch, job.plot_place_losses, _rows(spec, 3000), spec, tmp_path / "x.png")
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "train, running mean over 70 steps"
    plt.close(fig)


def test_place_loss_plot_marks_each_spike_on_every_panel(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=2, base=10)
    spikes = [
        {"step": 120, "loss": 0.9, "baseline": 0.1, "ratio": 9.0},
        {"step": 330, "loss": 0.5, "baseline": 0.1, "ratio": 5.0},
    ]

    def marked_steps(fig):
        panels = [ax for ax in fig.axes if ax.axison]
        return [sorted(ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "--") for ax in panels]

    fig = _drawn(monkeypatch, job.plot_place_losses, _rows(spec), spec, tmp_path / "x.png", None, "", spikes)
    assert marked_steps(fig) == [[120, 330]] * spec.n_places
    assert "loss spike (total train loss)" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    fig = _drawn(monkeypatch, job.plot_place_losses, _rows(spec), spec, tmp_path / "x.png")
    assert marked_steps(fig) == [[]] * spec.n_places
    plt.close(fig)


def test_confusion_plot_has_a_colour_bar_and_a_2x2_carry_out_tile(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=2, base=10)
    confusion = np.full((3, spec.n_places, 10, 10), 0.1)
    confusion[:, spec.n_digits, 2:] = np.nan  # the carry-out is never 2..9
    fig = _drawn(monkeypatch, job.plot_confusion_evolution, np.array([0, 10, 20]), confusion, spec, tmp_path / "c.png")
    images = [ax.get_images()[0].get_array().shape for ax in fig.axes if ax.get_images()]
    assert images[:3] == [(2, 2)] * 3 and images[3:] == [(10, 10)] * 6  # carry-out row first
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "mean probability"]
    assert len(bars) == 1
    plt.close(fig)


def test_log_limits_keep_every_positive_value_and_a_shared_top():
    from addrepro.reports.plots import log_limits

    assert log_limits([np.array([2.3, 0.5, 3e-7]), np.array([0.0, np.nan, 1e-2])]) == (1e-7, 4.0)
    assert log_limits([np.array([5.0])]) == (0.4, 6.5)  # the top follows a curve above it
    assert log_limits([]) == (1e-4, 4.0)


def test_place_loss_plot_shows_a_learned_place_below_old_floors(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=2, base=10)
    rows = _rows(spec)
    for row in rows:
        row["train/loss/place_0"] = 2e-6  # a place learned to a loss far below 1e-4
    fig = _drawn(monkeypatch, job.plot_place_losses, rows, spec, tmp_path / "x.png", None, "run 7, seed 3")
    panels = [ax for ax in fig.axes if ax.axison]
    assert {ax.get_ylim() for ax in panels} == {(1e-6, 4.0)}  # one range for all, 2e-6 inside it
    assert fig._suptitle.get_text().startswith("run 7, seed 3: per-place loss, 2-digit base 10")
    plt.close(fig)


def test_atlas_labels_in_the_margin_never_touch(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=3, base=10)  # the hundreds' uniform 2.30 and answer_prefix 2.11 are close
    fig = _drawn(monkeypatch, job.plot_place_losses, _rows(spec), spec, tmp_path / "x.png")
    renderer = fig.canvas.get_renderer()
    hundreds = next(ax for ax in fig.axes if ax.get_title() == "place 2 (10²)")
    assert {"uniform 2.3", "answer_prefix 2.11"} <= {t.get_text().strip() for t in hundreds.texts}
    for ax in (ax for ax in fig.axes if ax.axison):
        margin = [t for t in ax.texts if t.xy[0] == 1.0 and t.get_position()[0] == 0]
        boxes = sorted((t.get_window_extent(renderer) for t in margin), key=lambda b: -b.y0)
        for upper, lower in zip(boxes, boxes[1:], strict=False):
            assert not upper.overlaps(lower)
            assert upper.y0 - lower.y1 >= -1  # stacked, not side by side
    plt.close(fig)


def test_naive_sum_plot_shows_the_carry_out_per_true_carry(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=2, base=10)
    rows = _rows(spec)
    for row in rows:
        if "val/carry_out/p0" in row:
            row["val/carry_out/true_0"], row["val/carry_out/true_1"] = 0.98, 0.97
    fig = _drawn(monkeypatch, job.plot_naive_sum, rows, spec, tmp_path / "x.png")
    top = next(ax for ax in fig.axes if ax.get_title() == "place 2 (carry-out)")
    assert sorted(line.get_label() for line in top.get_lines()) == [
        "carry-out: P(right | carry-out 0)",
        "carry-out: P(right | carry-out 1)",
    ]
    assert {line.get_ydata()[0] for line in top.get_lines()} == {0.98, 0.97}
    plt.close(fig)
    # a run logged before the split: the averages, said to be averages
    fig = _drawn(monkeypatch, job.plot_naive_sum, _rows(spec), spec, tmp_path / "x.png")
    top = next(ax for ax in fig.axes if ax.get_title() == "place 2 (carry-out)")
    assert all(line.get_label().endswith("all examples") for line in top.get_lines())
    plt.close(fig)


def test_carry_conditioned_plot_has_a_title_one_legend_per_column_and_says_what_a_chain_is(monkeypatch, tmp_path):
    spec = TaskSpec(n_digits=3, base=10)
    rows = []
    for step in range(0, 400, 100):
        row = {"step": step}
        for j in range(1, spec.n_places):
            for c in (0, 1):
                row[f"carry/place_{j}/cin_{c}/loss"] = 1.0 / (step + 1)
                row[f"carry/place_{j}/cin_{c}/p_plus0"] = row[f"carry/place_{j}/cin_{c}/p_plus1"] = 0.5
            for length in range(min(j, spec.n_digits - 1) + 1):  # as CarrySets builds them
                row[f"chain/place_{j}/len_{length}/loss"] = 1.0 / (step + length + 1)
        rows.append(row)
    fig = _drawn(monkeypatch, job.plot_carry_conditioned, rows, spec, tmp_path / "x.png", "sweep/3, seed 1")
    assert fig._suptitle.get_text() == "sweep/3, seed 1: carry-conditioned sets, 3-digit base 10 (msb, add)"
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3  # one per column, under the bottom row
    chain = [t.get_text() for t in legends[2].get_texts()]
    assert chain == ["chain length 0", "chain length 1", "chain length 2"]
    note = " ".join(t.get_text() for t in fig.texts)
    assert "sum to 9" in note and "no carry in" in note
    plt.close(fig)


@pytest.mark.parametrize(("n_values", "bar"), [(2, False), (8, False), (12, True)])
def test_sweep_colours_name_few_values_and_bar_many(n_values, bar):
    from addrepro.reports.plots import COLOURS
    from addrepro.reports.sweep import _colours

    values = [{"optimizer.lr": 10.0 ** -(i / 4)} for i in range(n_values)]
    colours, mappable = _colours(["optimizer.lr"], values)
    assert (mappable is not None) == bar
    if not bar:  # a colour each from the colour-blind-safe palette, ordered by value
        assert colours == [COLOURS[n_values - 1 - i] for i in range(n_values)]
    else:  # no pale yellow end: every colour darker than the palest viridis
        assert all(sum(c[:3]) < 2.0 for c in colours)
