"""Carry-complexity classes S0 … Sn of a sum: how far its longest carry cascade reaches.

Each digit pair is one of three operations, named as in Quirke & Barez's addition papers (their
``maths_complexity.py``, which reads each pair's own sum, as here):

* ``MC1`` (make carry 1): ``a_j + b_j >= base``, the pair sends a carry up whatever comes from below;
* ``MS9`` (make sum 9): ``a_j + b_j = base − 1``, the pair passes on a carry it gets (a "use sum 9",
  US9, when one comes);
* ``BA`` (base add): ``a_j + b_j < base − 1``, no carry leaves the pair.

A sum is in class ``S0`` when no pair makes a carry, and in ``S_k`` (k ≥ 1) when its longest cascade —
an MC1 pair and the MS9 pairs right above it, through which its carry travels — spans k places (their
S1 … S4; their S5 is "5 or more", here S5 … Sn). Under uniform operands most sums are S1 (the carries
stop where they land); each further place of cascade costs about a factor ``base``.

The class depends on the operation sequence alone, a Markov chain over places, so class frequencies
are exact (``class_frequencies``) and a set drawn from one class is drawn exactly as uniform pairs
conditioned on that class (``class_set``): operations sampled forward, conditioned through a
backward pass, then a uniform pair of each operation.
"""

from __future__ import annotations

import torch

from addrepro.task.encoding import encode
from addrepro.task.spec import TaskSpec

OPERATIONS = ("BA", "MS9", "MC1")  # op index 0, 1, 2


def operations(a: torch.Tensor, b: torch.Tensor, base: int) -> torch.Tensor:
    """The operation of each pair, ``(..., n)``: 0 BA, 1 MS9, 2 MC1 (place-indexed digits in)."""
    s = a + b
    return (s >= base - 1).long() + (s >= base).long()


def cascade_class(a: torch.Tensor, b: torch.Tensor, base: int) -> torch.Tensor:
    """The class k of each sum, ``(...,)``: the longest run of an MC1 pair and the MS9 pairs above it."""
    ops = operations(a, b, base)
    run = torch.zeros_like(ops[..., 0])
    best = torch.zeros_like(run)
    for j in range(ops.shape[-1]):  # places, units first: a cascade runs upwards
        run = torch.where(ops[..., j] == 2, 1, torch.where((ops[..., j] == 1) & (run > 0), run + 1, 0))
        best = torch.maximum(best, run)
    return best


def operation_probs(base: int) -> torch.Tensor:
    """P(BA), P(MS9), P(MC1) of one pair of uniform digits, float64 ``(3,)``."""
    pairs = base * base
    make = base * (base - 1) // 2  # pairs with a + b >= base
    return torch.tensor([pairs - make - base, base, make], dtype=torch.float64) / pairs


def _next_state(run: torch.Tensor, best: torch.Tensor, op: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    new_run = torch.full_like(run, 1) if op == 2 else (torch.where(run > 0, run + 1, 0) if op == 1 else 0 * run)
    new_run = new_run.clamp(max=n)
    return new_run, torch.maximum(best, new_run)


def _success(n: int, base: int, k: int) -> torch.Tensor:
    """``V[j, run, best]``: the probability that a sum whose first j pairs left (run, best) ends in
    class k, float64 ``(n + 1, n + 1, n + 1)``; a backward pass over places."""
    p = operation_probs(base)
    states = torch.arange(n + 1)
    run, best = torch.meshgrid(states, states, indexing="ij")  # (n+1, n+1)
    value = torch.zeros(n + 1, n + 1, n + 1, dtype=torch.float64)
    value[n] = (best == k).double()
    for j in range(n - 1, -1, -1):
        for op in range(3):
            r, m = _next_state(run, best, op, n)
            value[j] += p[op] * value[j + 1][r, m]
    return value


def class_frequencies(n: int, base: int) -> list[float]:
    """P(S0), …, P(Sn) under uniform operands of n digits, exact (float64)."""
    return [float(_success(n, base, k)[0, 0, 0]) for k in range(n + 1)]


class ClassSampler:
    """Uniform sums conditioned on a class given per example, drawn with fixed shapes and no host
    synchronisation (a CUDA graph can record it): tables of the backward pass and of the pairs of each
    operation are built once, on the device; every draw is ``torch.rand`` from the caller's generator."""

    def __init__(self, spec: TaskSpec, device: torch.device | str = "cpu"):
        n, base = spec.n_digits, spec.base
        self.n, self.base = n, base
        # value[k, j, run, best]: P(class k at the end | state after j places)
        self.value = torch.stack([_success(n, base, k) for k in range(n + 1)]).to(device)
        self.p = operation_probs(base).to(device)
        self.possible = self.value[:, 0, 0, 0] > 0  # (n+1,) classes that occur
        a, b = torch.meshgrid(torch.arange(base), torch.arange(base), indexing="ij")
        pairs = torch.stack([a.flatten(), b.flatten()], dim=-1)  # (base², 2)
        ops = operations(pairs[:, 0], pairs[:, 1], base)
        self.counts = torch.bincount(ops, minlength=3).to(device)  # pairs of each operation
        order = torch.argsort(ops, stable=True)
        self.pairs = pairs[order].to(device)  # grouped by operation: BA, then MS9, then MC1
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # (3,)

    def draw(self, k: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Operands ``(B, n)`` each, place-indexed, of sums whose classes are ``k`` ``(B,)``."""
        size, n = k.shape[0], self.n
        run = torch.zeros_like(k)
        best = torch.zeros_like(k)
        u = torch.rand(size, n, 2, generator=g, device=k.device, dtype=torch.float64)
        a, b = [], []
        for j in range(n):
            nexts = [_next_state(run, best, op, n) for op in range(3)]
            weights = torch.stack([self.p[op] * self.value[k, j + 1, r, m] for op, (r, m) in enumerate(nexts)], -1)
            cdf = torch.cumsum(weights, -1)
            op = (u[:, j, 0:1] * cdf[:, -1:] >= cdf).sum(-1).clamp(max=2)  # inverse CDF: (B,) in 0..2
            run = torch.stack([r for r, _ in nexts], -1).gather(-1, op[:, None]).squeeze(-1)
            best = torch.stack([m for _, m in nexts], -1).gather(-1, op[:, None]).squeeze(-1)
            count = self.counts[op]
            pick = self.starts[op] + (u[:, j, 1] * count).long().clamp(max=count - 1)
            a.append(self.pairs[pick, 0])
            b.append(self.pairs[pick, 1])
        return torch.stack(a, -1), torch.stack(b, -1)


def class_operands(
    spec: TaskSpec, k: int, size: int, g: torch.Generator, sampler: ClassSampler | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` uniform operand pairs conditioned on class ``k``, place-indexed ``(size, n)`` each;
    ``sampler``: one built for ``spec`` already (its tables are the costly part)."""
    sampler = sampler or ClassSampler(spec)
    if not 0 <= k <= spec.n_digits or not sampler.possible[k]:
        raise ValueError(f"class S{k} does not occur with {spec.n_digits} digits (S0..S{spec.n_digits})")
    return sampler.draw(torch.full((size,), k, dtype=torch.long), g)


def class_set(
    spec: TaskSpec, k: int, size: int, g: torch.Generator, sampler: ClassSampler | None = None
) -> torch.Tensor:
    """``size`` token sequences of class ``S_k``, drawn as uniform sums conditioned on the class."""
    return encode(*class_operands(spec, k, size, g, sampler), spec)
