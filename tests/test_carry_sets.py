"""Tests for addrepro.task.sets: carry chains by brute force, conditioned sets checked with Python ints."""

import itertools
import math
import random

import pytest
import torch

from addrepro.metrics.carry import carry_metric_dict
from addrepro.task.encoding import decode, operands_from_ints, operands_from_tokens
from addrepro.task.sets import CarrySets, carry_in_set, chain_length, chain_set
from addrepro.task.spec import TaskSpec


def py_chain_length(x: int, y: int, place: int, base: int) -> int:
    """Largest L <= place such that the L pairs right below ``place`` add up to base^L - 1.

    x + y over those L digits equals base^L - 1 exactly when every pair sums to base - 1 (no pair can carry:
    the lowest pair would then leave a digit below base - 1)."""
    best = 0
    for length in range(1, place + 1):
        lo = place - length
        xs, ys = x // base**lo % base**length, y // base**lo % base**length
        if xs + ys == base**length - 1:
            best = length
        else:
            break
    return best


def carry_into(x: int, y: int, place: int, base: int) -> int:
    return int(x % base**place + y % base**place >= base**place)


def ints_of(tokens: torch.Tensor, spec: TaskSpec) -> list[tuple[int, int, int]]:
    return decode(tokens, spec)


# -----------------------------------------------------------------------------
# chain_length


def test_chain_length_exhaustive_base3():
    spec = TaskSpec(n_digits=3, base=3)
    pairs = list(itertools.product(range(27), repeat=2))
    a = operands_from_ints(torch.tensor([x for x, _ in pairs]), spec)
    b = operands_from_ints(torch.tensor([y for _, y in pairs]), spec)
    seen = set()
    for place in range(4):
        got = chain_length(a, b, place, 3).tolist()
        want = [py_chain_length(x, y, place, 3) for x, y in pairs]
        assert got == want, place
        seen |= set(want)
    assert seen == {0, 1, 2, 3}
    # a chain of 3 below place 3 happens for 3^3 of the 3^6 pairs
    assert sum(v == 3 for v in chain_length(a, b, 3, 3).tolist()) == 27


