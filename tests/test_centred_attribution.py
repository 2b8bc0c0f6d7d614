"""Centred logit attribution: on the hand-built adder the answer logit is 20 and every other digit's 0,
so read against the mean over digits the correct logit is 20 - 20/10 = 18; differences do not move."""

import adder
import pytest

pytest.importorskip("transformer_lens")

from test_analyze import random_subject  # noqa: E402

from addrepro.interp import logit_attribution  # noqa: E402
from addrepro.interp.common import load_subject  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_centred_readout_of_the_adder():
    subject = load_subject(adder.checkpoint(val_size=256), carry_size=8, chain_size=8)
    raw = logit_attribution.run(subject)
    centred = logit_attribution.run(subject, centred=True)
    places = subject.spec.n_places
    want = adder.LOGIT * (1 - 1 / adder.BASE)
    assert centred["centred"] and not raw["centred"]
    assert centred["actual"]["correct"] == pytest.approx([want] * places, abs=1e-4)
    assert centred["components"]["L0_mlp"]["correct"] == pytest.approx([want] * places, abs=1e-4)
    for key in ("carry", "carry_signed", "carry_cin0", "carry_cin1"):
        assert centred["actual"][key] == pytest.approx(raw["actual"][key], abs=1e-4), key
    assert centred["sum_error"] < 1e-4


def test_centred_components_still_sum_to_the_logits():
    subject, _ = random_subject(2, "LN", seed=6)
    raw = logit_attribution.run(subject, max_examples=128)
    result = logit_attribution.run(subject, max_examples=128, centred=True)
    assert result["sum_error"] < 1e-4
    for key in ("correct", "carry"):
        total = [sum(d[key][j] for d in result["components"].values()) for j in range(subject.spec.n_places)]
        assert total == pytest.approx(result["actual"][key], abs=1e-3)
    # the embedding's centred contribution differs from its raw one unless its logits were flat
    assert result["components"]["embed"]["carry"] == pytest.approx(raw["components"]["embed"]["carry"], abs=1e-4)
    assert result["components"]["embed"]["correct"] != pytest.approx(raw["components"]["embed"]["correct"], abs=1e-4)
