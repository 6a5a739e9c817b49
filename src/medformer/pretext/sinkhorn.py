"""The Sinkhorn operator: scores -> a doubly-stochastic "soft permutation" (Mena et al. 2018).

Why: a jigsaw puzzle of N tiles has N! solutions; classifying over a fixed subset of permutations
(Noroozi & Favaro 2016) needs an output per permutation. Instead, each tile gets a row of N
tile -> position scores ``X``, and the Sinkhorn operator turns ``X / tau`` into a doubly-stochastic
matrix by normalising rows and columns in turn (Sinkhorn 1964). As ``tau -> 0`` the result tends to the
permutation matrix that maximises ``<P, X>`` (the Hungarian assignment), so ``S(X / tau)`` is a
differentiable relaxation of "solve the assignment", whatever N is (Mena et al., "Learning Latent
Permutations with Gumbel-Sinkhorn Networks", ICLR 2018).

Conventions: ``scores[..., i, j]`` is how much tile ``i`` (in shuffled order) belongs at position ``j``.
Everything runs in log space (``logsumexp``), which stays finite at small temperatures.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def log_sinkhorn(
    log_alpha: Tensor, iterations: int = 20, tol: float | None = None, max_iterations: int = 1000
) -> Tensor:
    """``iterations`` rounds of row then column normalisation of ``exp(log_alpha)``, in log space.

    ``log_alpha``: ``(..., N, N)``. Returns ``log S``: every column of ``S`` sums to 1 exactly (the last
    step), every row to 1 up to the convergence of the iteration. A fixed count (Mena et al. use 20) is
    fast and differentiable, but peaked or low-temperature scores converge more slowly; with ``tol`` the
    rounds go on (checked every 10, at most ``max_iterations``) until every row sum is within ``tol`` of 1.
    """
    if log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"Sinkhorn needs square matrices, got {tuple(log_alpha.shape[-2:])}")
    done = 0
    while True:
        for _ in range(iterations if done == 0 else 10):
            log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)  # rows sum to 1
            log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)  # columns sum to 1
        done += iterations if done == 0 else 10
        if tol is None or done >= max_iterations:
            return log_alpha
        with torch.no_grad():
            if float((torch.logsumexp(log_alpha, dim=-1).exp() - 1).abs().max()) <= tol:
                return log_alpha


def sample_gumbel(shape: torch.Size | tuple[int, ...], like: Tensor, eps: float = 1e-20) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)``, ``U ~ Uniform(0, 1)``, on ``like``'s device and dtype."""
    u = torch.rand(shape, device=like.device, dtype=like.dtype)
    return -torch.log(-torch.log(u + eps) + eps)


def sinkhorn(
    scores: Tensor,
    tau: float = 1.0,
    iterations: int = 20,
    noise: float = 0.0,
    tol: float | None = None,
    max_iterations: int = 1000,
) -> Tensor:
    """The (Gumbel-)Sinkhorn operator: ``S((scores + noise * g) / tau)``, a soft permutation ``(..., N, N)``.

    ``noise > 0`` adds Gumbel noise ``g`` scaled by ``noise`` (training only, as in Gumbel-Sinkhorn: a
    sample of a distribution over permutations rather than its mode). ``tol``: see `log_sinkhorn`.
    """
    if tau <= 0:
        raise ValueError(f"Sinkhorn temperature tau must be > 0, got {tau}")
    log_alpha = scores.float()
    if noise > 0:
        log_alpha = log_alpha + noise * sample_gumbel(log_alpha.shape, log_alpha)
    return log_sinkhorn(log_alpha / tau, iterations, tol, max_iterations).exp()


def hungarian(scores: Tensor) -> Tensor:
    """Hard assignment maximising the total score: ``(..., N, N)`` -> ``(..., N)``, entry ``i`` = the
    position given to tile ``i`` (``scipy.optimize.linear_sum_assignment``, one call per matrix)."""
    flat = scores.detach().float().cpu().reshape(-1, *scores.shape[-2:]).numpy()
    out = np.empty(flat.shape[:2], dtype=np.int64)
    for k, matrix in enumerate(flat):
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        out[k, rows] = cols
    return torch.from_numpy(out).reshape(scores.shape[:-1]).to(scores.device)


def permutation_matrix(perm: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``perm (..., N)`` (tile ``i`` goes to position ``perm[i]``) -> one-hot ``P (..., N, N)``,
    ``P[i, perm[i]] = 1``."""
    n = perm.shape[-1]
    return torch.nn.functional.one_hot(perm.long(), n).to(dtype)


def kendall_tau(pred: Tensor, true: Tensor) -> Tensor:
    """Kendall's rank correlation between two permutations per row: ``(..., N)`` -> ``(...)`` in [-1, 1].

    1 = the same order, -1 = reversed; ``(concordant - discordant) / (N (N - 1) / 2)`` over all pairs
    (permutations have no ties, so this equals ``scipy.stats.kendalltau``).
    """
    dp = (pred[..., :, None] - pred[..., None, :]).sign()
    dt = (true[..., :, None] - true[..., None, :]).sign()
    n = pred.shape[-1]
    pairs = n * (n - 1)  # ordered pairs: each unordered pair counted twice, as below
    return (dp * dt).flatten(-2).sum(-1).float() / max(pairs, 1)


__all__ = ["hungarian", "kendall_tau", "log_sinkhorn", "permutation_matrix", "sample_gumbel", "sinkhorn"]
