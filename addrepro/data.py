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

from dataclasses import dataclass
from functools import cached_property

import torch

ORDERS = ("msb", "lsb")
TASKS = ("add", "digitwise")


@dataclass(frozen=True)
class TaskSpec:
    n_digits: int = 5
    base: int = 10
    order: str = "msb"
    task: str = "add"

    @property
    def n_places(self) -> int:
        return self.n_digits + 1

    @property
    def d_vocab(self) -> int:
        return self.base + 2

    @property
    def plus_token(self) -> int:
        return self.base

    @property
    def equals_token(self) -> int:
        return self.base + 1

    @property
    def seq_len(self) -> int:
        return 3 * self.n_digits + 3

    @property
    def answer_start(self) -> int:
        """Index of the first answer token in the full sequence."""
        return 2 * self.n_digits + 2

    @cached_property
    def answer_places(self) -> tuple[int, ...]:
        """Place of each answer token, in emission order."""
        n = self.n_digits
        return tuple(range(n, -1, -1)) if self.order == "msb" else tuple(range(n + 1))

    @cached_property
    def emission_index(self) -> tuple[int, ...]:
        """For each place j, the position (0..n) at which it is emitted."""
        index = [0] * self.n_places
        for pos, place in enumerate(self.answer_places):
            index[place] = pos
        return tuple(index)

    def token_labels(self) -> list[str]:
        """Human-readable label of every sequence position, e.g. ``a4 .. + b0 = c5 ..``."""
        n = self.n_digits
        labels = [f"a{j}" for j in range(n - 1, -1, -1)] + ["+"]
        labels += [f"b{j}" for j in range(n - 1, -1, -1)] + ["="]
        labels += [f"c{j}" for j in self.answer_places]
        return labels


