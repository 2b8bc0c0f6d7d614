"""Activation and path patching on pairs built for one place: the hand-built adder, whose heads and MLP
say exactly which activation carries each difference, and a random 2-layer model for the paths."""

import adder
import numpy as np
import pytest

pytest.importorskip("transformer_lens")

from test_analyze import random_subject  # noqa: E402

from addrepro.interp import patching  # noqa: E402
from addrepro.interp.common import answer_positions, load_subject, naive_digits, write_outputs  # noqa: E402
from addrepro.task.encoding import carries_in, operands_from_tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adder_subject():
    return load_subject(adder.checkpoint(val_size=64), carry_size=8, chain_size=8)


@pytest.mark.parametrize("place,kind", [(1, "carry"), (3, "carry"), (2, "a"), (0, "b"), (3, "b")])
def test_pairs_differ_only_where_asked(place, kind):
    spec = adder.SPEC
    clean, corrupt = patching.make_pairs(spec, place, kind, 64)
    assert len(clean) == len(corrupt) == 64
    (a1, b1), (a2, b2) = operands_from_tokens(clean, spec), operands_from_tokens(corrupt, spec)
    j = answer_positions(spec)[place] + 1
    assert (clean[:, j] != corrupt[:, j]).all()  # the place's answer always differs
    if kind == "carry":
        assert (carries_in(a1, b1, spec)[:, place] == 1).all() and (carries_in(a2, b2, spec)[:, place] == 0).all()
        assert (a1[:, place:] == a2[:, place:]).all() and (b1[:, place:] == b2[:, place:]).all()
        n1, _ = naive_digits(clean, spec)
        # right digit vs naive sum: the clean answer is naive+1, the corrupted one the naive sum
        assert (corrupt[:, j] == n1[:, place]).all()
        above = [answer_positions(spec)[i] + 1 for i in range(place + 1, spec.n_places)]
        assert (clean[:, above] == corrupt[:, above]).all()
    else:
        pair = min(place, spec.n_digits - 1)
        changed, same = (a1, a2) if kind == "a" else (b1, b2)
        other1, other2 = (b1, b2) if kind == "a" else (a1, a2)
        assert (other1 == other2).all()
        rest = [i for i in range(spec.n_digits) if i != pair]
        assert (changed[:, rest] == same[:, rest]).all() and (changed[:, pair] != same[:, pair]).all()


