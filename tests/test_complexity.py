"""Carry-complexity classes S0..Sn: classes, exact frequencies and class sets checked by enumeration,
and the class metrics of a model whose every answer is known (the naive-sum model)."""

import itertools
import math
from collections import Counter

import pytest
import torch
from test_carry_sets import NaiveZeroModel, carry_into

from addrepro.metrics.carry import carry_metric_dict
from addrepro.task.complexity import cascade_class, class_frequencies, class_operands
from addrepro.task.encoding import decode, operands_from_ints
from addrepro.task.sets import CarrySets
from addrepro.task.spec import TaskSpec


def py_class(x: int, y: int, n: int, base: int) -> int:
    """The longest cascade, from the column addition written out with Python ints."""
    best = run = 0
    for j in range(n):
        s = x // base**j % base + y // base**j % base
        run = 1 if s >= base else (run + 1 if s == base - 1 and run else 0)
        best = max(best, run)
    return best


def test_hand_written_sums_have_their_classes():
    spec = TaskSpec(n_digits=4)
    cases = {(1234, 4321): 0, (15, 5): 1, (1999, 1): 3, (1995, 5): 3, (9990, 10): 3, (950, 50): 2, (9999, 1): 4}
    a = operands_from_ints(torch.tensor([x for x, _ in cases]), spec)
    b = operands_from_ints(torch.tensor([y for _, y in cases]), spec)
    assert cascade_class(a, b, 10).tolist() == list(cases.values())


@pytest.mark.parametrize("n,base", [(3, 3), (2, 10), (4, 2), (2, 7)])
def test_classes_and_exact_frequencies_match_enumeration(n, base):
    spec = TaskSpec(n_digits=n, base=base)
    xs, ys = zip(*itertools.product(range(base**n), repeat=2), strict=True)
    a, b = operands_from_ints(torch.tensor(xs), spec), operands_from_ints(torch.tensor(ys), spec)
    classes = cascade_class(a, b, base)
    assert classes.tolist() == [py_class(x, y, n, base) for x, y in zip(xs, ys, strict=True)]
    counts = torch.bincount(classes, minlength=n + 1).double() / len(xs)
    assert class_frequencies(n, base) == pytest.approx(counts.tolist(), abs=1e-12)


def test_five_digit_frequencies_in_base_ten():
    freq = class_frequencies(5, 10)
    assert freq[0] == pytest.approx(0.55**5, rel=1e-12)  # no pair makes a carry: 55 of 100 pairs each
    assert sum(freq) == pytest.approx(1.0, abs=1e-12)
    assert freq[1] > freq[2] > freq[3] > freq[4] > freq[5] > 0  # each place of cascade about base times rarer


def test_a_class_set_is_uniform_over_the_sums_of_its_class():
    """Every one of the (a, b) of a class comes equally often: counts within 5 standard errors."""
    spec = TaskSpec(n_digits=3, base=3)
    g = torch.Generator().manual_seed(0)
    draws = 40_000
    for k in range(4):
        members = [(x, y) for x, y in itertools.product(range(27), repeat=2) if py_class(x, y, 3, 3) == k]
        a, b = class_operands(spec, k, draws, g)
        assert (cascade_class(a, b, 3) == k).all()
        place = 3 ** torch.arange(3)
        counts = Counter(zip((a * place).sum(-1).tolist(), (b * place).sum(-1).tolist(), strict=True))
        assert set(counts) == set(members)
        expected = draws / len(members)
        sd = math.sqrt(expected * (1 - 1 / len(members)))
        assert max(abs(c - expected) for c in counts.values()) < 5 * sd, (k, len(members))


def test_class_sets_follow_the_carry_sets_and_leave_them_unchanged():
    spec = TaskSpec(n_digits=3)
    without = CarrySets.build(spec, carry_size=8, chain_size=4, seed=3, class_size=0)
    sets = CarrySets.build(spec, carry_size=8, chain_size=4, seed=3, class_size=5)
    assert torch.equal(sets.tokens, without.tokens) and sets.slices == without.slices
    assert without.class_tokens is None and without.classes == {}
    assert sets.classes == {f"class/S{k}": (5 * k, 5 * (k + 1)) for k in range(4)}
    assert sets.class_tokens.shape == (20, spec.seq_len)
    for name, (lo, hi) in sets.classes.items():
        for x, y, c in decode(sets.class_tokens[lo:hi], spec):
            assert c == x + y and py_class(x, y, 3, 10) == int(name.removeprefix("class/S"))


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_class_metrics_of_the_naive_sum_model(order):
    """The naive-sum model is right at a place exactly when no carry comes into it: whole answers are
    right for S0 alone, and each place's accuracy is the share of the class without a carry into it."""
    spec = TaskSpec(n_digits=3, order=order)
    sets = CarrySets.build(spec, carry_size=4, chain_size=2, seed=1, class_size=40)
    ps = [0.9, 0.3]
    metrics = carry_metric_dict(NaiveZeroModel(spec, ps), sets, spec)
    for m, p in enumerate(ps):
        q = (1 - p) / 9
        for name, (lo, hi) in sets.classes.items():
            sums = decode(sets.class_tokens[lo:hi], spec)
            assert metrics[f"{name}/acc"][m].item() == (1.0 if name == "class/S0" else 0.0)
            total = 0.0
            for j in range(4):
                right = [carry_into(x, y, j, 10) == 0 for x, y, _ in sums]
                share = sum(right) / len(right)
                loss = -(share * math.log(p) + (1 - share) * math.log(q))
                assert metrics[f"{name}/place_{j}/acc"][m].item() == pytest.approx(share)
                assert metrics[f"{name}/place_{j}/loss"][m].item() == pytest.approx(loss, rel=1e-5)
                total += loss / 4
            assert metrics[f"{name}/loss"][m].item() == pytest.approx(total, rel=1e-5)