def sample_operands(
    spec: TaskSpec, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform operands on [0, base^n), as place-indexed digits, each ``(B, n)``.

    Independent uniform digits are exactly uniform operands with leading zeros kept.
    """
    digits = torch.randint(
        0, spec.base, (batch_size, 2, spec.n_digits), generator=generator, device=device
    )
    return digits[:, 0], digits[:, 1]


def answer_digits(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Place-indexed answer digits ``(B, n + 1)`` for place-indexed operand digits ``(B, n)``."""
    pair_sum = a + b  # (B, n)
    if spec.task == "digitwise":
        out = torch.remainder(pair_sum, spec.base)
        return torch.cat([out, torch.zeros_like(out[:, :1])], dim=1)
    places = []
    carry = torch.zeros_like(pair_sum[:, 0])
    # A loop over places (not samples): the carry is a scan and n is small.
    for j in range(spec.n_digits):
        total = pair_sum[:, j] + carry
        places.append(torch.remainder(total, spec.base))
        carry = torch.div(total, spec.base, rounding_mode="floor")
    places.append(carry)
    return torch.stack(places, dim=1)


def carries_in(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Carry into every place ``(B, n + 1)``; place 0 never receives one. Zero for ``digitwise``."""
    carry = torch.zeros_like(a[:, 0])
    out = [carry]
    for j in range(spec.n_digits):
        if spec.task == "add":
            carry = torch.div(a[:, j] + b[:, j] + carry, spec.base, rounding_mode="floor")
        out.append(carry)
    return torch.stack(out, dim=1)


def encode(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Full token sequences ``(B, 3n + 3)`` for place-indexed operand digits."""
    answer = answer_digits(a, b, spec)
    bsz = a.shape[0]
    plus = torch.full((bsz, 1), spec.plus_token, dtype=a.dtype, device=a.device)
    equals = torch.full((bsz, 1), spec.equals_token, dtype=a.dtype, device=a.device)
    emitted = answer[:, list(spec.answer_places)]
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


class InfiniteBatches:
    """A fresh batch every step, drawn on the training device from a seeded generator.

    The generator is the whole state of the stream, so saving and restoring it resumes the stream
    exactly where it stopped.
    """

    def __init__(self, spec: TaskSpec, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        self.spec, self.batch_size, self.device = spec, batch_size, torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def next(self) -> torch.Tensor:
        return encode(*self.draw(), self.spec)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch's place-indexed operands ``(B, n)`` each (what ``next`` encodes)."""
        return sample_operands(self.spec, self.batch_size, self.generator, self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class FiniteBatches(InfiniteBatches):
    """Batches drawn (with replacement) from a fixed training set of distinct pairs."""

    def __init__(self, train_tokens: torch.Tensor, batch_size: int | None, seed: int, spec: TaskSpec):
        super().__init__(spec, batch_size or len(train_tokens), seed, train_tokens.device)
        self.train_tokens = train_tokens
        self.full_batch = batch_size is None or batch_size >= len(train_tokens)

    def next(self) -> torch.Tensor:
        if self.full_batch:
            return self.train_tokens
        idx = torch.randint(
            0, len(self.train_tokens), (self.batch_size,), generator=self.generator, device=self.device
        )
        return self.train_tokens[idx]


def stacked_batch(streams: list[InfiniteBatches]) -> torch.Tensor:
    """The next batch of every stream, ``(K, B, T)``: exactly ``torch.stack([s.next() for s in streams])``.

    Each stream draws its own random numbers (one kernel each), but the infinite streams' operands
    are encoded together, so a stack of K models pays for one encoding, not K.
    """
    if len(streams) > 1 and all(type(s) is InfiniteBatches for s in streams):
        spec = streams[0].spec
        a, b = (torch.stack(x) for x in zip(*(s.draw() for s in streams), strict=True))  # each (K, B, n)
        k, bsz, n = a.shape
        return encode(a.view(k * bsz, n), b.view(k * bsz, n), spec).view(k, bsz, -1)
    return torch.stack([s.next() for s in streams])


def distinct_pairs(spec: TaskSpec, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct operand pairs as place-indexed digits, reproducible from ``seed``."""
    n_pairs = spec.base ** (2 * spec.n_digits)
    if count > n_pairs:
        raise ValueError(f"asked for {count} distinct pairs but only {n_pairs} exist")
    if n_pairs > 2**62:
        raise ValueError(f"finite data needs base^(2 n_digits) <= 2^62 pairs, got {n_pairs}")
    g = torch.Generator().manual_seed(seed)
    if n_pairs <= 4 * count or n_pairs <= 2**24:
        codes = torch.randperm(n_pairs, generator=g)[:count]
    else:
        # Rejection: draw a few extra codes and keep the first distinct ones in draw order.
        codes = torch.empty(0, dtype=torch.int64)
        while len(codes) < count:
            draw = torch.randint(0, n_pairs, (2 * count,), generator=g, dtype=torch.int64)
            merged = torch.cat([codes, draw])
            uniq, inverse = torch.unique(merged, return_inverse=True)
            first = torch.full((len(uniq),), len(merged), dtype=torch.int64)
            first.scatter_reduce_(0, inverse, torch.arange(len(merged)), reduce="amin")
            codes = merged[first.sort().values][:count]
    side = spec.base**spec.n_digits
    a = operands_from_ints(torch.div(codes, side, rounding_mode="floor"), spec)
    b = operands_from_ints(torch.remainder(codes, side), spec)
    return a, b


def split_train_heldout(
    spec: TaskSpec, train_size: int, heldout_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint fixed training and held-out sets of token sequences."""
    a, b = distinct_pairs(spec, train_size + heldout_size, seed)
    tokens = encode(a, b, spec)
    return tokens[:train_size], tokens[train_size:]


def operands_from_tokens(tokens: torch.Tensor, spec: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Place-indexed operand digits ``(..., n)`` read from token sequences ``(..., T)``."""
    n = spec.n_digits
    return tokens[..., :n].flip(-1), tokens[..., n + 1 : 2 * n + 1].flip(-1)
