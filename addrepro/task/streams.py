"""Batch streams drawn on the training device, and fixed finite training/held-out sets."""

from __future__ import annotations

import torch

from addrepro.task.encoding import encode, operands_from_ints, sample_operands
from addrepro.task.samplers import OperandSampler
from addrepro.task.spec import SamplerSpec, TaskSpec


class InfiniteBatches:
    """A fresh batch every step, drawn on the training device from a seeded generator.

    The generator is the whole state of the stream, so saving and restoring it resumes the stream
    exactly where it stopped.
    """

    def __init__(
        self,
        spec: TaskSpec,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        sampler: SamplerSpec | None = None,
    ):
        self.spec, self.batch_size, self.device, self.seed = spec, batch_size, torch.device(device), seed
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.sampler = sampler or SamplerSpec()
        self.operands = OperandSampler(spec, self.sampler, batch_size, self.device)
        # Batches drawn so far, on the device: a replayed CUDA graph advances it as eager steps do.
        self.draws = torch.zeros((), dtype=torch.long, device=self.device)

    def next(self) -> torch.Tensor:
        return encode(*self.draw(), self.spec)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch's place-indexed operands ``(B, n)`` each (what ``next`` encodes)."""
        if self.sampler.name == "uniform":  # the default stream, exactly as it always was
            return sample_operands(self.spec, self.batch_size, self.generator, self.device)
        operands = self.operands.draw(self.generator, self.draws)
        self.draws += 1
        return operands

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "device": self.device.type}
        if self.sampler.name != "uniform":
            state["draws"] = int(self.draws)
        return state

    def load_state_dict(self, state: dict, step: int = 0) -> str | None:
        """Continue the saved stream; returns None, or a one-line notice when it cannot continue.

        CPU and CUDA generators are different algorithms (the same seed gives different streams), and
        one's state means nothing to the other. A stream saved on another device type therefore
        continues from a seed made of this stream's seed and ``step``: reproducible, but not the data
        an uninterrupted run would have drawn.
        """
        saved = state.get("device") or _generator_device(state["generator"])
        self.draws.fill_(int(state.get("draws", step)))
        if saved == self.device.type:
            self.generator.set_state(state["generator"])
            return None
        self.generator.manual_seed((self.seed * 1_000_003 + step) % 2**63)
        return (
            f"the data stream was saved on {saved} and continues on {self.device.type} from a new seed "
            f"(seed {self.seed}, step {step}): data after step {step} differ from an uninterrupted run"
        )


def _generator_device(state: torch.Tensor) -> str:
    """The device type of a generator state saved without one: CUDA's (Philox) is 16 bytes."""
    return "cuda" if state.numel() == 16 else "cpu"


class FiniteBatches(InfiniteBatches):
    """Batches drawn (with replacement) from a fixed training set of distinct pairs."""

    def __init__(self, train_tokens: torch.Tensor, batch_size: int | None, seed: int, spec: TaskSpec):
        super().__init__(spec, batch_size or len(train_tokens), seed, train_tokens.device)
        self.train_tokens = train_tokens
        self.full_batch = batch_size is None or batch_size >= len(train_tokens)

    def next(self) -> torch.Tensor:
        if self.full_batch:
            return self.train_tokens
        idx = torch.randint(0, len(self.train_tokens), (self.batch_size,), generator=self.generator, device=self.device)
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


def validation_tokens(
    spec: TaskSpec,
    val_size: int,
    val_seed: int,
    train_size: int | None = None,
    data_seed: int = 0,
    *,
    with_train: bool = False,
) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
    """A run's validation set ``(val_size, T)``, as training builds it from the ``data`` config.

    Infinite data (``train_size`` None): ``val_size`` uniform pairs drawn from ``val_seed``, the same
    for every member. Finite data: the held-out part of ``split_train_heldout(spec, train_size,
    val_size, data_seed)``. ``with_train``: ``(train, val)`` instead, train being the fixed training
    set (None for infinite data).
    """
    if train_size is None:
        train = None
        val = encode(*sample_operands(spec, val_size, torch.Generator().manual_seed(val_seed)), spec)
    else:
        train, val = split_train_heldout(spec, train_size, val_size, data_seed)
    return (train, val) if with_train else val


def configured_validation_tokens(config: dict, spec: TaskSpec) -> torch.Tensor:
    """The held-out set of a run, rebuilt from its resolved config (as stored in its checkpoints)."""
    data = config.get("data", {})
    return validation_tokens(
        spec,
        val_size=data.get("val_size", 2048),
        val_seed=data.get("val_seed", 1000003),
        train_size=data.get("train_size"),
        data_seed=data.get("seed", config.get("seed", 0)),
    )