def test_adder_carry_lives_in_head_1_and_the_mlp(adder_subject, tmp_path):
    # At place 1 the carry comes from pair 0, which head 1 reads from the position predicting place 1;
    # the MLP there turns it into the answer. Patching either restores all of it, anything else none.
    result = patching.run(adder_subject, size=32, places=[1, 2], kinds=["carry", "a"])
    pos = answer_positions(adder_subject.spec)
    r = result["results"]["place_1/carry"]
    assert r["ld_clean"] == pytest.approx(adder.LOGIT, abs=1e-4)
    assert r["ld_corrupted"] == pytest.approx(-adder.LOGIT, abs=1e-4)
    heads, mlp = np.asarray(r["heads"]), np.asarray(r["mlp"])  # (1, T, 4), (1, T)
    want = np.zeros_like(heads)
    want[0, pos[1], 1] = 1.0
    assert np.allclose(heads, want, atol=1e-5)
    want = np.zeros_like(mlp)
    want[0, pos[1]] = 1.0
    assert np.allclose(mlp, want, atol=1e-5)
    # the residual before layer 0 at the position holds nothing of it (the heads read other positions);
    # at the operand positions below place 1 it holds all of it only jointly, never one position alone
    assert abs(np.asarray(r["resid_pre"])[0, pos[1]]) < 1e-5
    # An a_2 change at place 2 is read by head 0 (pair j - 0) at place 2's position, and only there.
    a = result["results"]["place_2/a"]
    heads = np.asarray(a["heads"])
    want = np.zeros_like(heads)
    want[0, pos[2], 0] = 1.0
    assert np.allclose(heads, want, atol=1e-5)
    assert np.asarray(a["mlp"])[0, pos[2]] == pytest.approx(1.0, abs=1e-5)
    assert patching.summarize(result)["place_1_carry/L0H1"] == pytest.approx(1.0, abs=1e-5)
    paths = write_outputs(result, patching.plot(result), tmp_path / "patching")
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("norm", [None, "LN"])
def test_path_patching_of_a_two_layer_model(norm):
    # One edge L0H1 -> L1H2 through v, recomputed independently: run the corrupted input with the whole
    # residual before layer 1 moved by L0H1's clean-minus-corrupted write, keep only head 2's value
    # from that run (the model's own LayerNorm and W_V), and put it into a plain corrupted run.
    subject, _ = random_subject(2, norm, seed=4)
    clean, corrupt = patching.make_pairs(subject.spec, 2, "a", 16)
    metric = patching.logit_diff_metric(subject.spec, 2, clean, corrupt)
    bridge = subject.bridge
    _, clean_cache = bridge.run_with_cache(clean[:, :-1])
    _, corrupt_cache = bridge.run_with_cache(corrupt[:, :-1])
    paths = patching.path_patch(subject, corrupt[:, :-1], clean_cache, corrupt_cache, metric)
    sources = [f"L0H{h}" for h in range(4)] + ["L0_mlp"]
    assert set(paths) == {f"{s}->L1H{h}" for s in sources for h in range(4)}
    dz = clean_cache["blocks.0.attn.hook_z"][:, :, 1] - corrupt_cache["blocks.0.attn.hook_z"][:, :, 1]
    delta = dz @ bridge.W_O[0, 1]
    moved = {}

    def move(resid, hook):
        return resid + delta

    def keep(v, hook):
        moved["v"] = v[:, :, 2].clone()
        return v

    hooks = [("blocks.1.hook_resid_pre", move), ("blocks.1.attn.hook_v", keep)]
    bridge.run_with_hooks(corrupt[:, :-1], fwd_hooks=hooks)

    def put(v, hook):
        v = v.clone()
        v[:, :, 2] = moved["v"]
        return v

    want = metric(bridge.run_with_hooks(corrupt[:, :-1], fwd_hooks=[("blocks.1.attn.hook_v", put)])).item()
    assert paths["L0H1->L1H2"][2] == pytest.approx(want, abs=1e-4)
    base = metric(bridge(corrupt[:, :-1])).item()
    assert abs(want - base) > 1e-4  # the edge does move the metric: the check is not vacuous
    # With "clean" = corrupted every write is unchanged: no edge moves the metric.
    same = patching.path_patch(subject, corrupt[:, :-1], corrupt_cache, corrupt_cache, metric)
    assert all(v == pytest.approx([base] * 3, abs=1e-5) for v in same.values())


def test_no_fraction_where_the_model_does_not_tell_the_pair_apart(adder_subject, tmp_path):
    """The adder tells carry pairs apart by 2·LOGIT: below that gap every fraction is there, above it
    (the gap a model that has not learned the carry would show, scaled up) none is, and the result says so."""
    gap = 2 * adder.LOGIT
    (told,) = patching.run(adder_subject, size=16, places=[1], min_gap=gap * 0.99)["results"].values()
    assert told["told_apart"] and np.isfinite(np.asarray(told["heads"])).all()
    result = patching.run(adder_subject, size=16, places=[1], min_gap=gap * 1.01)
    (untold,) = result["results"].values()
    assert untold["told_apart"] is False and untold["ld_clean"] - untold["ld_corrupted"] == pytest.approx(gap, abs=1e-3)
    for part in ("heads", "mlp", "resid_pre"):
        assert np.isnan(np.asarray(untold[part], dtype=float)).all(), part
    assert all(v != v for v in patching.summarize(result).values())  # NaN: nothing to rank
    paths = write_outputs(result, patching.plot(result), tmp_path / "patching")
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("min_gap", [0, -1.0, "x", True])
def test_min_gap_must_be_a_positive_number(min_gap):
    with pytest.raises(ValueError, match=r"patching.min_gap=.* is invalid: must be a number > 0"):
        patching.check_options(min_gap=min_gap)
