"""Tests for addrepro.task.encoding, checked against Python integer arithmetic and brute-force enumeration."""

import itertools

import pytest
import torch

from addrepro.task.encoding import (
    answer_digits,
    carries_in,
    decode,
    encode,
    operands_from_ints,
    sample_operands,
    split_tokens,
)
from addrepro.task.spec import TaskSpec
from addrepro.task.streams import FiniteBatches, InfiniteBatches, distinct_pairs, split_train_heldout, stacked_batch

pytestmark = pytest.mark.usefixtures("one_thread")


BASES = (2, 3, 10, 16, 36)
N_DIGITS = (1, 3, 5)
ORDERS = ("msb", "lsb")
TASKS = ("add", "digitwise")


# -----------------------------------------------------------------------------
# Python references


def digits_of(value: int, base: int, count: int) -> list[int]:
    """Place-indexed digits of a Python int (index j is place j)."""
    out = []
    for _ in range(count):
        value, d = divmod(value, base)
        out.append(d)
    assert value == 0
    return out


def int_of(place_digits: list[int], base: int) -> int:
    return sum(d * base**j for j, d in enumerate(place_digits))


def reference_answer(a: int, b: int, spec: TaskSpec) -> list[int]:
    """Place-indexed answer digits from Python ints."""
    n, base = spec.n_digits, spec.base
    if spec.task == "add":
        return digits_of(a + b, base, n + 1)
    da, db = digits_of(a, base, n), digits_of(b, base, n)
    return [(x + y) % base for x, y in zip(da, db, strict=True)] + [0]


def reference_tokens(a: int, b: int, spec: TaskSpec) -> list[int]:
    """The token sequence of the module docstring, built from Python ints."""
    n, base = spec.n_digits, spec.base
    answer = reference_answer(a, b, spec)
    emitted = answer[::-1] if spec.order == "msb" else answer
    return digits_of(a, base, n)[::-1] + [base] + digits_of(b, base, n)[::-1] + [base + 1] + emitted


