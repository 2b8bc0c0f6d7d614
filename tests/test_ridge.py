"""The probes' closed-form ridge fit (``metrics.ridge``) against the same formula solved apart, one
batch entry at a time in numpy, at the sizes of a stack of width-512 models with the thread count
set explicitly (as training sets it), and with a non-finite batch entry beside finite ones."""

import numpy as np
import pytest
import torch

from addrepro.metrics.mechanism import ridge_probe_accuracy
from addrepro.metrics.ridge import ridge_weights


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def closed_form(x: np.ndarray, t: np.ndarray, ridge: float) -> np.ndarray:
    n, d = x.shape
    return np.linalg.solve(x.T @ x + ridge * n * np.eye(d), x.T @ t)


@pytest.mark.parametrize("members,width", [(1, 33), (2, 513), (3, 513), (4, 257)])
def test_ridge_weights_are_the_closed_form_for_every_member(two_threads, members, width):
    g = torch.Generator().manual_seed(members * 1000 + width)
    x = torch.randn(members, 128, width, generator=g, dtype=torch.float64)  # fewer examples than features
    t = torch.randn(128, 3, generator=g, dtype=torch.float64)  # one set of targets for every member
    w = ridge_weights(x, t, 1e-2)
    assert w.shape == (members, width, 3)
    for k in range(members):
        np.testing.assert_allclose(w[k].numpy(), closed_form(x[k].numpy(), t.numpy(), 1e-2), rtol=1e-9, atol=1e-12)


def test_a_member_with_non_finite_features_gets_nan_weights_and_leaves_the_others_alone(two_threads):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, 17, generator=g, dtype=torch.float64)
    t = torch.randn(64, 1, generator=g, dtype=torch.float64)
    alone = ridge_weights(x[[0, 2]], t, 1e-2)
    x[1, 5, 3] = float("nan")
    w = ridge_weights(x, t, 1e-2)
    assert w[1].isnan().all()
    torch.testing.assert_close(w[[0, 2]], alone, rtol=1e-12, atol=1e-15)  # a batch of 3, not 2: rounding only


def test_the_carry_probe_of_a_stack_of_wide_models_runs_with_two_threads(two_threads):
    """The mechanism metrics' probe at the default carry-set size (128 training rows) of two width-512
    members: a planted direction is found, noise is at chance."""
    g = torch.Generator().manual_seed(1)
    n, d = 256, 512
    y = (torch.arange(n) % 2).float()[torch.randperm(n, generator=g)]
    direction = torch.randn(d, generator=g)
    noise = torch.randn(2, n, d, generator=g)
    planted = noise[0] + 4.0 * (2 * y[:, None] - 1) * direction / direction.norm()
    acc = ridge_probe_accuracy(torch.stack([planted, noise[1]]), y, torch.arange(n) % 2 == 0)
    assert acc[0].item() >= 0.95
    assert 0.3 < acc[1].item() < 0.7
