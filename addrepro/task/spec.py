"""The task's specification: digits, base, answer order and the token layout it implies."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property, partial
from typing import Any

ORDERS = ("msb", "lsb")


TASKS = ("add", "digitwise")
SAMPLERS = ("uniform", "carry_enriched", "carry_balanced", "curriculum")  # training distributions (task.samplers)


@dataclass(frozen=True)
class TaskSpec:
    n_digits: int = 5
    base: int = 10
    order: str = "msb"
    task: str = "add"

    def __post_init__(self) -> None:
        # A task read back from a run's files (its config, a checkpoint) may have been edited or damaged.
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (whole(self.n_digits) and self.n_digits >= 1):
            raise ValueError(f"n_digits={self.n_digits!r} must be an integer >= 1")
        if not (whole(self.base) and 2 <= self.base <= 36):
            raise ValueError(f"base={self.base!r} must be an integer in 2..36")
        if self.n_digits > 62 or 2 * self.base**self.n_digits >= 2**63:  # operands and the atlas use int64
            raise ValueError(f"n_digits={self.n_digits} must keep 2 * base^n_digits below 2^63 (base {self.base})")
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} must be one of {', '.join(ORDERS)}")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {', '.join(TASKS)}")

    @classmethod
    def from_config(cls, data: Any) -> TaskSpec:
        """The task of a run config's ``data`` section, read by attribute (a DictConfig, the schema's
        dataclass) or, for a plain dict (a checkpoint's stored config), by key: ``n_digits``, ``base``,
        ``order`` and ``task``; other keys are ignored."""
        get = data.__getitem__ if isinstance(data, dict) else partial(getattr, data)
        return cls(**{f.name: get(f.name) for f in fields(cls)})

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


def place_role(j: int, n_digits: int) -> str:
    """What place j does in an n-digit sum, comparable across digit counts: ``carry-out``,
    ``top digit``, ``top-1``, ``top-2``, …, ``tens``, ``units`` (the top digit wins over ``tens`` for
    two digits; one digit has only ``units`` and ``carry-out``)."""
    if j == n_digits:
        return "carry-out"
    if j == 0:
        return "units"
    if j == n_digits - 1:
        return "top digit"
    if j == 1:
        return "tens"
    return f"top-{n_digits - 1 - j}"


def role_order(n_digits: list[int]) -> list[str]:
    """The roles of the places of all these digit counts, carry-out first and units last."""
    n = max(n_digits)
    middle = [f"top-{k}" for k in range(1, n - 2)]
    present = {place_role(j, d) for d in n_digits for j in range(d + 1)}
    return [r for r in ["carry-out", "top digit", *middle, "tens", "units"] if r in present]


@dataclass(frozen=True)
class SamplerSpec:
    """A training distribution and its parameters, as the ``data`` config sets them."""

    name: str = "uniform"
    enrich_batches: float = 0.4
    enrich_digits: float = 0.4
    curriculum_steps: int = 500

    @classmethod
    def from_config(cls, data: Any) -> SamplerSpec:
        """The sampler of a run config's ``data`` section, read as ``TaskSpec.from_config`` reads the
        task (by attribute, or by key for a checkpoint's stored config). A stored config from before a
        key existed gets this class's default, which is also the ``data`` schema's."""
        get = data.get if isinstance(data, dict) else partial(getattr, data)
        key = {"name": "sampler"}  # the config key of each field named otherwise
        return cls(**{f.name: get(key.get(f.name, f.name), f.default) for f in fields(cls)})
