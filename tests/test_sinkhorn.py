"""The Sinkhorn operator, Hungarian matching and Kendall's tau."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import kendalltau

from medformer.pretext.sinkhorn import (
    hungarian,
    kendall_tau,
    log_sinkhorn,
    permutation_matrix,
    sample_gumbel,
    sinkhorn,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [4, 9, 27])
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_rows_and_columns_sum_to_one(n: int, noise: float) -> None:
    torch.manual_seed(n)
    scores = torch.randn(5, n, n) * 2
    s = sinkhorn(scores, tau=1.0, iterations=20, noise=noise, tol=1e-5)
    assert s.shape == (5, n, n)
    assert (s >= 0).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(5, n), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.sum(-2), torch.ones(5, n), atol=1e-4, rtol=0)


def test_twenty_rounds_suffice_for_unit_scale_scores() -> None:
    torch.manual_seed(0)
    s = sinkhorn(torch.randn(50, 9, 9), tau=1.0, iterations=20)
    torch.testing.assert_close(s.sum(-1), torch.ones(50, 9), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.sum(-2), torch.ones(50, 9), atol=1e-4, rtol=0)


def test_low_temperature_approaches_the_hungarian_permutation() -> None:
    torch.manual_seed(0)
    scores = torch.randn(8, 6, 6) * 5
    perm = hungarian(scores)
    hard = permutation_matrix(perm)
    errors = []
    for tau in (1.0, 0.1, 0.01):
        s = sinkhorn(scores, tau=tau, iterations=20, tol=1e-5, max_iterations=3000)
        errors.append((s - hard).abs().max().item())
    assert s.argmax(-1).tolist() == perm.tolist()  # each tile's most likely place is its assignment
    assert errors[0] > errors[1] > errors[2]  # closer as tau falls ...
    assert errors[2] < 1e-2  # ... and at tau = 0.01 it is the permutation to 1%
    # and the Hungarian permutation is the best one: brute force over all 720
    perms = torch.tensor(list(itertools.permutations(range(6))))
    totals = torch.stack([scores[0, torch.arange(6), p].sum() for p in perms])
    torch.testing.assert_close(scores[0, torch.arange(6), hungarian(scores)[0]].sum(), totals.max())


def test_log_space_is_finite_at_tiny_temperature() -> None:
    scores = torch.randn(2, 5, 5) * 50
    s = sinkhorn(scores, tau=1e-4, iterations=50)
    assert torch.isfinite(s).all()


def test_gradients_are_finite_and_reach_the_scores() -> None:
    torch.manual_seed(1)
    scores = torch.randn(3, 9, 9, requires_grad=True)
    target = permutation_matrix(torch.stack([torch.randperm(9) for _ in range(3)]))
    for tau in (1.0, 0.05):
        s = sinkhorn(scores, tau=tau, iterations=20, noise=0.5)
        loss = ((s - target) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, scores)
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_a_permutation_matrix_is_a_fixed_point() -> None:
    perm = torch.tensor([[2, 0, 3, 1]])
    p = permutation_matrix(perm)
    log_p = torch.where(p > 0, 0.0, -1e4)
    torch.testing.assert_close(log_sinkhorn(log_p, 5).exp(), p)
    assert hungarian(p).tolist() == perm.tolist()


def test_sinkhorn_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        log_sinkhorn(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="tau"):
        sinkhorn(torch.zeros(3, 3), tau=0.0)


def test_gumbel_noise_has_the_gumbel_mean() -> None:
    torch.manual_seed(0)
    g = sample_gumbel((200_000,), torch.zeros(1))
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni constant


def test_kendall_tau_matches_scipy() -> None:
    torch.manual_seed(0)
    true = torch.stack([torch.randperm(9) for _ in range(20)])
    pred = torch.stack([torch.randperm(9) for _ in range(20)])
    ours = kendall_tau(pred, true)
    ref = torch.tensor([kendalltau(p, t).statistic for p, t in zip(pred.numpy(), true.numpy())])
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)
    assert kendall_tau(true, true).eq(1).all()
    assert kendall_tau(torch.arange(5).flip(0), torch.arange(5)).item() == -1.0
