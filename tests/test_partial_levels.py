"""Partial-knowledge atlas levels at the carry-out, against brute-force enumeration, and the nearest
levels reported for a shelf that matches none."""

import math

import numpy as np
import pytest

from addrepro.shelves.atlas import (
    atlas_by_place,
    binary_entropy,
    generate_only_carry_entropy,
    one_operand_carry_entropy,
    shelf_atlas,
)
from addrepro.shelves.detection import nearest_levels


def brute_force(n: int, base: int) -> tuple[float, float]:
    """H(c_n | a_{n-1}) and H(c_n | [a_{n-1} + b_{n-1} >= base]) by counting all base^(2n) pairs."""
    N = base**n
    a, b = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    carry = (a + b >= N).ravel()
    top_a = (a // base ** (n - 1)).ravel()
    generate = ((a // base ** (n - 1)) + (b // base ** (n - 1)) >= base).ravel()

    def cond_entropy(key: np.ndarray) -> float:
        total = 0.0
        for k in np.unique(key):
            sel = carry[key == k]
            total += sel.size / carry.size * binary_entropy(sel.mean())
        return total

    return cond_entropy(top_a), cond_entropy(generate.astype(int))


@pytest.mark.parametrize("n,base", [(1, 2), (2, 2), (4, 2), (1, 10), (2, 10), (3, 10), (2, 3), (3, 5), (2, 7), (2, 16)])
def test_partial_levels_match_brute_force(n, base):
    one, generate = brute_force(n, base)
    assert one_operand_carry_entropy(n, base) == pytest.approx(one, abs=1e-12)
    assert generate_only_carry_entropy(n, base) == pytest.approx(generate, abs=1e-12)
    levels = atlas_by_place(shelf_atlas(n, base))[n]
    assert levels["one_operand"] == pytest.approx(one, abs=1e-12)
    if generate > 0:
        assert levels["generate_only"] == pytest.approx(generate, abs=1e-12)
    else:
        assert "generate_only" not in levels


def test_one_operand_is_0504_in_base_10():
    # n -> inf: (1/10) sum_x H_b((x + 1/2) / 10); already equal to 4 decimals at n = 2
    limit = sum(binary_entropy((x + 0.5) / 10) for x in range(10)) / 10
    assert limit == pytest.approx(0.5038, abs=1e-4)
    assert one_operand_carry_entropy(5, 10) == pytest.approx(limit, abs=1e-5)
    assert one_operand_carry_entropy(60, 10) == pytest.approx(limit, abs=1e-15)
    levels = atlas_by_place(shelf_atlas(5, 10))[5]
    # nested: marginal >= one_operand >= generate_only >= carry_depth_1 (knowing the whole top pair)
    assert levels["marginal"] > levels["one_operand"] > levels["generate_only"] > levels["carry_depth_1"]
    assert levels["generate_only"] == pytest.approx(0.55 * binary_entropy(1 / 11), abs=1e-4)  # p_4 ~ 1/2
    # digitwise has no carry-out to predict: no partial levels
    assert "one_operand" not in atlas_by_place(shelf_atlas(3, 10, task="digitwise"))[3]


def test_nearest_levels_of_an_unmatched_shelf():
    atlas = {"uniform": math.log(10), "marginal": math.log(2), "one_operand": 0.5038, "exact": 0.0}
    found = nearest_levels(0.6, atlas, k=2)
    assert [c["level"] for c in found] == ["marginal", "one_operand"]
    assert found[0]["distance"] == pytest.approx(abs(math.log(0.6 / math.log(2))), abs=1e-12)
    assert found[1]["distance"] == pytest.approx(abs(math.log(0.6 / 0.5038)), abs=1e-12)
    assert found[0]["loss"] == pytest.approx(math.log(2))
    # a zero level is infinitely far from any loss above the zero-match threshold and is left out
    assert all(c["level"] != "exact" for c in nearest_levels(0.6, atlas, k=4))
    assert nearest_levels(0.6, {}, k=3) == []
