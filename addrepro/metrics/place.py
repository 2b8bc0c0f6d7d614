"""Per-place loss and accuracy, computed on the device.

Model outputs arrive in emission order (the order the answer is written); every metric leaves here
place-indexed, so ``loss_by_place[..., 0]`` is the units digit and ``[..., n]`` the carry-out digit
whether the answer was written msb or lsb first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from addrepro.task.encoding import reorder, split_tokens
from addrepro.task.spec import TaskSpec


@dataclass
class PlaceStats:
    log_probs: torch.Tensor  # (K, B, n+1, base) place-indexed
    targets: torch.Tensor  # (K, B, n+1) place-indexed
    token_loss: torch.Tensor  # (K, B, n+1) cross-entropy of every answer token

    @property
    def loss_by_place(self) -> torch.Tensor:  # (K, n+1)
        return self.token_loss.mean(1)

    @property
    def correct(self) -> torch.Tensor:  # (K, B, n+1) bool
        return self.log_probs.argmax(-1) == self.targets

    @property
    def acc_by_place(self) -> torch.Tensor:  # (K, n+1)
        return self.correct.float().mean(1)

    @property
    def loss(self) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens, per member ``(K,)`` — the training objective."""
        return self.token_loss.mean((1, 2))

    @property
    def exact_match(self) -> torch.Tensor:  # (K,)
        return self.correct.all(-1).float().mean(1)


def place_stats(model: torch.nn.Module, tokens: torch.Tensor, spec: TaskSpec) -> PlaceStats:
    """Run ``model`` with teacher forcing on full sequences ``(K, B, T)`` or ``(B, T)``."""
    inputs, targets = split_tokens(tokens, spec)
    logits = model(inputs, last=spec.n_places)  # (K, B, n+1, base), emission order
    if targets.dim() == 2:
        targets = targets.expand(logits.shape[0], *targets.shape)
    return stats_from_logits(logits, targets, spec)


def stats_from_logits(logits: torch.Tensor, targets: torch.Tensor, spec: TaskSpec) -> PlaceStats:
    """Per-place statistics from emission-order logits ``(K, B, n+1, V)`` and targets ``(K, B, n+1)``."""
    return PlaceStats(*_place_ordered(logits, targets, spec.emission_index))


def _place_ordered(
    logits: torch.Tensor, targets: torch.Tensor, order: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities, targets and token losses, reordered from emission order to place order."""
    log_probs = reorder(logits.float().log_softmax(-1), order, dim=2)
    targets = reorder(targets, order, dim=2)
    token_loss = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return log_probs, targets, token_loss


def compiled_place_stats(model: torch.nn.Module, spec: TaskSpec) -> Callable[[torch.Tensor], PlaceStats]:
    """``place_stats(model, tokens, spec)`` for full sequences ``(K, B, T)``, through ``torch.compile``.

    Forward and backward are compiled together (AOTAutograd); on CUDA the compiled graphs are also
    captured as CUDA graphs ("reduce-overhead"), which removes the per-kernel launch cost that
    dominates such small models. The values are those of the eager path up to float round-off.
    """
    n_places, order = spec.n_places, tuple(spec.emission_index)  # plain constants for the tracer

    def run(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _place_ordered(model(inputs, last=n_places), targets, order)

    device = next(model.parameters()).device
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(run, mode=mode, dynamic=False, fullgraph=True)

    def stats(tokens: torch.Tensor) -> PlaceStats:
        inputs, targets = split_tokens(tokens, spec)
        return PlaceStats(*compiled(inputs, targets))

    return stats


def place_metric_dict(stats: PlaceStats, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}/loss/place_j``, ``{prefix}/acc/place_j``, ``{prefix}/loss`` and ``{prefix}/acc``; values ``(K,)``."""
    out = {f"{prefix}/loss": stats.loss, f"{prefix}/acc": stats.exact_match}
    loss, acc = stats.loss_by_place, stats.acc_by_place
    for j in range(loss.shape[-1]):
        out[f"{prefix}/loss/place_{j}"] = loss[:, j]
        out[f"{prefix}/acc/place_{j}"] = acc[:, j]
    return out
