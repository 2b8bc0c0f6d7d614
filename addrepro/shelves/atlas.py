"""
The shelf atlas: for every answer place and every "knowledge level", the Bayes-optimal
cross-entropy (nats) of a predictor that knows exactly that much and nothing else.

Training curves of addition transformers sit on plateaus ("shelves") whose heights are
these numbers, so the atlas is the lookup table for naming a shelf.

Setup. a, b are independent and uniform on [0, B^n). The answer has n+1 digits
s_n .. s_0, place j having value B^j (place n is the carry-out). task="add" writes the
digits of S = a + b; task="digitwise" writes s_j = (a_j + b_j) mod B and s_n = 0.
The model predicts over the B digits, so knowing nothing costs log B.

Notation used throughout: N_m = B^m, and p_m = P(carry into place m)
= P((a mod N_m) + (b mod N_m) >= N_m) = (N_m - 1) / (2 N_m), with p_0 = 0.

Levels, in canonical order (entries are sorted by place, then in this order):
  uniform        log B.
  marginal       H(s_j).
  answer_prefix  H(s_j | answer digits emitted before s_j); depends on `order`.
  naive_sum      H(s_j | a_j, b_j); places j < n only (the carry-out has no operand pair).
  one_operand    carry-out only: H(c_n | a_{n-1}), a predictor that knows one digit of the top
                 pair. Given a_{n-1} = x, a is uniform on the block [x M, (x+1) M) (M = B^(n-1))
                 and P(c_n = 1 | a) = a / N, so P(c_n = 1 | x) = (x + 1/2 - 1/(2M)) / B and the
                 loss is (1/B) sum_x H_b((x + 1/2 - 1/(2M)) / B) -- 0.5038 in base 10 for n >= 2.
  generate_only  carry-out only: H(c_n | [a_{n-1} + b_{n-1} >= B]). The pair generates a carry
                 with probability (B-1)/(2B); otherwise (prob (B+1)/(2B)) it propagates one only
                 when it sums to B-1 (prob 2/(B+1) given no generate) and a carry comes from
                 below (p_{n-1}): loss (B+1)/(2B) * H_b(2 p_{n-1} / (B+1)).
  carry_depth_d  H(s_j | pairs j, j-1, .., j-d); at the carry-out the pairs n-1 .. n-d.
                 The prediction is unsure only if all d lower pairs sum to B-1 (prob B^-d),
                 and then the carry c_{j-d} ~ Bern(p_{j-d}) decides: B^-d * H_b(p_{j-d}).
  exact          0.

Level-listing choice: uniform, marginal, answer_prefix, (naive_sum for j < n) and exact are
listed at every place, even when some of them are 0, so consumers can always index them.
one_operand and generate_only ("partial knowledge") are listed at the carry-out of task="add"
when strictly positive (generate_only is 0 for n = 1).
carry_depth_d is listed only where it is strictly between naive_sum and exact, i.e.
d = 1 .. j-1 at place j (including j = n, the carry-out), and only for task="add"; depth j
would already be 0 and is represented by `exact`. For digitwise there are no carries, so no
carry_depth levels are listed.

Numerics. Everything is closed form except the msb answer_prefix, which needs the entropy of
a digit of a triangular variable given the digits above it. That is summed exactly over the
parent blocks when there are at most `exact_limit` (parent, digit) cells, and estimated by
Monte Carlo over the parent (with the within-block entropy still computed exactly, which
keeps the variance tiny) otherwise; only then is `stderr` set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from addrepro.task.spec import ORDERS, TASKS

LEVEL_ORDER_HEAD = ("uniform", "marginal", "answer_prefix", "naive_sum", "one_operand", "generate_only")

# log of Glaisher-Kinkelin constant A; appears in sum_k k log k (the log hyperfactorial)
_LOG_GLAISHER = 0.24875447703378426254
# below this many terms the lsb carry-out sum is just enumerated (cheap, and the
# asymptotic hyperfactorial expansion is only near machine precision for large N)
_LSB_ENUM_LIMIT = 1 << 20
_CHUNK = 1 << 20  # elements per vectorised chunk, keeps memory flat for big supports


@dataclass(frozen=True)
class AtlasEntry:
    place: int
    level: str
    loss: float  # nats
    stderr: float | None = None  # set only when Monte Carlo was used

    def as_dict(self) -> dict:
        d = {"place": self.place, "level": self.level, "loss": self.loss}
        if self.stderr is not None:
            d["stderr"] = self.stderr
        return d


# -----------------------------------------------------------------------------
# small closed forms


def binary_entropy(p: float) -> float:
    """H_b(p) in nats; 0 at p in {0, 1}."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log(p) - (1.0 - p) * math.log1p(-p)


