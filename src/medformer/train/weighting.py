"""How the objectives' losses add up to the one loss we differentiate.

- ``fixed``: ``L = sum_i w_i L_i`` with the given weights (default 1).
- ``uncertainty`` (Kendall, Gal & Cipolla 2018): ``L = sum_i exp(-s_i) w_i L_i + s_i`` with a learned
  log-variance ``s_i`` per objective, trained with the model. An objective whose loss is large or noisy
  gets a larger ``s_i`` and so a smaller weight ``exp(-s_i)``; the ``+ s_i`` term stops every weight from
  collapsing to zero. No weight tuning between objectives whose losses have different scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn


class LossWeighting(nn.Module):
    def __init__(
        self,
        names: Sequence[str],
        weights: Mapping[str, float] | None = None,
        mode: Literal["fixed", "uncertainty"] = "fixed",
    ):
        super().__init__()
        unknown = sorted(set(weights or {}) - set(names))
        if unknown:
            raise ValueError(f"loss weights for unknown objectives {unknown} (objectives: {list(names)})")
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {list(names)}")
        self.names = list(names)
        self.weights = [float((weights or {}).get(n, 1.0)) for n in self.names]
        self.mode = mode
        self.log_vars = nn.Parameter(torch.zeros(len(names))) if mode == "uncertainty" else None

    def term(self, i: int, loss: Tensor) -> Tensor:
        """Objective ``i``'s share of the total loss."""
        weighted = self.weights[i] * loss
        if self.log_vars is None:
            return weighted
        s = self.log_vars[i]
        return torch.exp(-s) * weighted + s

    def logs(self) -> dict[str, float]:
        if self.log_vars is None:
            return {}
        return {f"weight/{n}": float(torch.exp(-s)) for n, s in zip(self.names, self.log_vars.detach())}
