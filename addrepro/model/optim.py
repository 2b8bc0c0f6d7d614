"""AdamW over stacked parameters, with a learning rate and weight decay per ensemble member.

``torch.optim.AdamW`` takes one scalar learning rate per parameter group; stacked ensembles need a
value per member along the leading K dimension. Each member's slice ``p[k]`` is a contiguous block
of every stacked parameter, so the step runs torch's fused AdamW kernel (the one behind
``AdamW(fused=True)``: decoupled decay, moments and bias-corrected step in one pass over memory)
on the slices, once for each distinct (learning rate, weight decay) of the members. The kernel
treats every slice on its own, so member k of an ensemble gets exactly the update a single run
would, and a one-member run matches ``torch.optim.AdamW`` (tested). Devices without the fused
kernel use the same update written as elementwise tensor operations.
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
        fused: bool | None = None,
    ):
        params = list(params)
        if len(lr) != len(weight_decay):
            raise ValueError("lr and weight_decay need one value per member")
        defaults = dict(lr=max(lr), betas=tuple(betas), eps=eps, warmup_steps=warmup_steps)
        super().__init__(params, defaults)
        device = params[0].device
        self.lr, self.weight_decay = [float(x) for x in lr], [float(x) for x in weight_decay]
        self.member_lr = torch.tensor(lr, dtype=torch.float32, device=device)
        self.member_wd = torch.tensor(weight_decay, dtype=torch.float32, device=device)
        self.fused = device.type in ("cpu", "cuda") if fused is None else fused
        self.step_count = 0  # optimiser steps taken; a host integer, so the schedule needs no sync
        # The fused kernel reads the step from a device tensor (it is never read back to the host).
        self._step_tensor = torch.zeros((), dtype=torch.float32, device=device)

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
        factor = warmup_factor(self.step_count, group["warmup_steps"])
        self.step_count += 1
        params = [p for p in group["params"] if p.grad is not None]
        if not params:  # nothing to update (the step still counts, as in torch.optim.AdamW)
            return loss
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        if self.fused:
            self._fused_step(params, factor)
        else:
            self._elementwise_step(params, factor)
        return loss

    def _fused_step(self, params: list[torch.Tensor], factor: float) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        self._step_tensor.fill_(self.step_count)
        # Member slices as views, one unbind per tensor (K selects per tensor cost K times more).
        p_k = [p.unbind(0) for p in params]
        g_k = [p.grad.unbind(0) for p in params]
        m_k = [self.state[p]["exp_avg"].unbind(0) for p in params]
        v_k = [self.state[p]["exp_avg_sq"].unbind(0) for p in params]
        # One kernel call for all members that share (lr, weight decay): a seed ensemble is one call.
        for (lr, wd), members in self._members_by_setting().items():
            views = [(i, k) for k in members for i in range(len(params))]
            # torch._fused_adamw_ is the kernel torch.optim.AdamW(fused=True) calls.
            torch._fused_adamw_(
                [p_k[i][k] for i, k in views],
                [g_k[i][k] for i, k in views],
                [m_k[i][k] for i, k in views],
                [v_k[i][k] for i, k in views],
                [],
                [self._step_tensor] * len(views),
                lr=lr * factor,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )

    def _members_by_setting(self) -> dict[tuple[float, float], list[int]]:
        groups: dict[tuple[float, float], list[int]] = {}
        for k, setting in enumerate(zip(self.lr, self.weight_decay, strict=True)):
            groups.setdefault(setting, []).append(k)
        return groups

    def _elementwise_step(self, params: list[torch.Tensor], factor: float) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        t = self.step_count
        lr = self.member_lr * factor  # (K,)
        decay = 1 - lr * self.member_wd  # (K,)
        step_size = lr / (1 - beta1**t)  # (K,)
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        for p in params:
            shape = (-1,) + (1,) * (p.dim() - 1)
            exp_avg, exp_avg_sq = self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]
            p.mul_(decay.view(shape))
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            update = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(group["eps"])
            torch.div(exp_avg, update, out=update)
            p.sub_(update.mul_(step_size.view(shape)))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["step_count"] = self.step_count
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.step_count = state_dict.pop("step_count")
        super().load_state_dict(state_dict)
