"""Per-place confusion matrices of averaged probabilities (not argmax counts).

``confusion[j, t, v]`` is the mean probability the model gives to digit v at place j over the
examples whose true digit there is t; rows of digits that never occur (e.g. 2..base-1 at the
carry-out place) are NaN rather than a misleading zero.
"""

from __future__ import annotations

import torch

from addrepro.metrics.place import PlaceStats


def confusion_matrices(stats: PlaceStats) -> torch.Tensor:
    """``(K, n+1, base, base)`` mean predicted distribution per true digit; NaN for absent digits."""
    probs = stats.log_probs.exp()  # (K, B, P, V)
    v = probs.shape[-1]
    onehot = torch.nn.functional.one_hot(stats.targets, v).to(probs.dtype)  # (K, B, P, V_true)
    sums = torch.einsum("kbpt,kbpv->kptv", onehot, probs)
    counts = onehot.sum(1)  # (K, P, V_true)
    return sums / counts[..., None]  # 0/0 -> NaN for digits that never occur
