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
