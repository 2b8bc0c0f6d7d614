"""Plot helpers with known answers."""

import numpy as np
import pytest

from addrepro.reports.plots import running_mean, smoothing_window


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
