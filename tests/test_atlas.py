"""Tests for addrepro.shelves.atlas: hand-derived values and brute-force enumeration over all (a, b)."""

import math

import numpy as np
import pytest

from addrepro.shelves.atlas import (
    AtlasEntry,
    _lsb_carry_entropy,
    atlas_by_place,
    binary_entropy,
    format_atlas_table,
    shelf_atlas,
)

# -----------------------------------------------------------------------------
# brute force: enumerate every pair, compute every level's conditional entropy from counts


def _cond_entropy(key: np.ndarray, y: np.ndarray, base: int) -> float:
    """Empirical H(Y | X) in nats from equally likely samples, X given as an integer key."""
    # keys here are < N^2 <= 1e6, so a dense bincount beats np.unique
    kid = key if key.max() < 4_000_000 else np.unique(key, return_inverse=True)[1]
    joint = np.bincount(kid * base + y, minlength=(kid.max() + 1) * base).reshape(-1, base).astype(float)
    px = joint.sum(axis=1, keepdims=True)
    total = joint.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(joint > 0, joint * np.log(joint / px), 0.0)
    return float(-t.sum() / total)


def _encode(cols: list[np.ndarray], base: int, size: int) -> np.ndarray:
    key = np.zeros(size, dtype=np.int64)
    for c in cols:
        key = key * base + c
    return key