def carry_prob(m: int, base: int) -> float:
    """p_m = P(carry into place m) = (N-1)/(2N) with N = base^m; p_0 = 0."""
    if m <= 0:
        return 0.0
    # written as 1/2 - 1/(2N) so that huge N stays accurate (N itself may overflow a float)
    return 0.5 - 0.5 * float(base) ** (-m)


def _xlogx(x: np.ndarray) -> np.ndarray:
    # 0 log 0 = 0: the last block of S (value 2N-1) has zero mass
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


# -----------------------------------------------------------------------------
# lsb answer_prefix at the carry-out: H(c_n | S mod N) = (1/N) sum_{k<N} H_b(k/N)


def _lsb_carry_entropy(n_values: int, closed_form: bool | None = None) -> float:
    """(1/N) sum_{k=0}^{N-1} H_b(k/N), N = n_values.

    Given S mod N = r, exactly r+1 pairs give S = r and N-1-r give S = r+N, so the carry
    is Bern((N-1-r)/N) and r is uniform. Using the symmetry H_b(k/N) = H_b((N-k)/N) the sum
    is -(2/N^2) sum_{k=1}^{N-1} k log(k/N), and the log-hyperfactorial expansion
    sum_{k<=N} k log k = (N^2/2 + N/2 + 1/12) log N - N^2/4 + log A + 1/(720 N^2) - ...
    gives the cancellation-free closed form below (error O(N^-6)).
    """
    N = n_values
    if closed_form is None:
        closed_form = N > _LSB_ENUM_LIMIT
    if closed_form:
        Nf = float(N)
        return 0.5 - (2.0 / Nf**2) * (math.log(Nf) / 12.0 + _LOG_GLAISHER + 1.0 / (720.0 * Nf**2))
    total = 0.0
    for lo in range(1, N, _CHUNK):
        x = np.arange(lo, min(N, lo + _CHUNK), dtype=np.float64) / N
        total += float(_xlogx(x).sum())
    return -2.0 * total / N


# -----------------------------------------------------------------------------
# msb answer_prefix: H(floor(S/M) mod B | floor(S/(M B))) with S = a + b triangular


def _block_weight(q: np.ndarray, D: float, M: float) -> np.ndarray:
    """P(floor(S/M) = q) * D^2 for M = B^j, D = B^(n-j) (so N = D M).

    S has pair-count w(s) = min(s+1, 2N-1-s). Since N is a multiple of M no block straddles
    the peak, and summing the arithmetic series over a block gives, after dividing by M^2,
    q + 1/2 + 1/(2M) on the rising side (q < D) and 2D - q - 1/2 - 1/(2M) on the falling side.
    Working per block keeps every number O(D) instead of O(N^2): no cancellation, no overflow.
    """
    e = 0.5 + 0.5 / M
    return np.where(q < D, q + e, 2.0 * D - q - e)


def _child_entropy(parents: np.ndarray, base: int, D: float, M: float) -> tuple[np.ndarray, np.ndarray]:
    """For parent blocks p (of size M*base) return (unnormalised parent weight, H(digit | p))."""
    r = np.arange(base, dtype=np.float64)
    w = _block_weight(parents[:, None] * base + r[None, :], D, M)
    W = w.sum(axis=1)
    # normalise within the parent rather than using the parent closed form: exact by construction
    P = w / W[:, None]
    H = -_xlogx(P).sum(axis=1)
    return W, H


