"""Conditioning on input features and token interventions: the hand-built adder (whose every answer is
known), brute-force enumeration of small tasks, and per-example losses recomputed directly."""

import math

import adder
import pytest
import torch

pytest.importorskip("transformer_lens")

from test_analyze import random_subject  # noqa: E402

from addrepro.interp import condition, intervene  # noqa: E402
from addrepro.interp.common import answer_logits, answer_targets, load_subject, token_losses  # noqa: E402
from addrepro.task.encoding import answer_digits, carries_in, operands_from_tokens  # noqa: E402
from addrepro.task.spec import TaskSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_features_against_their_definitions():
    spec = TaskSpec(n_digits=3)
    a = torch.tensor([[9, 9, 1], [3, 4, 5], [0, 0, 0]])  # place-indexed: a_0 first
    b = torch.tensor([[1, 0, 8], [6, 5, 4], [9, 9, 9]])
    f = {name: condition.feature_values(name, a, b, spec).tolist() for name in ("a_0", "b_2", "s_1", "carry_1")}
    assert f == {"a_0": [9, 3, 0], "b_2": [8, 4, 9], "s_1": [9, 9, 9], "carry_1": [1, 0, 0]}
    # 199 + 809 = 1008: carries into places 1, 2 and 3; 543 + 456 = 999: none; 0 + 999: none.
    assert condition.feature_values("carry_3", a, b, spec).tolist() == [1, 0, 0]
    assert condition.feature_values("chain_2", a, b, spec).tolist() == [1, 2, 2]  # s_1 = 9, then s_0 = 9 or not
    assert condition.feature_values("c_3", a, b, spec).tolist() == [1, 0, 0]
    assert condition.feature_values("c_0", a, b, spec).tolist() == [0, 9, 9]
    for bad, message in [("x_1", "is not a feature"), ("a_3", "a_j needs j in 0..2"), ("carry_4", "needs j in 0..3")]:
        with pytest.raises(ValueError, match=message):
            condition.feature_values(bad, a, b, spec)


def test_every_pair_is_enumerated_when_there_are_few():
    spec = TaskSpec(n_digits=2)
    tokens, exact = condition.examples(spec, 10_000, seed=0)
    assert exact and len(tokens) == 10_000
    a, b = operands_from_tokens(tokens, spec)
    pairs = {
        (int((a[i] * torch.tensor([1, 10])).sum()), int((b[i] * torch.tensor([1, 10])).sum())) for i in range(len(a))
    }
    assert len(pairs) == 10_000
    assert torch.equal(tokens[:, -3:].flip(-1), answer_digits(a, b, spec))  # each sequence's own answer
    tokens, exact = condition.examples(spec, 9_999, seed=0)
    assert not exact and len(tokens) == 9_999


def test_adder_reads_the_carry_exactly():
    subject = load_subject(adder.checkpoint(val_size=64), carry_size=8, chain_size=8)
    result = condition.run(subject, by=["carry_2"], size=4000, seed=1)
    by_value = {c["values"]["carry_2"]: c for c in result["cells"]}
    assert set(by_value) == {0, 1}
    # The adder puts logit 20 on the right digit, 0 elsewhere: P(right) = 1 / (1 + 9 e^-20) in every example.
    right = 1 / (1 + 9 * math.exp(-20))
    assert by_value[1]["p_plus1"][2] == pytest.approx(right, abs=1e-6)
    assert by_value[0]["p_plus0"][2] == pytest.approx(right, abs=1e-6)
    assert by_value[0]["p_plus1"][2] < 1e-7 and by_value[1]["p_plus0"][2] < 1e-7
    assert all(c["acc"] == [1.0] * 4 for c in result["cells"])
    assert sum(c["count"] for c in result["cells"]) == 4000


def test_cells_are_the_means_of_their_examples():
    # A random model: the per-example losses are recomputed here with a plain forward pass and grouped by hand.
    subject, _ = random_subject(1, "LN", seed=3)
    result = condition.run(subject, by=["s_1", "carry_1"], size=3000, seed=2)
    tokens, _ = condition.examples(subject.spec, 3000, 2)
    losses = token_losses(
        answer_logits(subject.bridge, tokens, subject.spec).double(), answer_targets(tokens, subject.spec)
    )
    a, b = operands_from_tokens(tokens, subject.spec)
    s1, c1 = a[:, 1] + b[:, 1], carries_in(a, b, subject.spec)[:, 1]
    assert len(result["cells"]) == len({(int(x), int(y)) for x, y in zip(s1, c1, strict=True)})
    for cell in result["cells"]:
        mask = (s1 == cell["values"]["s_1"]) & (c1 == cell["values"]["carry_1"])
        assert cell["count"] == int(mask.sum())
        for j in range(4):
            x = losses[mask, j]
            assert cell["loss"][j] == pytest.approx(float(x.mean()), rel=1e-9)
            expected_se = float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0
            assert cell["loss_se"][j] == pytest.approx(expected_se, rel=1e-9, abs=1e-15)