def test_chain_length_base10_samples():
    spec = TaskSpec(n_digits=5, base=10)
    rng = random.Random(0)
    xs = [rng.randrange(10**5) for _ in range(400)]
    ys = [rng.randrange(10**5) for _ in range(400)]
    for i in range(200):  # complement a random run of digits so that long chains occur
        lo, hi = sorted(rng.sample(range(6), 2))
        digits = [(xs[i] // 10**k) % 10 if lo <= k < hi else (ys[i] // 10**k) % 10 for k in range(5)]
        ys[i] = sum((9 - d if lo <= k < hi else d) * 10**k for k, d in enumerate(digits))
    a = operands_from_ints(torch.tensor(xs), spec)
    b = operands_from_ints(torch.tensor(ys), spec)
    for place in range(6):
        want = [py_chain_length(x, y, place, 10) for x, y in zip(xs, ys, strict=True)]
        assert chain_length(a, b, place, 10).tolist() == want, place
    assert max(chain_length(a, b, 5, 10).tolist()) == 5


def test_chain_length_keeps_leading_dims():
    spec = TaskSpec(n_digits=3, base=10)
    a = operands_from_ints(torch.tensor([123, 450]), spec).expand(2, 2, 3)
    b = operands_from_ints(torch.tensor([876, 549]), spec).expand(2, 2, 3)
    # 123 + 876: every pair sums to 9; 450 + 549: units 0+9, tens 5+4, hundreds 4+5 -> all 9 as well
    assert chain_length(a, b, 3, 10).tolist() == [[3, 3], [3, 3]]
    a2 = operands_from_ints(torch.tensor([123, 450]), spec)
    b2 = operands_from_ints(torch.tensor([870, 559]), spec)  # units 3+0 / tens 5+5 break the chains
    assert chain_length(a2, b2, 3, 10).tolist() == [2, 1]
    assert chain_length(a2, b2, 0, 10).tolist() == [0, 0]


# -----------------------------------------------------------------------------
# carry_in_set


@pytest.mark.parametrize("base,n", [(10, 3), (3, 2), (2, 4)])
def test_carry_in_set_has_the_requested_carry(base, n):
    spec = TaskSpec(n_digits=n, base=base)
    for place in range(1, n + 1):
        for carry in (0, 1):
            tokens = carry_in_set(spec, place, carry, 40, torch.Generator().manual_seed(place * 7 + carry))
            assert tokens.shape == (40, spec.seq_len)
            for x, y, c in ints_of(tokens, spec):
                assert c == x + y
                assert carry_into(x, y, place, base) == carry, (place, carry, x, y)


def test_carry_in_set_is_deterministic_per_seed():
    spec = TaskSpec(n_digits=3, base=10)
    first = carry_in_set(spec, 2, 1, 64, torch.Generator().manual_seed(5))
    again = carry_in_set(spec, 2, 1, 64, torch.Generator().manual_seed(5))
    other = carry_in_set(spec, 2, 1, 64, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# -----------------------------------------------------------------------------
# chain_set


@pytest.mark.parametrize("base,n", [(10, 3), (3, 3), (2, 4), (10, 5)])
def test_chain_set_has_exactly_the_requested_chain(base, n):
    spec = TaskSpec(n_digits=n, base=base)
    for place in range(1, n + 1):
        for length in range(place + 1):
            tokens = chain_set(spec, place, length, 30, torch.Generator().manual_seed(100 * place + length))
            assert tokens.shape == (30, spec.seq_len)
            a, b = operands_from_tokens(tokens, spec)
            assert chain_length(a, b, place, base).tolist() == [length] * 30
            for x, y, c in ints_of(tokens, spec):
                assert c == x + y
                assert py_chain_length(x, y, place, base) == length, (place, length, x, y)


def test_chain_set_is_deterministic_and_varied():
    spec = TaskSpec(n_digits=5, base=10)
    first = chain_set(spec, 4, 2, 50, torch.Generator().manual_seed(1))
    assert torch.equal(first, chain_set(spec, 4, 2, 50, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, chain_set(spec, 4, 2, 50, torch.Generator().manual_seed(2)))
    # the digit below the chain is any non-extending value, not one fixed choice
    a, b = operands_from_tokens(first, spec)
    assert len(set((a[:, 1] + b[:, 1]).tolist())) > 3


# -----------------------------------------------------------------------------
# CarrySets


def test_carry_sets_layout_n3():
    spec = TaskSpec(n_digits=3, base=10)
    sets = CarrySets.build(spec, carry_size=20, chain_size=10, seed=4, class_size=0)
    names = [f"carry/place_{j}/cin_{c}" for j in (1, 2, 3) for c in (0, 1)]
    names += [f"chain/place_{j}/len_{length}" for j in (1, 2, 3) for length in range(min(j, 2) + 1)]
    assert list(sets.slices) == names
    assert sets.tokens.shape == (6 * 20 + 8 * 10, spec.seq_len)
    stop = 0
    for name, (place, lo, hi) in sets.slices.items():
        assert lo == stop  # contiguous, disjoint, in order
        assert hi - lo == (20 if name.startswith("carry/") else 10)
        assert place == int(name.split("/")[1].removeprefix("place_"))
        stop = hi
        for x, y, c in decode(sets.tokens[lo:hi], spec):
            assert c == x + y
            if name.startswith("carry/"):
                assert carry_into(x, y, place, 10) == int(name[-1]), name
            else:
                assert py_chain_length(x, y, place, 10) == int(name.split("_")[-1]), name
    assert stop == len(sets.tokens)
    again = CarrySets.build(spec, carry_size=20, chain_size=10, seed=4, class_size=0)
    assert torch.equal(sets.tokens, again.tokens) and again.slices == sets.slices


def test_carry_sets_digitwise_are_empty():
    spec = TaskSpec(n_digits=3, base=10, task="digitwise")
    sets = CarrySets.build(spec, carry_size=20, chain_size=10)
    assert sets.slices == {}
    assert sets.tokens.shape == (0, spec.seq_len)

    class Never(torch.nn.Module):
        def forward(self, inputs, last=None):
            raise AssertionError("no sets: the model should not run")

    assert carry_metric_dict(Never(), sets, spec) == {}


# -----------------------------------------------------------------------------
# carry_metric_dict with a logit-built model


class NaiveZeroModel(torch.nn.Module):
    """Puts probability ps[m] on the naive sum (a_j + b_j) mod base at every place (0 at the carry-out place)."""

    def __init__(self, spec: TaskSpec, ps: list[float]):
        super().__init__()
        self.spec, self.ps = spec, ps

    def forward(self, inputs: torch.Tensor, last: int | None = None) -> torch.Tensor:
        spec = self.spec
        n, base = spec.n_digits, spec.base
        assert last == spec.n_places and inputs.dim() == 2
        a = inputs[:, :n].flip(-1)
        b = inputs[:, n + 1 : 2 * n + 1].flip(-1)
        naive = torch.cat([(a + b) % base, torch.zeros_like(a[:, :1])], dim=1)  # place-indexed (B, n+1)
        order = list(range(n, -1, -1)) if spec.order == "msb" else list(range(n + 1))
        naive = naive[:, order]  # emission order
        out = []
        for p in self.ps:
            probs = torch.full((*naive.shape, base), (1 - p) / (base - 1))
            probs.scatter_(-1, naive[..., None], p)
            out.append(probs.log())
        return torch.stack(out)


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_carry_metric_dict_naive_zero_model(order):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    sets = CarrySets.build(spec, carry_size=16, chain_size=8, seed=9, class_size=0)
    ps = [0.8, 0.35]
    metrics = carry_metric_dict(NaiveZeroModel(spec, ps), sets, spec)
    kinds = ("loss", "loss_se", "acc", "p_plus0", "p_plus1")
    assert set(metrics) == {f"{name}/{s}" for name in sets.slices for s in kinds}
    for m, p in enumerate(ps):
        q = (1 - p) / 9
        for j in (1, 2, 3):
            # carry in 0: the naive sum is the answer; carry in 1: the answer is naive + 1
            assert metrics[f"carry/place_{j}/cin_0/loss"][m].item() == pytest.approx(-math.log(p))
            assert metrics[f"carry/place_{j}/cin_1/loss"][m].item() == pytest.approx(-math.log(q))
            # every sequence of a carry set costs the same: no spread
            assert metrics[f"carry/place_{j}/cin_0/loss_se"][m].item() == pytest.approx(0, abs=1e-6)
            assert metrics[f"carry/place_{j}/cin_0/acc"][m].item() == 1.0
            assert metrics[f"carry/place_{j}/cin_1/acc"][m].item() == 0.0
            for c in (0, 1):
                assert metrics[f"carry/place_{j}/cin_{c}/p_plus0"][m].item() == pytest.approx(p)
                assert metrics[f"carry/place_{j}/cin_{c}/p_plus1"][m].item() == pytest.approx(q)
        for name, (j, lo, hi) in sets.slices.items():
            if not name.startswith("chain/"):
                continue
            hits = [carry_into(x, y, j, 10) == 0 for x, y, _ in decode(sets.tokens[lo:hi], spec)]
            frac = sum(hits) / len(hits)
            assert metrics[f"{name}/acc"][m].item() == pytest.approx(frac)
            want_loss = -(frac * math.log(p) + (1 - frac) * math.log(q))
            assert metrics[f"{name}/loss"][m].item() == pytest.approx(want_loss, rel=1e-5)
            # two values, -log p on a share frac and -log q on the rest: SE = |log p - log q| sqrt(frac(1-frac)/(n-1))
            want_se = abs(math.log(p / q)) * math.sqrt(frac * (1 - frac) / (len(hits) - 1))
            assert metrics[f"{name}/loss_se"][m].item() == pytest.approx(want_se, rel=1e-4, abs=1e-6)
        # a chain reaching the units (length j) never carries
        assert metrics["chain/place_1/len_1/acc"][m].item() == 1.0
        assert metrics["chain/place_2/len_2/acc"][m].item() == 1.0
