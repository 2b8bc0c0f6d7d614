"""Gradient norms per member: global, per parameter group and per layer."""

from __future__ import annotations

import re

import torch

from addrepro.model.transformer import parameter_group

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def grad_norm_keys(model: torch.nn.Module) -> dict[str, list[str]]:
    """Metric key -> names of the parameters whose gradients it covers."""
    keys: dict[str, list[str]] = {"grad_norm/global": []}
    for name, _ in model.named_parameters():
        keys["grad_norm/global"].append(name)
        keys.setdefault(f"grad_norm/{parameter_group(name)}", []).append(name)
        layer = _LAYER.match(name)
        if layer:
            keys.setdefault(f"grad_norm/layer_{layer.group(1)}", []).append(name)
    return keys


def grad_norms(model: torch.nn.Module, keys: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient of every group, per member ``(K,)``; stays on the device."""
    squares = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            squares[name] = p.grad.detach().float().pow(2).flatten(1).sum(1)
    out = {}
    for key, names in keys.items():
        parts = [squares[n] for n in names if n in squares]
        if parts:
            out[key] = torch.stack(parts).sum(0).sqrt()
    return out
