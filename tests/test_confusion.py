"""Tests for addrepro.metrics.confusion with hand-built logits whose probabilities are known."""

import math
import random

import pytest
import torch

from addrepro.metrics.confusion import confusion_matrices
from addrepro.metrics.place import stats_from_logits
from addrepro.task.encoding import encode, operands_from_ints, split_tokens
from addrepro.task.spec import TaskSpec


def place_of_position(pos: int, spec: TaskSpec) -> int:
    return spec.n_digits - pos if spec.order == "msb" else pos


def emission_logits(place_probs: list, spec: TaskSpec) -> torch.Tensor:
    """Emission-order logits ``(K, B, n+1, base)`` from nested lists of place-indexed probabilities [k][i][j][v]."""
    k, b = len(place_probs), len(place_probs[0])
    out = torch.empty(k, b, spec.n_places, spec.base)
    for m in range(k):
        for i in range(b):
            for pos in range(spec.n_places):
                out[m, i, pos] = torch.tensor(place_probs[m][i][place_of_position(pos, spec)])
    return out.log()


def test_tiny_closed_form():
    # n = 1, base 3, msb: answers c1 c0; sums 1+1 = 2 -> (0, 2); 2+2 = 4 -> (1, 1); 0+2 = 2 -> (0, 2)
    spec = TaskSpec(n_digits=1, base=3, order="msb")
    tokens = encode(torch.tensor([[1], [2], [0]]), torch.tensor([[1], [2], [2]]), spec)
    _, targets = split_tokens(tokens, spec)
    assert targets.tolist() == [[0, 2], [1, 1], [0, 2]]  # emission order: carry-out first
    probs = [
        [  # [example][place][digit]
            [[0.1, 0.2, 0.7], [0.5, 0.5, 1e-12]],
            [[0.2, 0.6, 0.2], [0.1, 0.8, 0.1]],
            [[0.3, 0.4, 0.3], [0.9, 0.05, 0.05]],
        ]
    ]
    stats = stats_from_logits(emission_logits(probs, spec), targets[None], spec)
    conf = confusion_matrices(stats)
    assert conf.shape == (1, 2, 3, 3)
    nan = math.nan
    want_place0 = [[nan] * 3, [0.2, 0.6, 0.2], [0.2, 0.3, 0.5]]  # digit 2 twice: mean of rows 0 and 2
    want_place1 = [[0.7, 0.275, 0.025], [0.1, 0.8, 0.1], [nan] * 3]  # carry 0 twice, 1 once, 2 never
    torch.testing.assert_close(conf[0, 0], torch.tensor(want_place0), equal_nan=True)
    torch.testing.assert_close(conf[0, 1], torch.tensor(want_place1), equal_nan=True, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_matches_loops_over_examples(order):
    spec = TaskSpec(n_digits=2, base=5, order=order)
    rng = random.Random(3)
    count, members = 30, 2
    xs = [rng.randrange(25) for _ in range(count)]
    ys = [rng.randrange(25) for _ in range(count)]
    tokens = encode(operands_from_ints(torch.tensor(xs), spec), operands_from_ints(torch.tensor(ys), spec), spec)
    _, targets = split_tokens(tokens, spec)
    probs = []
    for _ in range(members):
        per_example = []
        for _ in range(count):
            rows = []
            for _ in range(spec.n_places):
                w = [rng.random() + 0.01 for _ in range(spec.base)]
                rows.append([v / sum(w) for v in w])
            per_example.append(rows)
        probs.append(per_example)
    stats = stats_from_logits(emission_logits(probs, spec), targets.expand(members, *targets.shape), spec)
    conf = confusion_matrices(stats)
    assert conf.shape == (members, 3, 5, 5)

    answers = [[(x + y) // 5**j % 5 for j in range(3)] for x, y in zip(xs, ys, strict=True)]
    for m in range(members):
        for j in range(3):
            for t in range(5):
                rows = [probs[m][i][j] for i in range(count) if answers[i][j] == t]
                if not rows:
                    assert torch.isnan(conf[m, j, t]).all(), (m, j, t)
                    continue
                want = [sum(r[v] for r in rows) / len(rows) for v in range(5)]
                torch.testing.assert_close(conf[m, j, t], torch.tensor(want), atol=1e-6, rtol=1e-5)
                assert conf[m, j, t].sum().item() == pytest.approx(1.0, abs=1e-5)
        # the carry-out place only ever holds 0 or 1
        assert torch.isnan(conf[m, 2, 2:]).all()
        assert not torch.isnan(conf[m, 2, :2]).any()
    # the two members got different probabilities, so their matrices differ
    assert not torch.allclose(conf[0].nan_to_num(), conf[1].nan_to_num())


def test_perfect_model_gives_identity_rows():
    spec = TaskSpec(n_digits=2, base=10, order="lsb")
    xs, ys = list(range(0, 100, 7)), list(range(99, -1, -7))
    tokens = encode(operands_from_ints(torch.tensor(xs), spec), operands_from_ints(torch.tensor(ys), spec), spec)
    _, targets = split_tokens(tokens, spec)
    logits = torch.full((1, len(xs), 3, 10), -30.0)
    logits.scatter_(-1, targets[None, ..., None], 0.0)  # all the mass on the true digit
    conf = confusion_matrices(stats_from_logits(logits, targets[None], spec))
    for j in range(3):
        present = {(x + y) // 10**j % 10 for x, y in zip(xs, ys, strict=True)}
        for t in range(10):
            if t in present:
                torch.testing.assert_close(conf[0, j, t], torch.nn.functional.one_hot(torch.tensor(t), 10).float())
            else:
                assert torch.isnan(conf[0, j, t]).all()
