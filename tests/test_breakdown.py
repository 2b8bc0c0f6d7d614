"""The per-example breakdown: the loss decomposition on hand-built logits, and the grids and carry
cases of a hand-built model whose answer is known exactly (the adder, made blind to carries)."""

import math

import adder
import pytest
import torch

pytest.importorskip("transformer_lens")

from addrepro.interp import breakdown  # noqa: E402
from addrepro.interp.common import load_subject, naive_digits, write_outputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_adder_checkpoint() -> dict:
    """The adder with heads 1-3 silenced: it never sees a carry and always answers the naive sum
    (logit 20 on it, 0 on every other digit); the carry-out it answers is always 0."""
    model = adder.model()
    with torch.no_grad():
        for h in (1, 2, 3):
            model.blocks[0].attn.W_O[0, h].zero_()
    ckpt = adder.checkpoint(val_size=512)
    ckpt["model"] = model.member_state_dict(0)
    return ckpt


def test_decomposition_of_hand_built_logits():
    base = 10
    # Example 0: p(right) = 0.9 on naive+1 (the right digit), 0.1 spread over the 8 "other" digits.
    # Example 1: p(right) = 0.1 on naive+0 (right), 0.9 on naive+1.
    probs = torch.zeros(2, base, dtype=torch.float64)
    probs[0, 1] = 0.9
    probs[0, 2:] = 0.1 / 8
    probs[1, 0], probs[1, 1] = 0.1, 0.9
    logp = probs.log()  # already indexed by k = shift from naive
    right = torch.tensor([math.log(0.9), math.log(0.1)], dtype=torch.float64)
    d = breakdown.decompose(right, logp)
    loss = -(math.log(0.9) + math.log(0.1)) / 2
    m = 0.1 / 2  # mean mass off naive+0/+1
    assert d["loss"] == pytest.approx(loss, abs=1e-12)
    assert d["m"] == pytest.approx(m, abs=1e-12)
    assert d["other"] == pytest.approx(-math.log(1 - m), abs=1e-12)
    assert d["split"] == pytest.approx(-math.log(0.5 / (1 - m)), abs=1e-12)
    assert d["spread"] == pytest.approx(loss + math.log(0.5), abs=1e-12)
    assert d["other"] + d["split"] + d["spread"] == pytest.approx(d["loss"], abs=1e-12)
    # two losses, -log 0.9 and -log 0.1: their sample standard deviation over sqrt(2)
    spread = abs(math.log(0.9) - math.log(0.1)) / math.sqrt(2)
    assert d["n"] == 2 and d["loss_se"] == pytest.approx(spread / math.sqrt(2), rel=1e-12)
    # shifts are read from real logits: P(naive + k) with naive = 7 wraps around the base
    logits = torch.randn(5, base, generator=torch.Generator().manual_seed(0))
    naive = torch.full((5,), 7)
    shifted = breakdown.shifted_log_probs(logits, naive)
    assert torch.allclose(shifted[:, 3], logits.double().log_softmax(-1)[:, 0])


def test_breakdown_of_a_carry_blind_adder(tmp_path):
    subject = load_subject(naive_adder_checkpoint(), carry_size=32, chain_size=16)
    result = breakdown.run(subject, per_cell=4)
    n, base, big = adder.N, adder.BASE, adder.LOGIT
    # It always puts (almost) all mass on naive+0: loss 0 without a carry in, 20 with one.
    wrong = big + math.log1p(9 * math.exp(-big))  # loss when the right digit has logit 0
    for j in range(n + 1):
        shift = torch.as_tensor(result["grid"][f"place_{j}"]["p_shift"])
        assert shift[..., 0].min() > 1 - 1e-6
    # The carry-out is decided by the top pair: sum >= 10 always carries (loss 20), <= 8 never (0).
    loss = torch.as_tensor(result["grid"][f"place_{n}"]["loss"])
    sums = torch.arange(base)[:, None] + torch.arange(base)[None, :]
    assert torch.allclose(loss[sums >= base], torch.tensor(wrong, dtype=loss.dtype), atol=1e-5)
    assert loss[sums <= base - 2].max() < 1e-6
    by_sum = result["grid"][f"place_{n}"]["by_sum"]
    assert by_sum[base:] == pytest.approx([wrong] * (base - 1), abs=1e-5)
    # Carry sets: with a carry in, the whole loss is the split term (mass on +0, none on other digits).
    carry = result["decomposition"]["carry"]
    for j in range(1, n + 1):
        cin1, cin0 = carry[f"carry/place_{j}/cin_1"], carry[f"carry/place_{j}/cin_0"]
        assert cin1["loss"] == pytest.approx(wrong, abs=1e-5)
        assert cin1["split"] == pytest.approx(wrong, abs=1e-4)
        assert abs(cin1["other"]) < 1e-6 and abs(cin1["spread"]) < 1e-4
        assert cin0["loss"] < 1e-6 and cin1["p_plus1"] < 1e-6
    for d in [*carry.values(), *result["decomposition"]["val"].values()]:
        assert d["other"] + d["split"] + d["spread"] == pytest.approx(d["loss"], abs=1e-9)
    # Validation: the loss at place j is 20 x (fraction carried into j), and all of it is split + spread.
    _, carries = naive_digits(subject.val_tokens, subject.spec)
    for j in range(n + 1):
        d = result["decomposition"]["val"][f"place_{j}"]
        assert d["loss"] == pytest.approx(wrong * carries[:, j].double().mean().item(), abs=1e-4)
    fig = breakdown.plot(result)
    table = next(ax for ax in fig.axes if ax.get_title().startswith("carry-conditioned sets"))
    assert len(table.texts) == len(carry) * 6  # every set's loss, three terms and P(+0), P(+1)
    assert min(t.get_fontsize() for t in table.texts) >= 7  # readable at the saved size
    assert fig._suptitle.get_text().endswith(f"— {n}-digit base {base} (msb, add)")
    paths = write_outputs(result, fig, tmp_path / "breakdown")
    assert [p.suffix for p in paths] == [".json", ".png"]
    assert set(breakdown.summarize(result)) >= {f"place_{n}/split", "sets/carry/place_1/cin_1"}
