"""Ridge regression in closed form: the weights of the linear probes (``metrics.mechanism`` during
training, ``interp.probes`` after it)."""

from __future__ import annotations

import torch


def ridge_weights(x: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``w = (XᵀX + ridge·n·I)⁻¹ Xᵀ T``, ``(..., d, c)``, of features ``x (..., n, d)`` and targets
    ``(..., n, c)`` (broadcast: one set of targets may serve the whole batch).

    The matrix is symmetric positive definite (``ridge > 0``), so it is solved by Cholesky rather than
    LU: batched LU (``torch.linalg.solve``) on the CPU, with the thread count set explicitly as training
    sets it, fails with invalid pivots for some batch sizes and widths (MKL; pytorch/pytorch#142815,
    still so in torch 2.13). A batch entry whose matrix is not positive definite (non-finite features,
    e.g. a diverged member of a stack) gets NaN weights; the others are unaffected.
    """
    n, d = x.shape[-2], x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    gram = x.transpose(-1, -2) @ x + ridge * n * eye  # (..., d, d)
    factor, info = torch.linalg.cholesky_ex(gram)
    w = torch.cholesky_solve(x.transpose(-1, -2) @ targets, factor)  # (..., d, c)
    return torch.where((info == 0)[..., None, None], w, torch.nan)