def brute_force_atlas(n: int, base: int, order: str, task: str) -> dict[int, dict[str, float]]:
    N = base**n
    a, b = (x.ravel() for x in np.meshgrid(np.arange(N), np.arange(N), indexing="ij"))
    size = a.size
    ad = [(a // base**i) % base for i in range(n)]
    bd = [(b // base**i) % base for i in range(n)]
    if task == "add":
        S = a + b
        s = [(S // base**i) % base for i in range(n + 1)]
    else:
        s = [(ad[i] + bd[i]) % base for i in range(n)] + [np.zeros(size, dtype=np.int64)]
    const = np.zeros(size, dtype=np.int64)
    out: dict[int, dict[str, float]] = {}
    for j in range(n + 1):
        y = s[j]
        lv = {"uniform": math.log(base), "marginal": _cond_entropy(const, y, base)}
        before = list(range(n, j, -1)) if order == "msb" else list(range(j))
        lv["answer_prefix"] = _cond_entropy(_encode([s[i] for i in before], base, size), y, base)
        if j < n:
            lv["naive_sum"] = _cond_entropy(_encode([ad[j], bd[j]], base, size), y, base)
        # depth d: pairs j..j-d for j < n; pairs n-1..n-d at the carry-out
        top = j if j < n else n - 1
        for d in range(1, n + 1):
            places = [i for i in range(top, j - d - 1, -1) if i >= 0]
            cols = [c for i in places for c in (ad[i], bd[i])]
            lv[f"carry_depth_{d}"] = _cond_entropy(_encode(cols, base, size), y, base)
        if task == "add" and j == n:  # partial knowledge of the top pair
            lv["one_operand"] = _cond_entropy(ad[n - 1], y, base)
            lv["generate_only"] = _cond_entropy((ad[n - 1] + bd[n - 1] >= base).astype(np.int64), y, base)
        lv["exact"] = _cond_entropy(a * N + b, y, base)
        out[j] = lv
    return out


CASES = [
    (n, B, order, task)
    for n, B in [(1, 2), (2, 2), (3, 2), (2, 3), (3, 3), (2, 10), (3, 10)]
    for order in ("msb", "lsb")
    for task in ("add", "digitwise")
]


@pytest.mark.parametrize("n,base,order,task", CASES)
def test_matches_brute_force(n, base, order, task):
    got = atlas_by_place(shelf_atlas(n, base, order, task))
    ref = brute_force_atlas(n, base, order, task)
    assert sorted(got) == list(range(n + 1))
    for j, levels in got.items():
        for level, loss in levels.items():
            assert loss == pytest.approx(ref[j][level], abs=1e-9), (j, level)
        # levels not listed must be those equal to exact (0) in the brute force
        for level, loss in ref[j].items():
            if level not in levels:
                assert level.startswith(("carry_depth_", "generate_only")) and abs(loss) < 1e-12, (j, level, loss)
                assert level != "naive_sum"


# -----------------------------------------------------------------------------
# hand-derived values


def test_binary_entropy():
    assert binary_entropy(0.0) == 0.0
    assert binary_entropy(1.0) == 0.0
    assert binary_entropy(0.5) == pytest.approx(math.log(2), abs=1e-15)
    assert binary_entropy(0.45) == pytest.approx(-0.45 * math.log(0.45) - 0.55 * math.log(0.55), abs=1e-15)


def test_hand_values_5_digit_base10():
    at = atlas_by_place(shelf_atlas(5, 10))
    for j in range(6):
        assert at[j]["uniform"] == pytest.approx(math.log(10), abs=1e-15)
        assert at[j]["exact"] == 0.0
    assert at[0]["naive_sum"] == 0.0
    assert at[1]["naive_sum"] == pytest.approx(binary_entropy(0.45), abs=1e-15)
    assert at[1]["naive_sum"] == pytest.approx(0.6881, abs=1e-4)
    p4 = (10**4 - 1) / (2 * 10**4)
    assert at[5]["carry_depth_1"] == pytest.approx(0.1 * binary_entropy(p4), abs=1e-15)
    assert at[5]["marginal"] == pytest.approx(binary_entropy((10**5 - 1) / (2 * 10**5)), abs=1e-15)
    assert at[4]["carry_depth_3"] == pytest.approx(1e-3 * binary_entropy(0.45), abs=1e-15)
    # deepest listed depths
    assert "carry_depth_4" in at[5] and "carry_depth_5" not in at[5]
    assert "carry_depth_3" in at[4] and "carry_depth_4" not in at[4]
    assert not any(k.startswith("carry_depth") for k in at[1])


def test_msb_shelf_of_ten_thousands_digit():
    """The ~2.1 nat shelf: H(10^4 digit | carry digit) for 5-digit base-10 addition.

    Independent check: the pair-count of S is w(s) = min(s+1, 2N-1-s); group it by
    floor(S/10^4) and floor(S/10^5) and take the entropy difference.
    """
    N = 10**5
    s = np.arange(2 * N - 1, dtype=np.int64)
    w = np.minimum(s + 1, 2 * N - 1 - s).astype(float) / N**2
    assert w.sum() == pytest.approx(1.0, abs=1e-12)

    def H(q):
        p = np.bincount(q, weights=w)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    ref = H(s // 10**4) - H(s // 10**5)
    got = atlas_by_place(shelf_atlas(5, 10, "msb"))[4]["answer_prefix"]
    assert got == pytest.approx(ref, abs=1e-9)
    assert 2.05 < got < 2.15
    assert got == pytest.approx(2.1133, abs=1e-4)


def test_lsb_carry_out():
    for n, B in [(1, 10), (2, 10), (3, 7), (5, 10)]:
        N = B**n
        ref = float(np.mean([binary_entropy(k / N) for k in range(N)]))
        got = atlas_by_place(shelf_atlas(n, B, "lsb"))[n]["answer_prefix"]
        assert got == pytest.approx(ref, abs=1e-9)
    # closed form (hyperfactorial expansion) vs enumeration, and the N -> inf limit of 1/2
    for N in [50, 1000, 10**5, 3**13]:
        assert _lsb_carry_entropy(N, closed_form=True) == pytest.approx(
            _lsb_carry_entropy(N, closed_form=False), abs=1e-11
        )
    assert atlas_by_place(shelf_atlas(20, 10, "lsb"))[20]["answer_prefix"] == pytest.approx(0.5, abs=1e-15)


def test_monotone_along_nested_levels():
    for n, B, order, task in [
        (5, 10, "msb", "add"),
        (5, 10, "lsb", "add"),
        (4, 3, "msb", "add"),
        (3, 10, "msb", "digitwise"),
        (6, 2, "lsb", "add"),
    ]:
        at = atlas_by_place(shelf_atlas(n, B, order, task))
        for j, lv in at.items():
            eps = 1e-12
            assert lv["uniform"] >= lv["marginal"] - eps
            assert lv["marginal"] >= lv["answer_prefix"] - eps
            assert lv["answer_prefix"] >= lv["exact"] - eps
            chain = ["naive_sum"] if j < n else []
            depths = [k for k in lv if k.startswith("carry_depth_")]
            chain += sorted(depths, key=lambda k: int(k.split("_")[-1]))
            chain = ["marginal"] + chain + ["exact"]
            vals = [lv[k] for k in chain]
            assert all(x >= y - eps for x, y in zip(vals, vals[1:], strict=False)), (j, chain, vals)
            # listed carry depths are strictly positive (zeros are folded into `exact`)
            assert all(lv[k] > 0 for k in chain if k.startswith("carry_depth_"))


def test_sorted_and_exact_path_has_no_stderr():
    entries = shelf_atlas(5, 10)
    places = [e.place for e in entries]
    assert places == sorted(places)
    assert entries[0].level == "uniform" and entries[-1].level == "exact"
    assert all(e.stderr is None for e in entries)
    d = entries[0].as_dict()
    assert set(d) == {"place", "level", "loss"}


def test_monte_carlo_agrees_with_exact():
    exact = {(e.place, e.level): e for e in shelf_atlas(4, 10, "msb")}
    mc = shelf_atlas(4, 10, "msb", mc_samples=200_000, seed=1, exact_limit=0)
    n_mc = 0
    for e in mc:
        ref = exact[(e.place, e.level)]
        if e.stderr is None:
            assert e.loss == ref.loss
            continue
        n_mc += 1
        assert e.level == "answer_prefix"
        assert e.stderr > 0
        assert abs(e.loss - ref.loss) <= 4 * e.stderr + 1e-12, (e, ref)
        assert "stderr" in e.as_dict()
    assert n_mc == 4  # places 0..3
    # deterministic given the seed
    again = shelf_atlas(4, 10, "msb", mc_samples=200_000, seed=1, exact_limit=0)
    assert [e.loss for e in again] == [e.loss for e in mc]


def test_large_cases_are_sane():
    # Their speed is measured by benchmarks/bench_shelves.py, not here.
    at = atlas_by_place(shelf_atlas(10, 10))
    at36 = atlas_by_place(shelf_atlas(5, 36))
    # the top digit's shelf barely depends on n (the triangle's shape at that scale is the same)
    ref = atlas_by_place(shelf_atlas(5, 10))[4]["answer_prefix"]
    assert at[9]["answer_prefix"] == pytest.approx(ref, abs=1e-6)
    assert at[0]["answer_prefix"] == pytest.approx(math.log(10), abs=1e-6)
    assert at36[0]["answer_prefix"] == pytest.approx(math.log(36), abs=1e-6)


def test_format_table_and_validation():
    txt = format_atlas_table(shelf_atlas(3, 10))
    lines = txt.splitlines()
    assert lines[0].split() == ["level", "0", "1", "2", "carry"]
    assert lines[2].startswith("uniform")
    assert "2.3026" in txt
    assert format_atlas_table([]) == ""
    assert isinstance(shelf_atlas(1, 2)[0], AtlasEntry)
    for bad in [
        dict(n_digits=0),
        dict(n_digits=2, base=1),
        dict(n_digits=2, base=37),
        dict(n_digits=2, order="mid"),
        dict(n_digits=2, task="mul"),
    ]:
        with pytest.raises(ValueError):
            shelf_atlas(**bad)
