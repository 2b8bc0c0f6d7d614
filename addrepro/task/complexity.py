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


def _pairs_by_operation(base: int) -> list[torch.Tensor]:
    a, b = torch.meshgrid(torch.arange(base), torch.arange(base), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=-1)  # (base², 2)
    ops = operations(pairs[:, 0], pairs[:, 1], base)
    return [pairs[ops == op] for op in range(3)]


def class_operands(spec: TaskSpec, k: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` uniform operand pairs conditioned on class ``k``, place-indexed ``(size, n)`` each."""
    n, base = spec.n_digits, spec.base
    value = _success(n, base, k)
    if value[0, 0, 0] <= 0:
        raise ValueError(f"class S{k} does not occur with {n} digits (S0..S{n})")
    p = operation_probs(base)
    run = torch.zeros(size, dtype=torch.long)
    best = torch.zeros(size, dtype=torch.long)
    pairs = _pairs_by_operation(base)
    a = torch.empty(size, n, dtype=torch.long)
    b = torch.empty(size, n, dtype=torch.long)
    for j in range(n):
        nexts = [_next_state(run, best, op, n) for op in range(3)]
        weights = torch.stack([p[op] * value[j + 1][r, m] for op, (r, m) in enumerate(nexts)], dim=-1)  # (size, 3)
        op = torch.multinomial(weights, 1, generator=g).squeeze(-1)
        run = torch.stack([r for r, _ in nexts], dim=-1).gather(-1, op[:, None]).squeeze(-1)
        best = torch.stack([m for _, m in nexts], dim=-1).gather(-1, op[:, None]).squeeze(-1)
        for o in range(3):
            rows = (op == o).nonzero().squeeze(-1)
            pick = torch.randint(0, len(pairs[o]), (len(rows),), generator=g)
            a[rows, j], b[rows, j] = pairs[o][pick, 0], pairs[o][pick, 1]
    return a, b


def class_set(spec: TaskSpec, k: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``size`` token sequences of class ``S_k``, drawn as uniform sums conditioned on the class."""
    return encode(*class_operands(spec, k, size, g), spec)
