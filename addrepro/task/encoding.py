"""The addition task: token layout, operand sampling and batches made on the training device.

A sequence is ``a_{n-1} .. a_0 + b_{n-1} .. b_0 = c ..`` with one token per digit and per sign.
Digits are tokens ``0..base-1``; ``+`` is ``base`` and ``=`` is ``base + 1``. The answer always has
``n + 1`` digits, the leading one being the carry-out, written most significant first (``msb``) or
reversed (``lsb``).

Everywhere in addrepro a *place* is the value position of an answer digit: place 0 is the units
digit and place ``n`` the carry-out digit, whatever order the answer is written in. Digit tensors are
therefore stored place-indexed (``[..., j]`` is place ``j``) and only converted to emission order when
tokens are written.
"""

from __future__ import annotations

import torch

from addrepro.task.spec import TaskSpec


def sample_operands(
    spec: TaskSpec, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform operands on [0, base^n), as place-indexed digits, each ``(B, n)``.

    Independent uniform digits are exactly uniform operands with leading zeros kept.
    """
    digits = torch.randint(0, spec.base, (batch_size, 2, spec.n_digits), generator=generator, device=device)
    return digits[:, 0], digits[:, 1]


def carry_scan(pair_sums: torch.Tensor, base: int) -> torch.Tensor:
    """Carries of a column addition of place-indexed digit-pair sums ``(..., m)``, from carry 0.

    Returns ``(..., m + 1)``: ``[..., i]`` is the carry into pair ``i`` (0 for ``i = 0``) and
    ``[..., m]`` the carry out of the top pair. The one carry scan of addrepro.
    """
    carry = pair_sums.new_zeros(pair_sums.shape[:-1])
    out = [carry]
    # A loop over places (not samples): the carry is a scan and n is small.
    for i in range(pair_sums.shape[-1]):
        carry = torch.div(pair_sums[..., i] + carry, base, rounding_mode="floor")
        out.append(carry)
    return torch.stack(out, dim=-1)


def carries_in(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Carry into every place ``(..., n + 1)`` of operand digits ``(..., n)``; place 0 never receives
    one and place ``n`` receives the carry-out. Zero for ``digitwise``."""
    if spec.task == "digitwise":
        return a.new_zeros((*a.shape[:-1], spec.n_places))
    return carry_scan(a + b, spec.base)


def answer_digits(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Place-indexed answer digits ``(..., n + 1)`` for place-indexed operand digits ``(..., n)``:
    ``(a_j + b_j + carry_j) mod base`` below place n, and the carry-out at place n."""
    carries = carries_in(a, b, spec)  # (..., n + 1)
    digits = torch.remainder(a + b + carries[..., :-1], spec.base)  # (..., n)
    return torch.cat([digits, carries[..., -1:]], dim=-1)


def reorder(x: torch.Tensor, order: tuple[int, ...], dim: int = -1) -> torch.Tensor:
    """``x`` indexed by ``order`` along ``dim``, without building an index tensor on the host.

    The answer orders are the identity (a view) or a reversal (a flip). Indexing a device tensor
    with a Python list would build a CPU index tensor and copy it to the device every call, a
    blocking copy on CUDA; any other order therefore uses an index cached on the device.
    """
    n = len(order)
    if order == tuple(range(n)):
        return x
    if order == tuple(range(n - 1, -1, -1)):
        return x.flip(dim)
    return x.index_select(dim, _device_index(order, x.device))


_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _device_index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (order, device)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = torch.tensor(order, dtype=torch.long, device=device)
    return _INDEX_CACHE[key]


def encode(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Full token sequences ``(B, 3n + 3)`` for place-indexed operand digits."""
    answer = answer_digits(a, b, spec)
    bsz = a.shape[0]
    plus = torch.full((bsz, 1), spec.plus_token, dtype=a.dtype, device=a.device)
    equals = torch.full((bsz, 1), spec.equals_token, dtype=a.dtype, device=a.device)
    emitted = reorder(answer, spec.answer_places, dim=1)
    return torch.cat([a.flip(1), plus, b.flip(1), equals, emitted], dim=1)


def split_tokens(tokens: torch.Tensor, spec: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs (every token but the last) and answer targets in emission order ``(..., n + 1)``."""
    return tokens[..., :-1], tokens[..., spec.answer_start :]


def decode(tokens: torch.Tensor, spec: TaskSpec) -> list[tuple[int, int, int]]:
    """Integers ``(a, b, c)`` of each sequence, read back from the tokens (for tests and debugging)."""
    n, base = spec.n_digits, spec.base
    out = []
    for row in tokens.tolist():
        a = _digits_to_int(row[:n], base)
        b = _digits_to_int(row[n + 1 : 2 * n + 1], base)
        emitted = row[spec.answer_start :]
        c_msb = emitted if spec.order == "msb" else emitted[::-1]
        out.append((a, b, _digits_to_int(c_msb, base)))
    return out


def _digits_to_int(digits: list[int], base: int) -> int:
    value = 0
    for d in digits:
        if not 0 <= d < base:
            raise ValueError(f"token {d} is not a digit of base {base}")
        value = value * base + d
    return value


def operands_from_ints(values: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Place-indexed digits ``(B, n)`` of integers ``(B,)``."""
    powers = spec.base ** torch.arange(spec.n_digits, device=values.device, dtype=torch.int64)
    return torch.remainder(torch.div(values[:, None], powers, rounding_mode="floor"), spec.base)


def operands_from_tokens(tokens: torch.Tensor, spec: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Place-indexed operand digits ``(..., n)`` read from token sequences ``(..., T)``."""
    n = spec.n_digits
    return tokens[..., :n].flip(-1), tokens[..., n + 1 : 2 * n + 1].flip(-1)