def reference_carries(a: int, b: int, spec: TaskSpec) -> list[int]:
    """Carry into each place 0..n computed with Python ints: floor((a mod B^j + b mod B^j) / B^j)."""
    if spec.task == "digitwise":
        return [0] * (spec.n_digits + 1)
    base = spec.base
    return [(a % base**j + b % base**j) // base**j for j in range(spec.n_digits + 1)]


def ints_of(digits: torch.Tensor, base: int) -> list[int]:
    return [int_of(row, base) for row in digits.tolist()]


def operands_with_edges(spec: TaskSpec, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random operands plus the corner cases 0+0, max+max, max+1, 0+max."""
    g = torch.Generator().manual_seed(seed)
    a, b = sample_operands(spec, count, g)
    top = spec.base - 1
    n = spec.n_digits
    edge_a = torch.tensor([[0] * n, [top] * n, [top] * n, [0] * n])
    edge_b = torch.tensor([[0] * n, [top] * n, [1] + [0] * (n - 1), [top] * n])
    return torch.cat([a, edge_a]), torch.cat([b, edge_b])


# -----------------------------------------------------------------------------
# arithmetic and token layout


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n_digits", N_DIGITS)
@pytest.mark.parametrize("base", BASES)
def test_encode_matches_python_ints(base, n_digits, order, task):
    spec = TaskSpec(n_digits=n_digits, base=base, order=order, task=task)
    a, b = operands_with_edges(spec, 48, seed=base * 100 + n_digits)
    tokens = encode(a, b, spec)
    assert tokens.shape == (len(a), spec.seq_len)
    a_int, b_int = ints_of(a, base), ints_of(b, base)
    expected = [reference_tokens(x, y, spec) for x, y in zip(a_int, b_int, strict=True)]
    assert tokens.tolist() == expected

    decoded = decode(tokens, spec)
    for (x, y, c), ai, bi in zip(decoded, a_int, b_int, strict=True):
        assert (x, y) == (ai, bi)
        if task == "add":
            assert c == ai + bi
        else:
            da, db = digits_of(ai, base, n_digits), digits_of(bi, base, n_digits)
            assert c == sum(((p + q) % base) * base**j for j, (p, q) in enumerate(zip(da, db, strict=True)))
            assert c < base**n_digits  # the carry-out digit is 0


@pytest.mark.parametrize("order", ORDERS)
def test_digitwise_carry_out_token_is_zero(order):
    spec = TaskSpec(n_digits=3, base=10, order=order, task="digitwise")
    a = torch.tensor([[9, 9, 9], [5, 5, 5]])
    tokens = encode(a, a, spec)
    carry_pos = spec.answer_start + spec.emission_index[spec.n_digits]
    assert tokens[:, carry_pos].tolist() == [0, 0]
    # 999 + 999 digitwise is 8 8 8 in every place; 555 + 555 is 0 0 0
    answer = tokens[:, spec.answer_start :]
    expected_rows = [[0, 8, 8, 8], [0, 0, 0, 0]]
    if order == "lsb":
        expected_rows = [r[::-1] for r in expected_rows]
    assert answer.tolist() == expected_rows


def test_answer_digits_exhaustive_small_space():
    for order, task in itertools.product(ORDERS, TASKS):
        spec = TaskSpec(n_digits=2, base=3, order=order, task=task)
        values = torch.arange(9)
        av, bv = torch.meshgrid(values, values, indexing="ij")
        a, b = operands_from_ints(av.flatten(), spec), operands_from_ints(bv.flatten(), spec)
        got = answer_digits(a, b, spec).tolist()
        pairs = zip(av.flatten().tolist(), bv.flatten().tolist(), strict=True)
        expected = [reference_answer(x, y, spec) for x, y in pairs]
        assert got == expected


def test_concrete_example_msb_and_lsb():
    a = operands_from_ints(torch.tensor([12345]), TaskSpec())
    b = operands_from_ints(torch.tensor([67890]), TaskSpec())
    msb = encode(a, b, TaskSpec(order="msb"))
    lsb = encode(a, b, TaskSpec(order="lsb"))
    # 12345 + 67890 = 080235
    assert msb.tolist() == [[1, 2, 3, 4, 5, 10, 6, 7, 8, 9, 0, 11, 0, 8, 0, 2, 3, 5]]
    assert lsb.tolist() == [[1, 2, 3, 4, 5, 10, 6, 7, 8, 9, 0, 11, 5, 3, 2, 0, 8, 0]]


@pytest.mark.parametrize("n_digits", N_DIGITS)
@pytest.mark.parametrize("base", BASES)
def test_token_layout(base, n_digits):
    n = n_digits
    for order in ORDERS:
        spec = TaskSpec(n_digits=n, base=base, order=order)
        assert spec.seq_len == 3 * n + 3
        assert spec.n_places == n + 1
        assert spec.d_vocab == base + 2
        assert (spec.plus_token, spec.equals_token) == (base, base + 1)
        assert spec.answer_start == 2 * n + 2
        g = torch.Generator().manual_seed(0)
        tokens = encode(*sample_operands(spec, 16, g), spec)
        assert (tokens[:, n] == base).all()
        assert (tokens[:, 2 * n + 1] == base + 1).all()
        others = torch.ones(spec.seq_len, dtype=torch.bool)
        others[[n, 2 * n + 1]] = False
        assert (tokens[:, others] < base).all()  # every other position is a digit
        if order == "msb":
            assert spec.answer_places == tuple(range(n, -1, -1))
        else:
            assert spec.answer_places == tuple(range(n + 1))
        # emission_index is the inverse permutation of answer_places
        for pos, place in enumerate(spec.answer_places):
            assert spec.emission_index[place] == pos
        assert sorted(spec.emission_index) == list(range(n + 1))
        labels = spec.token_labels()
        assert len(labels) == spec.seq_len
        assert labels[n] == "+" and labels[2 * n + 1] == "="
        assert labels[0] == f"a{n - 1}" and labels[n - 1] == "a0" and labels[2 * n] == "b0"
        assert labels[spec.answer_start :] == [f"c{j}" for j in spec.answer_places]


def test_split_tokens():
    spec = TaskSpec(n_digits=3, base=10)
    tokens = torch.arange(2 * spec.seq_len).view(2, spec.seq_len)
    inputs, targets = split_tokens(tokens, spec)
    assert torch.equal(inputs, tokens[:, :-1])
    assert torch.equal(targets, tokens[:, 8:])
    assert targets.shape == (2, spec.n_places)
    # 3-d (K, B, T) tokens split the same way
    inputs3, targets3 = split_tokens(tokens[None], spec)
    assert torch.equal(inputs3[0], inputs) and torch.equal(targets3[0], targets)


def test_decode_rejects_non_digit_tokens():
    spec = TaskSpec(n_digits=2, base=10)
    tokens = encode(torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), spec)
    tokens[0, 0] = spec.plus_token
    with pytest.raises(ValueError, match="not a digit"):
        decode(tokens, spec)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("base", (2, 10, 36))
def test_carries_in_matches_python(base, task):
    spec = TaskSpec(n_digits=4, base=base, task=task)
    a, b = operands_with_edges(spec, 64, seed=base)
    got = carries_in(a, b, spec).tolist()
    a_int, b_int = ints_of(a, base), ints_of(b, base)
    expected = [reference_carries(x, y, spec) for x, y in zip(a_int, b_int, strict=True)]
    assert got == expected
    # a cascading carry: (B^4 - 1) + 1 carries into every place
    top = operands_from_ints(torch.tensor([base**4 - 1]), spec)
    cascade = carries_in(top, operands_from_ints(torch.tensor([1]), spec), spec)
    expected_cascade = [[0, 1, 1, 1, 1]] if task == "add" else [[0, 0, 0, 0, 0]]
    assert cascade.tolist() == expected_cascade


def test_operands_from_ints():
    spec = TaskSpec(n_digits=4, base=16)
    values = torch.tensor([0, 1, 0xABCD, 0xFFFF, 0x1000])
    assert operands_from_ints(values, spec).tolist() == [digits_of(v, 16, 4) for v in values.tolist()]


# -----------------------------------------------------------------------------
# seeds and streams


def test_same_seed_same_batches_different_seed_different():
    spec = TaskSpec(n_digits=5, base=10)
    s1, s2, s3 = (InfiniteBatches(spec, 32, seed) for seed in (7, 7, 8))
    for _ in range(3):
        b1, b2, b3 = s1.next(), s2.next(), s3.next()
        assert torch.equal(b1, b2)
        assert not torch.equal(b1, b3)
    # successive batches of one stream differ
    assert not torch.equal(s1.next(), s1.next())


def test_stream_independent_of_global_rng_and_other_generators():
    from addrepro.model.transformer import ModelConfig, Transformer

    spec = TaskSpec(n_digits=3, base=10)
    torch.manual_seed(0)
    stream = InfiniteBatches(spec, 16, 5)
    ref_stream = InfiniteBatches(spec, 16, 5)
    reference = [ref_stream.next() for _ in range(3)]

    torch.manual_seed(12345)
    other = InfiniteBatches(spec, 16, 6)  # another stream, drawn from in between
    got = []
    for i in range(3):
        torch.rand(100)  # global RNG consumption
        other.next()
        Transformer(
            ModelConfig(d_vocab=12, d_vocab_out=10, n_ctx=11, d_model=8, n_heads=2, d_head=4, d_mlp=8), seeds=[i]
        )  # model init with its own seed
        got.append(stream.next())
    for r, g in zip(reference, got, strict=True):
        assert torch.equal(r, g)


def test_infinite_batches_resume_exactly():
    spec = TaskSpec(n_digits=4, base=16)
    stream = InfiniteBatches(spec, 20, seed=3)
    for _ in range(2):
        stream.next()
    state = stream.state_dict()
    expected = [stream.next() for _ in range(3)]
    resumed = InfiniteBatches(spec, 20, seed=999)
    resumed.load_state_dict(state)
    for e in expected:
        assert torch.equal(resumed.next(), e)
    # the saved state is a snapshot, not a live view of the generator
    again = InfiniteBatches(spec, 20, seed=0)
    again.load_state_dict(state)
    assert torch.equal(again.next(), expected[0])


@pytest.mark.parametrize("kind", ["infinite", "finite"])
def test_stacked_batch_is_each_stream_next(kind):
    spec = TaskSpec(n_digits=4, base=7)

    def streams():
        if kind == "infinite":
            return [InfiniteBatches(spec, 12, seed) for seed in (3, 4, 3)]
        return [FiniteBatches(split_train_heldout(spec, 50, 10, seed)[0], 12, seed, spec) for seed in (3, 4)]

    together, apart = streams(), streams()
    for _ in range(3):
        stacked = stacked_batch(together)
        assert stacked.shape == (len(apart), 12, spec.seq_len)
        assert torch.equal(stacked, torch.stack([s.next() for s in apart]))
    assert not torch.equal(stacked[0], stacked[1])
    assert all(x + y == z for k in range(len(apart)) for x, y, z in decode(stacked[k], spec))


def chi_square(counts: torch.Tensor) -> float:
    """Pearson statistic against the uniform distribution over the cells of ``counts``."""
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_bound(cells: int) -> float:
    """mean + 6 standard deviations of chi2(df = cells - 1): a uniform generator fails with p << 1e-6."""
    df = cells - 1
    return df + 6 * (2 * df) ** 0.5


def per_place_digit_statistics(a: torch.Tensor, b: torch.Tensor, base: int) -> list[float]:
    stats = []
    for operand in (a, b):
        for j in range(operand.shape[1]):
            stats.append(chi_square(torch.bincount(operand[:, j], minlength=base)))
    return stats


@pytest.mark.parametrize("base", (3, 10))
def test_operand_digits_are_uniform(base):
    spec = TaskSpec(n_digits=3, base=base)
    g = torch.Generator().manual_seed(2024)
    a, b = sample_operands(spec, 20000, g)
    assert a.min() >= 0 and a.max() == base - 1 and b.min() >= 0 and b.max() == base - 1
    bound = chi_square_bound(base)
    assert max(per_place_digit_statistics(a, b, base)) < bound
    # joint uniformity of the two operands' units digits (independence of a and b)
    joint = torch.bincount(a[:, 0] * base + b[:, 0], minlength=base * base)
    assert chi_square(joint) < chi_square_bound(base * base)

    # the statistic has power: a modulo-biased generator (digit 0 gets 5/(4 base + 1)) fails it
    biased_a = torch.randint(0, 4 * base + 1, (20000, 3), generator=g) % base
    biased = per_place_digit_statistics(biased_a, b, base)
    assert max(biased[:3]) > bound


def test_whole_operands_uniform_small_space():
    spec = TaskSpec(n_digits=2, base=3)
    g = torch.Generator().manual_seed(11)
    a, b = sample_operands(spec, 40000, g)
    pair_code = torch.tensor(ints_of(a, 3)) * 9 + torch.tensor(ints_of(b, 3))
    counts = torch.bincount(pair_code, minlength=81)
    assert counts.numel() == 81 and (counts > 0).all()
    assert chi_square(counts) < chi_square_bound(81)
    # a generator that never produces the top operand value (a classic off-by-one) fails the test
    clipped = torch.bincount(torch.randint(0, 80, (40000,), generator=g), minlength=81)
    assert chi_square(clipped) > chi_square_bound(81)


# -----------------------------------------------------------------------------
# finite data


def pair_codes(a: torch.Tensor, b: torch.Tensor, spec: TaskSpec) -> list[int]:
    """a * base^n + b for each pair, with Python ints."""
    side = spec.base**spec.n_digits
    powers = [spec.base**j for j in range(spec.n_digits)]

    def value(row: list[int]) -> int:
        return sum(d * p for d, p in zip(row, powers, strict=True))

    return [value(x) * side + value(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]


def test_distinct_pairs_enumerates_all_when_count_is_everything():
    spec = TaskSpec(n_digits=3, base=2)
    a, b = distinct_pairs(spec, 64, seed=0)
    assert sorted(pair_codes(a, b, spec)) == list(range(64))
    with pytest.raises(ValueError, match="distinct pairs"):
        distinct_pairs(spec, 65, seed=0)


@pytest.mark.parametrize(
    "spec,count",
    [
        (TaskSpec(n_digits=3, base=10), 3000),  # randperm path (10^6 pairs)
        (TaskSpec(n_digits=5, base=10), 3000),  # rejection path (10^10 pairs)
        (TaskSpec(n_digits=5, base=36), 500),  # rejection path, base 36 (36^10 < 2^62)
    ],
)
def test_distinct_pairs_distinct_reproducible_seeded(spec, count):
    a, b = distinct_pairs(spec, count, seed=1)
    assert a.shape == b.shape == (count, spec.n_digits)
    assert (a >= 0).all() and (a < spec.base).all() and (b >= 0).all() and (b < spec.base).all()
    codes = pair_codes(a, b, spec)
    assert len(set(codes)) == count
    a2, b2 = distinct_pairs(spec, count, seed=1)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a3, _ = distinct_pairs(spec, count, seed=2)
    assert not torch.equal(a, a3)


def test_distinct_pairs_rejection_path_keeps_first_distinct_draws():
    # 2^26 pairs > 2^24 and > 4 * count: the rejection path. 2 * count draws from 2^26 collide a few times.
    spec = TaskSpec(n_digits=13, base=2)
    n_pairs, count, seed = 2**26, 20000, 4
    a, b = distinct_pairs(spec, count, seed=seed)
    codes = pair_codes(a, b, spec)
    assert len(set(codes)) == count
    # the documented rule: the first `count` distinct codes of the seeded draw, in draw order
    g = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, n_pairs, (2 * count,), generator=g, dtype=torch.int64).tolist()
    assert len(set(draw)) < len(draw)  # collisions did happen, so the dedup is exercised
    first_distinct = list(dict.fromkeys(draw))[:count]
    assert codes == first_distinct


def test_distinct_pairs_too_large_space():
    spec = TaskSpec(n_digits=10, base=10)  # 10^20 pairs: operands fit in int64, their pairs do not
    with pytest.raises(ValueError, match="2\\^62"):
        distinct_pairs(spec, 10, seed=0)


def test_split_train_heldout_disjoint_and_reproducible():
    spec = TaskSpec(n_digits=3, base=10)
    train, held = split_train_heldout(spec, 500, 200, seed=9)
    assert train.shape == (500, spec.seq_len) and held.shape == (200, spec.seq_len)
    train_keys = {tuple(r) for r in train[:, : spec.answer_start].tolist()}
    held_keys = {tuple(r) for r in held[:, : spec.answer_start].tolist()}
    assert len(train_keys) == 500 and len(held_keys) == 200
    assert not train_keys & held_keys
    for a, b, c in decode(torch.cat([train, held]), spec):
        assert c == a + b
    train2, held2 = split_train_heldout(spec, 500, 200, seed=9)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    train3, _ = split_train_heldout(spec, 500, 200, seed=10)
    assert not torch.equal(train, train3)


def test_finite_batches():
    spec = TaskSpec(n_digits=2, base=10)
    train, _ = split_train_heldout(spec, 50, 10, seed=0)
    full = FiniteBatches(train, None, seed=0, spec=spec)
    assert full.full_batch
    assert torch.equal(full.next(), train) and torch.equal(full.next(), train)
    assert FiniteBatches(train, 50, seed=0, spec=spec).full_batch
    assert FiniteBatches(train, 80, seed=0, spec=spec).full_batch

    rows = {tuple(r) for r in train.tolist()}
    s1, s2, s3 = (FiniteBatches(train, 8, seed=s, spec=spec) for s in (1, 1, 2))
    assert not s1.full_batch
    seen = []
    for _ in range(4):
        x1, x2, x3 = s1.next(), s2.next(), s3.next()
        assert x1.shape == (8, spec.seq_len)
        assert {tuple(r) for r in x1.tolist()} <= rows
        assert torch.equal(x1, x2)
        seen.append(torch.equal(x1, x3))
    assert not all(seen)
    # resume
    state = s1.state_dict()
    expected = s1.next()
    s4 = FiniteBatches(train, 8, seed=77, spec=spec)
    s4.load_state_dict(state)
    assert torch.equal(s4.next(), expected)
