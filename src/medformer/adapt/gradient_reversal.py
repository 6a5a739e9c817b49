"""Domain-adversarial training (DANN, Ganin & Lempitsky 2015): a gradient reversal layer and the
domain classifier it feeds.

The gradient reversal layer (GRL) is the identity going forward and multiplies the gradient by
``-lambda`` going back. Put between the encoder's features and a domain classifier, one backward pass
trains the classifier to tell source from target while pushing the encoder the other way, towards
features the classifier cannot separate (a min-max game in a single minimisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class GradientReversal(torch.autograd.Function):
    """Identity forward; ``grad * -lambda`` backward (``lambda`` gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.lambd, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """``x`` unchanged, with its gradient reversed and scaled by ``lambd`` on the way back."""
    return GradientReversal.apply(x, lambd)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky's schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at the start of training
    (``p = 0``), when the features are still noise and the adversary would only disturb them, rising
    to ~1 at the end (``p = 1``)."""
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class DomainClassifier(nn.Module):
    """A small MLP: pooled features ``(B, D)`` -> one source-vs-target logit per sample, behind a GRL."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor, lambd: float = 1.0) -> Tensor:
        return self.net(grad_reverse(features, lambd)).squeeze(-1)
