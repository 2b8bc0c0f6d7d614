"""AdamW over stacked parameters, with a learning rate and weight decay per ensemble member.

``torch.optim.AdamW`` takes one scalar learning rate per parameter group; stacked ensembles need a
value per member along the leading K dimension. The update follows torch's single-tensor AdamW
step for step (decoupled decay, then moments, then bias-corrected step), so a one-member run
matches ``torch.optim.AdamW`` (tested), and every operation is elementwise per member, so member k
of an ensemble gets exactly the update a single run would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup as ``LambdaLR(lambda s: min(s / warmup, 1))``: step 0 has factor 0.

    This is the schedule of Nanda's addition code; ``warmup_steps = 0`` means no warmup.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, 1.0)


class StackedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: list[float],
        weight_decay: list[float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
    ):
        params = list(params)
        if len(lr) != len(weight_decay):
            raise ValueError("lr and weight_decay need one value per member")
        defaults = dict(lr=max(lr), betas=tuple(betas), eps=eps, warmup_steps=warmup_steps)
        super().__init__(params, defaults)
        device = params[0].device
        self.member_lr = torch.tensor(lr, dtype=torch.float32, device=device)
        self.member_wd = torch.tensor(weight_decay, dtype=torch.float32, device=device)
        self.step_count = 0  # optimiser steps taken; a host integer, so the schedule needs no sync

    def current_lr(self) -> torch.Tensor:
        """Learning rate of each member ``(K,)`` for the next step."""
        warmup = self.param_groups[0]["warmup_steps"]
        return self.member_lr * warmup_factor(self.step_count, warmup)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        lr = self.current_lr()
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        decay = 1 - lr * self.member_wd  # (K,)
        step_size = lr / bias_correction1  # (K,)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            shape = (-1,) + (1,) * (p.dim() - 1)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(decay.view(shape))
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
            p.sub_(step_size.view(shape) * exp_avg / denom)
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["step_count"] = self.step_count
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.step_count = state_dict.pop("step_count")
        super().load_state_dict(state_dict)
