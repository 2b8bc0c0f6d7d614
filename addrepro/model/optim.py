"""AdamW over stacked parameters, with a learning rate and weight decay per ensemble member.

``torch.optim.AdamW`` takes one scalar learning rate per parameter group; stacked ensembles need a
value per member along the leading K dimension. The step runs torch's fused AdamW kernel (the one
behind ``AdamW(fused=True)``: decoupled decay, moments and bias-corrected step in one pass over
memory), once for each distinct (learning rate, weight decay) of the members, on the parameters
themselves where that is exact and on member slices otherwise (see ``_fused_plan``). The kernel
is elementwise, so member k of an ensemble gets exactly the update a single run would, and a
one-member run matches ``torch.optim.AdamW`` (tested). Devices without the fused kernel use the
same update written as elementwise tensor operations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

# The CPU kernel runs a vector loop and a scalar tail whose roundings differ, so an element's result
# depends on its position unless every member's block is a whole number of vectors (64 floats cover
# every x86/ARM vector width). The CUDA kernel computes every element the same way wherever it is.
CPU_BLOCK = 64

# The kernel reads a tensor learning rate as a double on the CPU and as a float on CUDA. Every step
# hands it one (also outside CUDA graphs), so a graph's replay and an eager step compute the same.
LR_DTYPE = {"cpu": torch.float64, "cuda": torch.float32}


@dataclass
class _KernelCall:
    """One fused-kernel call: the tensors of the members sharing one (lr, weight decay)."""

    lr: float
    weight_decay: float
    lr_table: torch.Tensor  # (warmup_steps + 1,) the learning rate at step min(t, warmup), on the device
    params: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    grads: list[tuple[int, int]] = field(default_factory=list)  # (parameter, piece of its gradient)
    steps: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _FusedPlan:
    """Views built once: the kernel calls, and how each parameter's gradient is cut each step."""

    key: tuple
    calls: list[_KernelCall]
    grad_split: list[list[int] | None]  # per parameter: sizes along K (None: the whole tensor)


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
        defaults = dict(lr=lr[0], betas=tuple(betas), eps=eps, warmup_steps=warmup_steps)
        super().__init__(params, defaults)
        device = params[0].device
        self.lr, self.weight_decay = [float(x) for x in lr], [float(x) for x in weight_decay]
        self.member_lr = torch.tensor(lr, dtype=torch.float32, device=device)
        self.member_wd = torch.tensor(weight_decay, dtype=torch.float32, device=device)
        self.fused = device.type in ("cpu", "cuda") if fused is None else fused
        # The one step counter: updates taken so far, on the device. The step reads and advances it
        # there, so a step never waits for the host and a CUDA graph can capture it.
        self._step_tensor = torch.zeros((), dtype=torch.float32, device=device)
        self._plan: _FusedPlan | None = None
        factors = [warmup_factor(s, self._warmup()) for s in range(self._warmup() + 1)]
        self._factor_table = torch.tensor(factors, dtype=torch.float32, device=device)  # by step, for current_lr

    @property
    def step_tensor(self) -> torch.Tensor:
        """Updates taken so far, on the device (float32)."""
        return self._step_tensor

    @property
    def step_count(self) -> int:
        """Updates taken so far, read from the device (a host sync: for checkpoints and tests, not per step)."""
        return int(self._step_tensor.item())

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_tensor.fill_(value)

    def _schedule_index(self) -> torch.Tensor:
        """Where the warmup tables are read at the next step: ``min(step, warmup)``, ``(1,)`` on the device.

        One element, not a 0-dim tensor: indexing with a 0-dim integer tensor reads it on the host.
        """
        return self._step_tensor.clamp(max=self._warmup()).long().view(1)

    def _warmup(self) -> int:
        return max(self.param_groups[0]["warmup_steps"], 0)

    def current_lr(self) -> torch.Tensor:
        """Learning rate of each member ``(K,)`` for the next step, on the device (no host value)."""
        return self._lr_at(self._schedule_index())

    def _lr_at(self, index: torch.Tensor) -> torch.Tensor:
        return self.member_lr * self._factor_table[index]  # (K,) * (1,)

    def host_lr(self, step: int) -> float:
        """Member 0's learning rate at ``step`` (what the parameter group shows to Lightning's callbacks)."""
        return self.lr[0] * warmup_factor(step, self._warmup())

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """One update of every member, reading and writing device memory only (a CUDA graph can capture it).

        The learning rate is read from a table indexed by the device step counter; the counter advances
        whether or not any parameter has a gradient (as in ``torch.optim.AdamW``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params_with_state()
        index = self._schedule_index()  # a new tensor: read before the counter moves
        self._step_tensor.add_(1)
        if params and self.fused:
            self._fused_step(params, index)
        elif params:
            self._elementwise_step(params, index)
        return loss

    def _params_with_state(self) -> list[torch.Tensor]:
        """The parameters that have a gradient, their moments created at their first step."""
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        return params

    def _fused_step(self, params: list[torch.Tensor], index: torch.Tensor) -> None:
        """The kernel calls of one step; the step counter is set, ``index`` is the schedule's position."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        plan = self._fused_plan(params)
        # Gradients are new tensors every step: cut them (one split per parameter), nothing else.
        pieces = [
            (p.grad,) if sizes is None else p.grad.split(sizes)
            for p, sizes in zip(params, plan.grad_split, strict=True)
        ]
        for call in plan.calls:
            # torch._fused_adamw_ is the kernel torch.optim.AdamW(fused=True) calls.
            torch._fused_adamw_(
                call.params,
                [pieces[i][j] for i, j in call.grads],
                call.exp_avgs,
                call.exp_avg_sqs,
                [],
                call.steps,
                lr=call.lr_table[index].reshape(()),
                beta1=beta1,
                beta2=beta2,
                weight_decay=call.weight_decay,
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )

    def _fused_plan(self, params: list[torch.Tensor]) -> _FusedPlan:
        """The kernel calls for ``params``, built once (again only if the parameters or moments change).

        Members with equal settings that sit next to each other along K are updated as one block: all
        of a parameter when every member shares one (lr, weight decay) — a seed ensemble is one call
        over the stacked tensors. Where a block would change the kernel's rounding (CPU, see
        ``CPU_BLOCK``) each member gets its own slice, exactly as a single run's parameter.
        """
        key = tuple((id(p), id(self.state[p]["exp_avg"]), id(self.state[p]["exp_avg_sq"])) for p in params)
        if self._plan is not None and self._plan.key == key:
            return self._plan
        settings = list(zip(self.lr, self.weight_decay, strict=True))
        warmup = self._warmup()
        calls: dict[tuple[float, float], _KernelCall] = {}
        grad_split: list[list[int] | None] = []
        for i, p in enumerate(params):
            blocks_exact = p.device.type == "cuda" or p[0].numel() % CPU_BLOCK == 0
            runs = _runs(settings) if blocks_exact else [(k, k + 1) for k in range(len(settings))]
            sizes = [end - start for start, end in runs]
            grad_split.append(None if len(runs) == 1 else sizes)
            state = self.state[p]
            cuts = [t.split(sizes) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
            for j, (start, _) in enumerate(runs):
                if settings[start] not in calls:
                    lr, wd = settings[start]
                    table = [lr * warmup_factor(s, warmup) for s in range(warmup + 1)]
                    calls[settings[start]] = _KernelCall(
                        lr, wd, torch.tensor(table, dtype=LR_DTYPE[p.device.type], device=p.device)
                    )
                call = calls[settings[start]]
                call.params.append(cuts[0][j])
                call.exp_avgs.append(cuts[1][j])
                call.exp_avg_sqs.append(cuts[2][j])
                call.grads.append((i, j))
                call.steps.append(self._step_tensor)
        self._plan = _FusedPlan(key, list(calls.values()), grad_split)
        return self._plan

    def _elementwise_step(self, params: list[torch.Tensor], index: torch.Tensor) -> None:
        """The fused kernel's update as tensor operations (devices without the kernel); the step counter
        has advanced, ``index`` is the schedule's position before it."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        # The bias corrections in double precision, then rounded once, as the kernel does (MPS has no doubles).
        t = self._step_tensor.to(torch.float32 if self._step_tensor.device.type == "mps" else torch.float64)
        lr = self._lr_at(index)  # (K,)
        decay = 1 - lr * self.member_wd  # (K,)
        step_size = lr / (1 - torch.pow(beta1, t)).float()  # (K,)
        bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt().float()
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
        step_count = state_dict.pop("step_count")
        super().load_state_dict(state_dict)
        self.step_count = step_count


def _runs(settings: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Maximal ranges ``[start, end)`` of neighbouring members with equal settings."""
    runs: list[tuple[int, int]] = []
    for k, setting in enumerate(settings):
        if runs and settings[runs[-1][0]] == setting:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs
