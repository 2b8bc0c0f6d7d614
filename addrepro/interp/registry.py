"""The analyses that run on one checkpoint, by name (``analysis=<name>``; ``over_training`` follows them)."""

from __future__ import annotations

from addrepro.interp import (
    ablation,
    attention,
    breakdown,
    composition,
    condition,
    intervene,
    logit_attribution,
    neurons,
    patching,
    probes,
)

ANALYSES = {
    "ablation": ablation,
    "logit_attribution": logit_attribution,
    "attention": attention,
    "composition": composition,
    "breakdown": breakdown,
    "patching": patching,
    "probes": probes,
    "neurons": neurons,
    "condition": condition,
    "intervene": intervene,
}