def test_the_odds_prediction_is_attached_for_a_digit_of_the_pair_below():
    subject = load_subject(adder.checkpoint(val_size=64), carry_size=8, chain_size=8)
    result = condition.run(subject, by=["b_1"], size=2000)
    assert result["odds_place"] == 2
    assert {c["values"]["b_1"]: c["predicted_plus1"] for c in result["cells"]} == {d: d / 10 for d in range(10)}
    assert "odds_place" not in condition.run(subject, by=["s_1"], size=500)
    fig = condition.plot(result)
    assert len(fig.axes) == 2


def test_adder_ignores_the_answer_prefix_and_follows_its_operands():
    subject = load_subject(adder.checkpoint(val_size=64), carry_size=8, chain_size=8)
    # The adder reads only the operands: replacing the carry-out token changes nothing.
    result = intervene.run(subject, set={"c_3": "not"}, size=2000)
    (before,), (after,) = result["before"], result["after"]
    assert after["loss"] == before["loss"] and after["changed"] == [0.0] * 4
    # a_0 + 1 (mod 10): the units digit follows the edited operand in every example (none keeps its
    # prediction, none is right by the original answer, all by the edited one).
    result = intervene.run(subject, set={"a_0": "+1"}, size=2000, by=["carry_1"])
    for cell in result["after"]:
        assert cell["changed"][0] == 1.0 and cell["acc"][0] == 0.0
        assert max(cell["loss_edited_answer"]) < 1e-7
    summary = intervene.summarize(result)
    assert summary["place_0/changed"] == 1.0 and summary["place_0/loss_change"] > 15
    fig = intervene.plot(result)
    assert len(fig.axes) == 2 and all(ax.get_legend() is not None for ax in fig.axes)
    # 19 cells of s_0 = a_0 + b_0: too many to name in a legend, coloured in order along a colour bar
    many = intervene.plot(intervene.run(subject, set={"a_0": "+1"}, size=2000, by=["s_0"]))
    panel, bar = many.axes[0], many.axes[2]
    assert len({tuple(p.get_facecolor()) for p in panel.patches}) == 19 and panel.get_legend() is None
    assert [t.get_text() for t in bar.get_yticklabels()][::5] == ["s_0=0", "s_0=18"]


def test_intervention_options_are_checked():
    for options, message in [
        ({"set": {}}, "give the tokens to replace"),
        ({"set": {"s_1": 3}}, "only tokens can be replaced"),
        ({"set": {"a_0": "x"}}, "must be a digit, \\+k"),
        ({"set": {"a_0": 1}, "by": "a_0"}, "must be null or a list"),
    ]:
        with pytest.raises(ValueError, match=message):
            intervene.check_options(**options)
    subject = load_subject(adder.checkpoint(val_size=64), carry_size=8, chain_size=8)
    with pytest.raises(ValueError, match="a digit is in 0..9"):
        intervene.run(subject, set={"a_0": 12}, size=100)
    with pytest.raises(ValueError, match="c_j needs j in 0..3"):
        intervene.run(subject, set={"c_4": 1}, size=100)


def test_confusion_matrices_per_cell_of_the_adder():
    # The adder is right everywhere: the confusion matrix of place 1 is the identity in every cell (to its
    # softmax's 9 e^-20), with NaN rows for digits a cell never has.
    subject = load_subject(adder.checkpoint(val_size=64), carry_size=8, chain_size=8)
    result = condition.run(subject, by=["carry_1"], size=3000, confusion=1)
    assert result["confusion_place"] == 1
    right = 1 / (1 + 9 * math.exp(-20))
    for cell in result["cells"]:
        matrix = torch.as_tensor(cell["confusion"])
        seen = ~matrix.isnan().any(-1)
        assert seen.any()
        torch.testing.assert_close(matrix[seen], torch.eye(10, dtype=torch.float64)[seen] * right, atol=1e-7, rtol=0)
    fig = condition.plot(result)
    assert len(fig.axes) == 1 + len(result["cells"]) + 1  # the loss panel, a matrix per cell, the colour bar
    with pytest.raises(ValueError, match="this task's places are 0..3"):
        condition.run(subject, by=["carry_1"], size=100, confusion=4)