def _msb_prefix_entropy(
    j: int, n: int, base: int, mc_samples: int, seed: int, exact_limit: int
) -> tuple[float, float | None]:
    """H(s_j | s_n .. s_{j+1}) for task="add", j < n. Returns (loss, stderr or None)."""
    M = float(base) ** j
    D = float(base) ** (n - j)
    n_parents = 2 * base ** (n - j - 1)  # floor(S / B^(j+1)) ranges over [0, 2 B^(n-j-1))
    if n_parents * base <= exact_limit:
        total = 0.0
        for lo in range(0, n_parents, max(1, _CHUNK // base)):
            p = np.arange(lo, min(n_parents, lo + max(1, _CHUNK // base)), dtype=np.float64)
            W, H = _child_entropy(p, base, D, M)
            total += float((W * H).sum())
        return total / D**2, None

    # Monte Carlo over the parent only. floor(S/B^(j+1)) = a_hi + b_hi + carry_{j+1}, with the
    # high parts uniform on [0, B^(n-j-1)) and the carry independent of them.
    D_parent = base ** (n - j - 1)
    if 2 * D_parent >= 2**63:
        raise ValueError(f"n_digits={n}, base={base} too large for Monte Carlo at place {j}")
    rng = np.random.default_rng([seed, j])
    pc = carry_prob(j + 1, base)
    s1 = s2 = 0.0
    done = 0
    batch = max(1, _CHUNK // base)
    while done < mc_samples:
        k = min(batch, mc_samples - done)
        par = rng.integers(0, D_parent, size=k) + rng.integers(0, D_parent, size=k)
        par = par + (rng.random(k) < pc)
        _, H = _child_entropy(par.astype(np.float64), base, D, M)
        s1 += float(H.sum())
        s2 += float((H * H).sum())
        done += k
    mean = s1 / mc_samples
    var = max(s2 / mc_samples - mean * mean, 0.0) * mc_samples / max(mc_samples - 1, 1)
    return mean, math.sqrt(var / mc_samples)


# -----------------------------------------------------------------------------
# partial knowledge of the top pair, at the carry-out


def one_operand_carry_entropy(n: int, base: int) -> float:
    """H(c_n | a_{n-1}): the carry-out known from one digit of the top pair (see the module doc)."""
    inv_m = float(base) ** (-(n - 1))  # 1/M, M = B^(n-1); computed as a power so huge n stays finite
    return sum(binary_entropy((x + 0.5 - 0.5 * inv_m) / base) for x in range(base)) / base


def generate_only_carry_entropy(n: int, base: int) -> float:
    """H(c_n | [a_{n-1} + b_{n-1} >= B]): the carry-out known from the top pair's generate bit only."""
    return (base + 1) / (2 * base) * binary_entropy(2 * carry_prob(n - 1, base) / (base + 1))


# -----------------------------------------------------------------------------
# the atlas


def shelf_atlas(
    n_digits: int,
    base: int = 10,
    order: str = "msb",
    task: str = "add",
    mc_samples: int = 1_000_000,
    seed: int = 0,
    exact_limit: int = 20_000_000,
) -> list[AtlasEntry]:
    """Entries sorted by place (0..n) then by level order (uniform, marginal, answer_prefix,
    naive_sum, one_operand, generate_only, carry_depth_1.., exact), which is also non-increasing loss
    along each nested chain.

    exact_limit: max number of (parent, digit) cells summed exactly for the msb answer_prefix;
    above it Monte Carlo with `mc_samples` draws is used (exact_limit=0 forces MC).
    """
    if n_digits < 1:
        raise ValueError("n_digits must be >= 1")
    if not 2 <= base <= 36:
        raise ValueError("base must be in 2..36")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}")
    if mc_samples < 2:
        raise ValueError("mc_samples must be >= 2")

    n, B = n_digits, base
    logB = math.log(B)
    add = task == "add"
    out: list[AtlasEntry] = []
    for j in range(n + 1):
        carry_out = j == n

        def E(level: str, loss: float, se: float | None = None, j: int = j) -> None:
            out.append(AtlasEntry(j, level, float(loss), se))

        E("uniform", logB)

        # marginal: s_j = (a_j + b_j + c_j) mod B is uniform because a_j is uniform and
        # independent of (b_j, c_j); the carry-out is Bern(p_n); digitwise s_n is constant 0
        if carry_out:
            marginal = binary_entropy(carry_prob(n, B)) if add else 0.0
        else:
            marginal = logB
        E("marginal", marginal)

        # answer_prefix
        if not add:
            # digitwise places are independent of each other, so the prefix tells nothing
            E("answer_prefix", marginal)
        elif order == "msb":
            if carry_out:
                E("answer_prefix", marginal)  # nothing emitted before the carry-out
            else:
                loss, se = _msb_prefix_entropy(j, n, B, mc_samples, seed, exact_limit)
                E("answer_prefix", loss, se)
        else:  # lsb
            if carry_out:
                E("answer_prefix", _lsb_carry_entropy(B**n))
            else:
                # lower sum digits are functions of lower operand digits; a_j is independent of
                # them and of b_j, so s_j stays uniform
                E("answer_prefix", logB)

        if not carry_out:
            E("naive_sum", binary_entropy(carry_prob(j, B)) if add else 0.0)

        if add and carry_out:
            E("one_operand", one_operand_carry_entropy(n, B))
            generate = generate_only_carry_entropy(n, B)
            if generate > 0:
                E("generate_only", generate)

        if add:
            for d in range(1, j):  # depth j (and deeper) is 0: that is `exact`
                E(f"carry_depth_{d}", float(B) ** (-d) * binary_entropy(carry_prob(j - d, B)))

        E("exact", 0.0)
    return out


def level_sort_key(level: str) -> tuple[int, int]:
    """Canonical level order: uniform, marginal, answer_prefix, naive_sum, one_operand, generate_only,
    carry_depth_d.., exact."""
    if level in LEVEL_ORDER_HEAD:
        return (LEVEL_ORDER_HEAD.index(level), 0)
    if level.startswith("carry_depth_"):
        return (len(LEVEL_ORDER_HEAD), int(level.removeprefix("carry_depth_")))
    if level == "exact":
        return (len(LEVEL_ORDER_HEAD) + 1, 0)
    return (len(LEVEL_ORDER_HEAD) + 2, 0)


def atlas_by_place(entries: list[AtlasEntry]) -> dict[int, dict[str, float]]:
    """{place: {level: loss}}."""
    out: dict[int, dict[str, float]] = {}
    for e in entries:
        out.setdefault(e.place, {})[e.level] = e.loss
    return out


def format_atlas_table(entries: list[AtlasEntry], digits: int = 4) -> str:
    """Text table: rows = levels, columns = places 0..n (the last one labelled "carry").

    Monte Carlo cells get a "~" suffix (stderr is in the entries); "-" = level not listed.
    Losses below 10^-digits are printed in scientific notation.
    """
    if not entries:
        return ""
    places = sorted({e.place for e in entries})
    n = places[-1]
    levels = sorted({e.level for e in entries}, key=level_sort_key)

    def num(x: float) -> str:
        # tiny deep-carry losses would all print as 0.0000; switch to scientific for them
        return f"{x:.{digits}f}" if x == 0 or x >= 10.0**-digits else f"{x:.1e}"

    cell = {(e.level, e.place): num(e.loss) + ("~" if e.stderr is not None else "") for e in entries}
    header = ["level"] + ["carry" if p == n else str(p) for p in places]
    rows = [[lv] + [cell.get((lv, p), "-") for p in places] for lv in levels]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_atlas_table(shelf_atlas(5, 10, "msb", "add")))
