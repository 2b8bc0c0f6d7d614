"""Tests for addrepro.metrics.place with hand-built logits whose losses are known in closed form."""

import math

import pytest
import torch

from addrepro.metrics.place import place_metric_dict, place_stats, stats_from_logits
from addrepro.task.encoding import encode, operands_from_ints, split_tokens
from addrepro.task.spec import TaskSpec

LOG10 = math.log(10)


def spec_for(order: str) -> TaskSpec:
    return TaskSpec(n_digits=2, base=10, order=order)


def logits_with_prob(targets: torch.Tensor, p: float, base: int = 10) -> torch.Tensor:
    """Logits whose softmax puts probability p on the target and (1 - p)/(base - 1) on each other digit."""
    probs = torch.full((*targets.shape, base), (1 - p) / (base - 1))
    probs.scatter_(-1, targets.unsqueeze(-1), p)
    return probs.log()


# -----------------------------------------------------------------------------
# hand-built logits


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_uniform_logits(order):
    spec = spec_for(order)
    # emission-order targets; uniform logits predict digit 0 (argmax of a tie is the first index)
    targets = torch.tensor([[[0, 5, 0], [1, 0, 0], [0, 0, 0], [3, 4, 5]]])  # (K=1, B=4, 3)
    stats = stats_from_logits(torch.zeros(1, 4, 3, 10), targets, spec)
    torch.testing.assert_close(stats.token_loss, torch.full((1, 4, 3), LOG10))
    torch.testing.assert_close(stats.loss_by_place, torch.full((1, 3), LOG10))
    torch.testing.assert_close(stats.loss, torch.tensor([LOG10]))
    # correct by emission position: pos0 2/4, pos1 2/4, pos2 3/4; msb emits places (2, 1, 0), lsb (0, 1, 2)
    expected_acc = [0.75, 0.5, 0.5] if order == "msb" else [0.5, 0.5, 0.75]
    torch.testing.assert_close(stats.acc_by_place, torch.tensor([expected_acc]))
    torch.testing.assert_close(stats.exact_match, torch.tensor([0.25]))  # only the all-zero row


@pytest.mark.parametrize("p", [0.5, 0.9, 0.05])
@pytest.mark.parametrize("emit_pos", [0, 1, 2])
@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_probability_p_at_one_position(order, emit_pos, p):
    spec = spec_for(order)
    targets = torch.tensor([[[3, 7, 1], [9, 2, 4]]])  # no zeros: uniform positions are all wrong
    logits = torch.zeros(1, 2, 3, 10)
    logits[:, :, emit_pos] = logits_with_prob(targets[:, :, emit_pos], p)
    stats = stats_from_logits(logits, targets, spec)
    place = 2 - emit_pos if order == "msb" else emit_pos
    expected_loss = torch.full((1, 3), LOG10)
    expected_loss[0, place] = -math.log(p)
    torch.testing.assert_close(stats.loss_by_place, expected_loss)
    torch.testing.assert_close(stats.loss, torch.tensor([(2 * LOG10 - math.log(p)) / 3]))
    expected_acc = torch.zeros(1, 3)
    expected_acc[0, place] = 1.0 if p > (1 - p) / 9 else 0.0
    torch.testing.assert_close(stats.acc_by_place, expected_acc)
    torch.testing.assert_close(stats.exact_match, torch.tensor([0.0]))


def test_exact_match_and_per_sample_accuracy():
    spec = spec_for("msb")
    targets = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 1, 2]]])
    logits = logits_with_prob(targets, 0.6)  # every answer right
    logits[0, 1, 2] = logits_with_prob(torch.tensor([0]), 0.6)[0]  # sample 1 wrong at emission 2 = place 0
    logits[0, 2, 0] = logits_with_prob(torch.tensor([0]), 0.6)[0]  # sample 2 wrong at emission 0 = place 2
    stats = stats_from_logits(logits, targets, spec)
    torch.testing.assert_close(stats.acc_by_place, torch.tensor([[0.75, 1.0, 0.75]]))
    torch.testing.assert_close(stats.exact_match, torch.tensor([0.5]))
    # a wrong position has probability (1 - 0.6)/9 on its target
    wrong = -math.log(0.4 / 9)
    right = -math.log(0.6)
    mixed = (3 * right + wrong) / 4
    torch.testing.assert_close(stats.loss_by_place, torch.tensor([[mixed, right, mixed]]))


