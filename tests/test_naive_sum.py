"""Tests for addrepro.metrics.naive_sum: hand-built logits and a logit-built model; expectations from Python ints."""

import math
import random
import statistics

import pytest
import torch

from addrepro.metrics.carry import carry_metric_dict
from addrepro.metrics.naive_sum import depth_carry, depth_sum_probs, naive_offset_probs, naive_sum_metric_dict
from addrepro.metrics.place import place_stats, stats_from_logits
from addrepro.task.encoding import encode, operands_from_ints, split_tokens
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec


def place_of_position(pos: int, spec: TaskSpec) -> int:
    """Place emitted at answer position ``pos``, written out independently of TaskSpec.answer_places."""
    return spec.n_digits - pos if spec.order == "msb" else pos


def to_emission(place_probs: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Emission-order logits ``(..., n+1, V)`` from place-indexed probabilities ``(..., n+1, V)``."""
    out = torch.empty_like(place_probs)
    for pos in range(spec.n_places):
        out[..., pos, :] = place_probs[..., place_of_position(pos, spec), :]
    return out.clamp_min(1e-30).log()


def random_ints(spec: TaskSpec, count: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    top = spec.base**spec.n_digits
    return [rng.randrange(top) for _ in range(count)], [rng.randrange(top) for _ in range(count)]


def tokens_of(spec: TaskSpec, xs: list[int], ys: list[int]) -> torch.Tensor:
    a = operands_from_ints(torch.tensor(xs), spec)
    b = operands_from_ints(torch.tensor(ys), spec)
    return encode(a, b, spec)


def digit(x: int, j: int, base: int) -> int:
    return x // base**j % base


def true_carry(x: int, y: int, place: int, base: int) -> int:
    """Carry into ``place`` of x + y, from Python ints."""
    return int(x % base**place + y % base**place >= base**place)


def py_depth_carry(x: int, y: int, place: int, depth: int, base: int) -> int:
    """Carry out of the ``depth`` pairs right below ``place`` with nothing entering the lowest of them."""
    lo = place - depth
    xs, ys = x // base**lo % base**depth, y // base**lo % base**depth
    return (xs + ys) // base**depth


def int_of(msb_digits: list[int], base: int) -> int:
    return sum(d * base**i for i, d in enumerate(reversed(msb_digits)))


def answer_digit(x: int, y: int, j: int, base: int) -> int:
    return (x + y) // base**j % base


class NaivePlusModel(torch.nn.Module):
    """Hand-crafted logits: member m puts probability ps[m] on (a_j + b_j + k0) mod base at place j (a_n = b_n = 0)
    and spreads the rest uniformly; ``k0=None`` puts the mass on the true answer digit instead."""

    def __init__(self, spec: TaskSpec, ps: list[float], k0: int | None):
        super().__init__()
        self.spec, self.ps, self.k0 = spec, ps, k0
        self.calls = 0

    def forward(self, inputs: torch.Tensor, last: int | None = None) -> torch.Tensor:
        spec = self.spec
        n, base = spec.n_digits, spec.base
        assert last == spec.n_places
        assert inputs.shape[-1] == spec.seq_len - 1
        self.calls += 1
        if inputs.dim() == 3:  # (K, B, T-1): the same sequences for every member
            assert inputs.shape[0] == len(self.ps)
            inputs = inputs[0]
        rows = inputs.tolist()
        out = torch.empty(len(self.ps), len(rows), spec.n_places, base)
        for m, p in enumerate(self.ps):
            q = (1 - p) / (base - 1)
            for r, row in enumerate(rows):
                x, y = int_of(row[:n], base), int_of(row[n + 1 : 2 * n + 1], base)
                for pos in range(spec.n_places):
                    j = place_of_position(pos, spec)
                    if self.k0 is None:
                        target = answer_digit(x, y, j, base)
                    else:
                        target = (digit(x, j, base) + digit(y, j, base) + self.k0) % base
                    out[m, r, pos] = q
                    out[m, r, pos, target] = p
        return out.clamp_min(1e-30).log()


# -----------------------------------------------------------------------------
# naive offsets from hand-built logits


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_naive_offset_probs_hand_built(order):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    n, base, count = 3, 10, 40
    xs, ys = random_ints(spec, count, seed=1)
    tokens = tokens_of(spec, xs, ys)
    ps = [0.6, 0.25]
    k0s = [[1, 7, 0], [3, 0, 9]]  # a different favourite offset at each place, per member
    carry_out = [[0.6, 0.3], [0.2, 0.7]]  # P(0), P(1) at the carry-out place, alternating over examples
    place_probs = torch.zeros(2, count, n + 1, base)
    for m in range(2):
        p, q = ps[m], (1 - ps[m]) / (base - 1)
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            for j in range(n):
                place_probs[m, i, j] = q
                place_probs[m, i, j, (digit(x, j, base) + digit(y, j, base) + k0s[m][j]) % base] = p
            p0, p1 = carry_out[i % 2]
            place_probs[m, i, n] = (1 - p0 - p1) / (base - 2)
            place_probs[m, i, n, 0], place_probs[m, i, n, 1] = p0, p1
    _, targets = split_tokens(tokens, spec)
    stats = stats_from_logits(to_emission(place_probs, spec), targets.expand(2, *targets.shape), spec)
    batch = tokens.expand(2, *tokens.shape)

    offsets = naive_offset_probs(stats, batch, spec)
    assert offsets.shape == (2, n, base)
    expected = torch.empty(2, n, base)
    for m in range(2):
        for j in range(n):
            for k in range(base):
                expected[m, j, k] = ps[m] if k == k0s[m][j] else (1 - ps[m]) / (base - 1)
    torch.testing.assert_close(offsets, expected)
    torch.testing.assert_close(offsets.sum(-1), torch.ones(2, n))

    metrics = naive_sum_metric_dict(stats, batch, spec, "val")
    for m in range(2):
        for j in range(n):
            for k in range(base):
                assert metrics[f"val/naive/place_{j}/plus_{k}"][m].item() == pytest.approx(expected[m, j, k].item())
    # carry-out P(0), P(1): the mean of the alternating rows
    torch.testing.assert_close(metrics["val/carry_out/p0"], torch.full((2,), 0.4))
    torch.testing.assert_close(metrics["val/carry_out/p1"], torch.full((2,), 0.5))
    # per true carry-out: the mean of the right digit's probability over the examples with that carry
    for c in (0, 1):
        rows = [i for i, (x, y) in enumerate(zip(xs, ys, strict=True)) if (x + y) // base**n == c]
        expected_c = sum(carry_out[i % 2][c] for i in rows) / len(rows)
        assert metrics[f"val/carry_out/true_{c}"] == pytest.approx([expected_c] * 2)


def test_carry_out_by_truth_leaves_out_a_carry_no_example_has():
    spec = TaskSpec(n_digits=2, base=10)
    xs, ys = [12, 40, 3], [30, 51, 0]  # no sum reaches 100: every carry-out is 0
    tokens = tokens_of(spec, xs, ys)
    stats = place_stats(NaivePlusModel(spec, [0.9], k0=0), tokens, spec)
    metrics = naive_sum_metric_dict(stats, tokens[None], spec, "val")
    assert metrics["val/carry_out/true_0"].item() == pytest.approx(0.9)
    assert "val/carry_out/true_1" not in metrics


def test_naive_offsets_in_other_base():
    spec = TaskSpec(n_digits=2, base=3, order="lsb")
    xs = [x for x in range(9) for _ in range(9)]
    ys = [y for _ in range(9) for y in range(9)]
    tokens = tokens_of(spec, xs, ys)
    model = NaivePlusModel(spec, [0.5], k0=2)
    stats = place_stats(model, tokens, spec)
    offsets = naive_offset_probs(stats, tokens[None], spec)
    torch.testing.assert_close(offsets, torch.tensor([[[0.25, 0.25, 0.5]] * 2]))


# -----------------------------------------------------------------------------
# depth carries


@pytest.mark.parametrize("base,n", [(10, 4), (3, 3), (2, 5)])
def test_depth_carry_matches_python(base, n):
    spec = TaskSpec(n_digits=n, base=base)
    xs, ys = random_ints(spec, 300, seed=base)
    # long carry chains are rare; force some: y = base^n - 1 - x makes every pair sum to base-1
    ys[:50] = [base**n - 1 - x for x in xs[:50]]
    ys[50:80] = [base**n - x for x in xs[50:80]]  # every pair sums to base-1, except a carry from the units
    ys[50:80] = [y % base**n for y in ys[50:80]]
    a = operands_from_ints(torch.tensor(xs), spec)
    b = operands_from_ints(torch.tensor(ys), spec)
    for place in range(n + 1):
        for depth in range(place + 1):
            got = depth_carry(a, b, place, depth, base).tolist()
            want = [py_depth_carry(x, y, place, depth, base) for x, y in zip(xs, ys, strict=True)]
            assert got == want, (place, depth)
        # full depth is the true carry
        full = depth_carry(a, b, place, place, base).tolist()
        assert full == [true_carry(x, y, place, base) for x, y in zip(xs, ys, strict=True)]


def test_depth_carry_keeps_leading_dims():
    spec = TaskSpec(n_digits=3, base=10)
    a = operands_from_ints(torch.tensor([999, 15, 5]), spec)
    b = operands_from_ints(torch.tensor([1, 85, 4]), spec)
    batch_a, batch_b = a.expand(2, 3, 3), b.expand(2, 3, 3)  # (K, B, n)
    # units: 9+1, 5+5, 5+4 -> carries 1, 1, 0 into the tens
    assert depth_carry(batch_a, batch_b, 1, 1, 10).tolist() == [[1, 1, 0]] * 2
    # tens alone: 9+0, 1+8, 0+0 sum to at most 9 -> no carry; with the units below, 999+1 and 15+85 carry
    assert depth_carry(batch_a, batch_b, 2, 1, 10).tolist() == [[0, 0, 0]] * 2
    assert depth_carry(batch_a, batch_b, 2, 2, 10).tolist() == [[1, 1, 0]] * 2
    # hundreds: 99+00, 01+08, 00+00 never carry on their own; only the full depth sees 999+1 = 1000
    assert depth_carry(batch_a, batch_b, 3, 1, 10).tolist() == [[0, 0, 0]] * 2
    assert depth_carry(batch_a, batch_b, 3, 2, 10).tolist() == [[0, 0, 0]] * 2
    assert depth_carry(batch_a, batch_b, 3, 3, 10).tolist() == [[1, 0, 0]] * 2
    assert depth_carry(batch_a, batch_b, 3, 0, 10).tolist() == [[0, 0, 0]] * 2


# -----------------------------------------------------------------------------
# depth sums


def expected_depth_means(xs, ys, spec: TaskSpec, p: float, k0: int | None) -> dict:
    """Mean probability the model gives the depth-d sum, from Python ints."""
    base, n = spec.base, spec.n_digits
    q = (1 - p) / (base - 1)
    out = {}
    for j in range(2, n + 1):
        for d in range(1, j):
            vals = []
            for x, y in zip(xs, ys, strict=True):
                dc = py_depth_carry(x, y, j, d, base)
                depth_digit = (digit(x, j, base) + digit(y, j, base) + dc) % base  # a_n = b_n = 0
                if k0 is None:
                    favourite = answer_digit(x, y, j, base)
                else:
                    favourite = (digit(x, j, base) + digit(y, j, base) + k0) % base
                vals.append(p if depth_digit == favourite else q)
            out[(j, d)] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_depth_sum_of_a_perfect_model(order):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    xs, ys = random_ints(spec, 120, seed=5)
    ys[:30] = [999 - x for x in xs[:30]]  # chains of 9s so that shallow depths are sometimes wrong
    ys[30:45] = [(1000 - x) % 1000 for x in xs[30:45]]
    tokens = tokens_of(spec, xs, ys)
    stats = place_stats(NaivePlusModel(spec, [1.0], k0=None), tokens, spec)
    got = depth_sum_probs(stats, tokens[None], spec)
    assert set(got) == {(2, 1), (3, 1), (3, 2)}
    want = {}
    for j, d in got:
        hits = [py_depth_carry(x, y, j, d, 10) == true_carry(x, y, j, 10) for x, y in zip(xs, ys, strict=True)]
        want[(j, d)] = sum(hits) / len(hits)
    assert 0 < min(want.values()) and max(want.values()) < 1  # the check can tell the depths apart
    for key, value in got.items():
        assert value.shape == (1,)
        assert value.item() == pytest.approx(want[key], abs=1e-6), key


# -----------------------------------------------------------------------------
# the full path with a logit-built model


@pytest.mark.parametrize("k0", [0, 1])
@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_metric_dict_of_naive_plus_model(order, k0):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    n, base = 3, 10
    xs, ys = random_ints(spec, 150, seed=11)
    ys[:20] = [999 - x for x in xs[:20]]
    tokens = tokens_of(spec, xs, ys)
    ps = [0.7, 0.4]
    model = NaivePlusModel(spec, ps, k0=k0)
    stats = place_stats(model, tokens, spec)
    batch = tokens.expand(2, *tokens.shape)
    metrics = naive_sum_metric_dict(stats, batch, spec, "val")

    keys = {f"val/naive/place_{j}/plus_{k}" for j in range(n) for k in range(base)}
    keys |= {f"val/depth_sum/place_{j}/depth_{d}" for j in range(2, n + 1) for d in range(1, j)}
    keys |= {"val/carry_out/p0", "val/carry_out/p1", "val/carry_out/true_0", "val/carry_out/true_1"}
    assert set(metrics) == keys
    assert all(v.shape == (2,) for v in metrics.values())

    for m, p in enumerate(ps):
        q = (1 - p) / (base - 1)
        for j in range(n):
            for k in range(base):
                assert metrics[f"val/naive/place_{j}/plus_{k}"][m].item() == pytest.approx(p if k == k0 else q)
        # the carry-out place's naive sum is 0, so the model favours digit k0 there
        assert metrics["val/carry_out/p0"][m].item() == pytest.approx(p if k0 == 0 else q)
        assert metrics["val/carry_out/p1"][m].item() == pytest.approx(p if k0 == 1 else q)
        # split by the true carry-out: p where the favourite is the truth, q where it is not
        assert metrics["val/carry_out/true_0"][m].item() == pytest.approx(p if k0 == 0 else q)
        assert metrics["val/carry_out/true_1"][m].item() == pytest.approx(p if k0 == 1 else q)
        for (j, d), value in expected_depth_means(xs, ys, spec, p, k0).items():
            assert metrics[f"val/depth_sum/place_{j}/depth_{d}"][m].item() == pytest.approx(value, abs=1e-6)
        # per-place loss: -log p where the true digit is the favourite, -log q elsewhere
        for j in range(n + 1):
            losses = []
            for x, y in zip(xs, ys, strict=True):
                favourite = (digit(x, j, base) + digit(y, j, base) + k0) % base
                losses.append(-math.log(p if answer_digit(x, y, j, base) == favourite else q))
            assert stats.loss_by_place[m, j].item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_digitwise_metric_dict_has_no_depth_sums(order):
    spec = TaskSpec(n_digits=3, base=10, order=order, task="digitwise")
    xs, ys = random_ints(spec, 30, seed=2)
    tokens = tokens_of(spec, xs, ys)
    # digitwise answers are the naive sums and a 0 in the carry-out place: the naive+0 model is right everywhere
    stats = place_stats(NaivePlusModel(spec, [0.8], k0=0), tokens, spec)
    metrics = naive_sum_metric_dict(stats, tokens[None], spec, "train")
    keys = {f"train/naive/place_{j}/plus_{k}" for j in range(3) for k in range(10)}
    assert set(metrics) == keys | {"train/carry_out/p0", "train/carry_out/p1"}
    assert metrics["train/carry_out/p0"].item() == pytest.approx(0.8)
    assert stats.acc_by_place.tolist() == [[1.0] * 4]


@pytest.mark.parametrize("k0", [0, 1])
@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_carry_metric_dict_of_naive_plus_model(order, k0):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    base = 10
    sets = CarrySets.build(spec, carry_size=24, chain_size=12, seed=3, class_size=0)  # classes: test_complexity
    ps = [0.7, 0.4]
    model = NaivePlusModel(spec, ps, k0=k0)
    metrics = carry_metric_dict(model, sets, spec)
    assert model.calls == 1  # one forward pass for all the carry and chain sets
    kinds = ("loss", "loss_se", "acc", "p_plus0", "p_plus1")
    assert set(metrics) == {f"{name}/{s}" for name in sets.slices for s in kinds}
    rows = sets.tokens.tolist()
    for m, p in enumerate(ps):
        q = (1 - p) / (base - 1)
        for name, (j, lo, hi) in sets.slices.items():
            losses, hits = [], []
            for row in rows[lo:hi]:
                x, y = int_of(row[:3], base), int_of(row[4:7], base)
                favourite = (digit(x, j, base) + digit(y, j, base) + k0) % base
                hit = answer_digit(x, y, j, base) == favourite
                losses.append(-math.log(p if hit else q))
                hits.append(float(hit))
            assert metrics[f"{name}/loss"][m].item() == pytest.approx(sum(losses) / len(losses), rel=1e-5), name
            se = statistics.stdev(losses) / math.sqrt(len(losses))  # the sample's spread, brute force
            assert metrics[f"{name}/loss_se"][m].item() == pytest.approx(se, rel=1e-4, abs=1e-6), name
            assert metrics[f"{name}/acc"][m].item() == pytest.approx(sum(hits) / len(hits)), name
            # the model's mass on naive+0 / naive+1 at the conditioned place does not depend on the set
            assert metrics[f"{name}/p_plus0"][m].item() == pytest.approx(p if k0 == 0 else q), name
            assert metrics[f"{name}/p_plus1"][m].item() == pytest.approx(p if k0 == 1 else q), name
            if name.startswith("carry/"):
                cin = int(name[-1])
                right = cin == k0
                assert metrics[f"{name}/acc"][m].item() == (1.0 if right else 0.0), name
                assert metrics[f"{name}/loss"][m].item() == pytest.approx(-math.log(p if right else q)), name
