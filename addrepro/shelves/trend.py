"""Is a shelf a flat plateau or a slow passage? The trend of the loss over the rest.

Over the logged losses of a shelf (its first to its last step), a least-squares line of log loss
against step gives the factor by which the loss changed over the rest, ``change = exp(slope x
(end - start))``, with a 95% interval from the slope's standard error. The interval assumes independent
noise between logs; a running loss is smoother than that, so the interval is narrower than the truth
and a verdict of "slow passage" is only as good as a fall well beyond it.

Kinds: ``flat`` (the whole interval within ±10% of no change), ``slow passage`` (the whole interval a
fall of more than 10%), ``rising`` (a rise of more than 10%), else ``unclear`` (too few logs, or an
interval that straddles a boundary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FLAT = 0.10  # a change of the loss within ±10% over the rest counts as none
MIN_POINTS = 5
_FLOOR = 1e-12  # an exact zero stays finite on a log scale


def shelf_trend(steps: Sequence[float], loss: Sequence[float], start: int, end: int) -> dict:
    """``{"change", "change_low", "change_high", "points", "kind"}`` of the losses logged in start..end."""
    s, y = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    keep = (s >= start) & (s <= end) & np.isfinite(y)
    s, y = s[keep], np.log(np.maximum(y[keep], _FLOOR))
    n = len(s)
    if n < MIN_POINTS or end <= start or np.ptp(s) == 0:
        return {"change": None, "change_low": None, "change_high": None, "points": int(n), "kind": "unclear"}
    x = s - s.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    residual = y - y.mean() - slope * x
    se = math.sqrt(float((residual**2).sum()) / (n - 2) / float((x * x).sum()))
    span = end - start
    change, low, high = (math.exp(v * span) for v in (slope, slope - 1.96 * se, slope + 1.96 * se))
    if 1 - FLAT <= low and high <= 1 + FLAT:
        kind = "flat"
    elif high < 1 - FLAT:
        kind = "slow passage"
    elif low > 1 + FLAT:
        kind = "rising"
    else:
        kind = "unclear"
    return {"change": change, "change_low": low, "change_high": high, "points": int(n), "kind": kind}


def describe_trend(trend: dict) -> str:
    """``flat: ×0.98 over the rest (0.96–1.01)`` for a timeline line."""
    if trend.get("change") is None:
        return f"{trend['kind']} ({trend['points']} logs)"
    return (
        f"{trend['kind']}: ×{trend['change']:.3g} over the rest ({trend['change_low']:.3g}–{trend['change_high']:.3g})"
    )
