"""Linear probes and PCA: synthetic activations with a planted linear structure, and the hand-built
adder, whose residual after its layer holds the answer digit one-hot."""

import adder
import pytest
import torch

pytest.importorskip("transformer_lens")

from addrepro.interp import probes  # noqa: E402
from addrepro.interp.common import answer_positions, load_subject, write_outputs  # noqa: E402
from addrepro.task.encoding import encode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_finds_a_planted_code_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    n, d = 2000, 16
    digit = torch.randint(0, 10, (n,), generator=g)
    codes = torch.randn(10, d, generator=g)
    encoded = codes[digit] + 0.1 * torch.randn(n, d, generator=g)  # the digit, linearly, plus noise
    noise = torch.randn(n, d, generator=g)  # nothing about it
    acc = probes.fit_probe(torch.stack([encoded, noise]), digit, 10)
    assert acc.shape == (2,)
    assert acc[0] == 1.0
    assert abs(acc[1] - 0.1) < 0.05  # chance among 10 digits (500 test points: sd 0.013)
    # A binary label planted along a direction u of Gaussian features: least squares points along u.
    x = torch.randn(n, d, generator=g)
    u = torch.randn(d, generator=g)
    label = (x @ u > 0).long()
    assert probes.fit_probe(x, label, 2) > 0.95
    assert probes.majority_baseline(label, 2) < 0.6
    shuffled = label[torch.randperm(n, generator=g)]
    assert abs(probes.fit_probe(x, shuffled, 2) - 0.5) < 0.08


def test_labels_by_hand():
    spec = adder.SPEC
    # 195 + 307 = 502: pairs (5,7) generate, (9,0) propagates, (1,3) neither; carries into 1, 2, 3: 1, 1, 0
    a, b = torch.tensor([[5, 9, 1]]), torch.tensor([[7, 0, 3]])  # place-indexed digits
    y = probes.labels(encode(a, b, spec), spec)
    assert [int(y["carry"][j]) for j in (1, 2, 3)] == [1, 1, 0]
    assert [int(y["generate"][j]) for j in (0, 1, 2)] == [1, 0, 0]
    assert [int(y["propagate"][j]) for j in (0, 1, 2)] == [0, 1, 0]
    assert [int(y["digit"][j]) for j in (0, 1, 2, 3)] == [2, 0, 5, 0]
    assert 0 not in y["carry"] and 3 not in y["generate"]


def test_pca_of_a_planted_direction():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g) * torch.tensor([10.0, 3.0, 1, 1, 1, 1, 1, 1])
    coords, var = probes.pca2(x)
    assert var[0] > var[1] > 0.05 and var[0] > 0.8
    centred = x[:, 0] - x[:, 0].mean()
    assert abs(torch.corrcoef(torch.stack([coords[:, 0], centred.double()]))[0, 1]) > 0.99


def test_adder_residual_holds_the_answer_digit(tmp_path):
    subject = load_subject(adder.checkpoint(val_size=1024), carry_size=8, chain_size=8)
    result = probes.run(subject)
    assert result["points"] == ["resid_pre_0", "resid_final"]
    for j, pos in enumerate(answer_positions(subject.spec)):
        acc = torch.as_tensor(result["accuracy"][f"place_{j}/digit"]["accuracy"])  # (points, T)
        assert acc[1, pos] == 1.0  # the MLP writes it one-hot
        if j < adder.N:  # the embedding there is the previous answer digit, which says little about this one
            assert acc[0, pos] < 0.5
        else:  # the carry-out is predicted at "=", the same token every time: the probe can only guess
            assert acc[0, pos] == result["accuracy"][f"place_{j}/digit"]["baseline"]
    summary = probes.summarize(result)
    assert summary["place_2/digit_final"] == 1.0 and summary["place_2/digit_best"] == 1.0
    pca = result["pca"]["place_1"]
    assert len(pca["carry"]) == 512 and len(pca["points"]["resid_final"]["coords"]) == 512
    paths = write_outputs(result, probes.plot(result), tmp_path / "probes")
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
