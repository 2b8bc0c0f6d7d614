"""Interpretability analyses of exported models (TransformerLens 4 ``TransformerBridge``).

Install with ``pip install -e ".[interp]"``.

Each analysis module has ``run(subject, **options) -> dict`` (plain values, tensors where arrays),
``summarize(result) -> {name: float}`` (for ``over_training``) and ``plot(result) -> Figure``;
``common.write_outputs`` writes the result as JSON and the figure as PNG.
"""

from __future__ import annotations

from addrepro.interp import over_training
from addrepro.interp.common import Subject, load_subject, write_outputs
from addrepro.interp.registry import ANALYSES

__all__ = ["ANALYSES", "Subject", "load_subject", "over_training", "write_outputs"]