def test_members_are_independent():
    spec = spec_for("lsb")
    targets = torch.tensor([[[1, 2, 3]], [[1, 2, 3]]])  # K=2, B=1
    logits = torch.stack([logits_with_prob(targets[0], 0.5), torch.zeros(1, 3, 10)])
    stats = stats_from_logits(logits, targets, spec)
    torch.testing.assert_close(stats.loss, torch.tensor([-math.log(0.5), LOG10]))
    torch.testing.assert_close(stats.exact_match, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(stats.acc_by_place, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_place_0_is_units_in_both_orders(order):
    spec = spec_for(order)
    values_a, values_b = [47, 99, 5, 60], [38, 1, 0, 50]
    tokens = encode(operands_from_ints(torch.tensor(values_a), spec),
                    operands_from_ints(torch.tensor(values_b), spec), spec)  # fmt: skip
    _, targets = split_tokens(tokens, spec)
    stats = stats_from_logits(torch.zeros(1, 4, 3, 10), targets[None], spec)
    sums = [x + y for x, y in zip(values_a, values_b, strict=True)]  # 85, 100, 5, 110
    assert stats.targets[0, :, 0].tolist() == [s % 10 for s in sums]  # units
    assert stats.targets[0, :, 1].tolist() == [s // 10 % 10 for s in sums]  # tens
    assert stats.targets[0, :, 2].tolist() == [s // 100 for s in sums]  # carry-out
    # log_probs are permuted with the targets: the logits at emission position of place 0 land at [..., 0, :]
    logits = torch.zeros(1, 4, 3, 10)
    units_pos = 2 if order == "msb" else 0
    logits[0, :, units_pos, 7] = 5.0
    stats = stats_from_logits(logits, targets[None], spec)
    assert (stats.log_probs[0, :, 0].argmax(-1) == 7).all()
    assert (stats.log_probs[0, :, 1:, 7] == stats.log_probs[0, :, 1:, 0]).all()


# -----------------------------------------------------------------------------
# place_stats with an oracle model: it reads the operands and predicts answer digits


class Oracle(torch.nn.Module):
    """Confident correct logits at the answer positions whose place is in ``places``; uniform elsewhere."""

    def __init__(self, spec: TaskSpec, places: set[int], k: int = 1):
        super().__init__()
        self.spec, self.places, self.k = spec, places, k
        self.seen_last: list[int | None] = []

    def forward(self, tokens: torch.Tensor, last: int | None = None) -> torch.Tensor:
        self.seen_last.append(last)
        spec, n = self.spec, self.spec.n_digits
        if tokens.dim() == 2:
            tokens = tokens.expand(self.k, *tokens.shape)
        k, bsz, t = tokens.shape
        logits = torch.zeros(k, bsz, t, spec.base)
        for m in range(k):
            for i, row in enumerate(tokens[m].tolist()):
                a = int("".join(map(str, row[:n])), spec.base)
                b = int("".join(map(str, row[n + 1 : 2 * n + 1])), spec.base)
                for place in self.places:
                    digit = (a + b) // spec.base**place % spec.base
                    # the output at position p predicts token p + 1
                    pos = spec.answer_start + spec.emission_index[place] - 1
                    logits[m, i, pos, digit] = 60.0
        return logits if last is None else logits[:, :, -last:]


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_place_stats_with_perfect_oracle(order):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 10, (16, 3), generator=g)
    b = torch.randint(0, 10, (16, 3), generator=g)
    tokens = encode(a, b, spec)
    oracle = Oracle(spec, places={0, 1, 2, 3})
    stats = place_stats(oracle, tokens, spec)
    assert oracle.seen_last == [spec.n_places]
    assert stats.token_loss.shape == (1, 16, 4)
    assert stats.token_loss.max() < 1e-20
    torch.testing.assert_close(stats.acc_by_place, torch.ones(1, 4))
    torch.testing.assert_close(stats.exact_match, torch.tensor([1.0]))


@pytest.mark.parametrize("known_place", [0, 2, 3])
@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_place_stats_oracle_for_one_place(order, known_place):
    spec = TaskSpec(n_digits=3, base=10, order=order)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 10, (8, 3), generator=g), torch.randint(0, 10, (8, 3), generator=g)
    tokens = encode(a, b, spec)
    # (K, B, T) tokens: two members with the same data
    stats = place_stats(Oracle(spec, places={known_place}, k=2), torch.stack([tokens, tokens]), spec)
    expected = torch.full((2, 4), LOG10)
    expected[:, known_place] = 0.0
    torch.testing.assert_close(stats.loss_by_place, expected, atol=1e-6, rtol=1e-6)
    assert (stats.acc_by_place[:, known_place] == 1).all()


# -----------------------------------------------------------------------------
# metric dict


def test_place_metric_dict_keys_and_values():
    spec = spec_for("msb")
    targets = torch.tensor([[[3, 7, 1], [9, 2, 4]], [[3, 7, 1], [9, 2, 4]]])
    logits = torch.stack([logits_with_prob(targets[0], 0.5), torch.zeros(2, 3, 10)])
    stats = stats_from_logits(logits, targets, spec)
    out = place_metric_dict(stats, "val")
    assert set(out) == {
        "val/loss", "val/acc",
        "val/loss/place_0", "val/loss/place_1", "val/loss/place_2",
        "val/acc/place_0", "val/acc/place_1", "val/acc/place_2",
    }  # fmt: skip
    for v in out.values():
        assert v.shape == (2,)
    torch.testing.assert_close(out["val/loss"], torch.tensor([-math.log(0.5), LOG10]))
    torch.testing.assert_close(out["val/acc"], torch.tensor([1.0, 0.0]))
    for j in range(3):
        torch.testing.assert_close(out[f"val/loss/place_{j}"], torch.tensor([-math.log(0.5), LOG10]))
        torch.testing.assert_close(out[f"val/acc/place_{j}"], torch.tensor([1.0, 0.0]))
