"""Exponential moving average of the weights (Polyak averaging): a smoother model for evaluation.

``shadow = d_t * shadow + (1 - d_t) * weights`` after optimizer step ``t``, over every floating-point
entry of the state dict (parameters and float buffers; integer buffers are copied). `applied` swaps the
averaged weights into the model for evaluation or saving and swaps the training weights back after.

The decay warms up, ``d_t = min(decay, (1 + t) / (10 + t))`` (as in TensorFlow's and timm's EMA): with a
fixed 0.99, a quarter of the average is still the random initialisation after 136 steps, and a
batch-normalised network with such mixed weights scored validation AUC 0.73 where its weights scored 0.99
(PneumoniaMNIST). Keyed on the step, not on a call count, so a resumed run averages exactly alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay applied after optimizer step ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (0-based) into the average."""
        weight = 1.0 - self.decay_at(step)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.to(s.dtype), weight)
            else:
                s.copy_(v)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights again after it."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
