"""Fixed evaluation sets conditioned on carries, and the metrics measured on them.

Random pairs rarely contain long carry chains (a chain of length L has probability ~ base^-L), so
each condition gets its own set, built directly rather than filtered from random data:

* ``carry in c at place j`` (j = 1..n, c = 0/1): pairs whose carry into place j is c;
* ``chain length L at place j`` (0 <= L <= j): the L pairs right below j each sum to base-1 and
  the pair below them does not (or the chain reaches the units), so the carry into j is decided
  L places further down;
* ``class S_k`` (k = 0..n): whole sums whose longest carry cascade spans k places, drawn as uniform
  sums conditioned on the class (``addrepro.task.complexity``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from addrepro.task.complexity import ClassSampler, class_set
from addrepro.task.encoding import carries_in, encode, sample_operands
from addrepro.task.spec import TaskSpec


def chain_length(a: torch.Tensor, b: torch.Tensor, place: int, base: int) -> torch.Tensor:
    """Number of consecutive pairs right below ``place`` summing to base-1, ``(B,)``."""
    length = torch.zeros_like(a[..., 0])
    running = torch.ones_like(a[..., 0], dtype=torch.bool)
    for i in range(place - 1, -1, -1):
        running = running & (a[..., i] + b[..., i] == base - 1)
        length = length + running.long()
    return length


def carry_in_set(spec: TaskSpec, place: int, carry: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``size`` sequences whose true carry into ``place`` is ``carry`` (rejection from random pairs)."""
    kept: list[torch.Tensor] = []
    total = 0
    while total < size:
        a, b = sample_operands(spec, 4 * size, g)
        mask = carries_in(a, b, spec)[:, place] == carry
        tokens = encode(a[mask], b[mask], spec)
        kept.append(tokens)
        total += len(tokens)
    return torch.cat(kept)[:size]


def chain_set(spec: TaskSpec, place: int, length: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``size`` sequences with a carry chain of exactly ``length`` right below ``place``."""
    a, b = sample_operands(spec, size, g)
    b = b.clone()
    lo = place - length
    b[:, lo:place] = spec.base - 1 - a[:, lo:place]
    if lo > 0:
        # Any digit except the one that would extend the chain.
        shift = torch.randint(1, spec.base, (size,), generator=g)
        b[:, lo - 1] = torch.remainder(spec.base - 1 - a[:, lo - 1] + shift, spec.base)
    return encode(a, b, spec)


@dataclass
class CarrySets:
    """All conditioned sets, concatenated so one forward pass evaluates them together."""

    tokens: torch.Tensor  # (N, T)
    slices: dict[str, tuple[int, int, int]]  # name -> (place, start, stop)
    # The carry-complexity class sets (``addrepro.task.complexity``), evaluated in a pass of their own
    # so the carry sets' numbers stay bitwise what they were without them: "class/S<k>" -> (start, stop).
    class_tokens: torch.Tensor | None = None  # (M, T)
    classes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, spec: TaskSpec, carry_size: int = 128, chain_size: int = 64, seed: int = 7, class_size: int = 128
    ) -> CarrySets:
        g = torch.Generator().manual_seed(seed)
        parts, slices, start = [], {}, 0
        if spec.task != "add":
            return cls(tokens=torch.zeros(0, spec.seq_len, dtype=torch.long), slices={})
        for j in range(1, spec.n_places):
            for c in (0, 1):
                parts.append(carry_in_set(spec, j, c, carry_size, g))
                slices[f"carry/place_{j}/cin_{c}"] = (j, start, start + carry_size)
                start += carry_size
        for j in range(1, spec.n_places):
            for length in range(0, min(j, spec.n_digits - 1) + 1):
                parts.append(chain_set(spec, j, length, chain_size, g))
                slices[f"chain/place_{j}/len_{length}"] = (j, start, start + chain_size)
                start += chain_size
        # Drawn from their own generator: adding them left the carry and chain sets as they were.
        g_classes = torch.Generator().manual_seed(seed + 1)
        class_parts, classes = [], {}
        sampler = ClassSampler(spec) if class_size else None
        for k in range(spec.n_digits + 1) if class_size else ():
            class_parts.append(class_set(spec, k, class_size, g_classes, sampler))
            classes[f"class/S{k}"] = (k * class_size, (k + 1) * class_size)
        class_tokens = torch.cat(class_parts) if class_parts else None
        return cls(tokens=torch.cat(parts), slices=slices, class_tokens=class_tokens, classes=classes)

    def to(self, device: torch.device | str) -> CarrySets:
        classes = None if self.class_tokens is None else self.class_tokens.to(device)
        return CarrySets(self.tokens.to(device), self.slices, classes, self.classes)
