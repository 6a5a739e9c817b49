"""AdamW parameter groups (weight decay, fine-tuning modes, layer-wise LR decay) and the LR schedule.

A parameter group is a plain dict for `torch.optim.AdamW` plus an ``lr_scale`` multiplier: the engine
gives a group without ``lr`` the learning rate ``config.lr * lr_scale``, and the schedule multiplies every
group's rate by the same factor, so the ratios between groups hold throughout training.

Fine-tuning modes (`finetune_param_groups`):

- ``full``: every parameter trains (with the usual decay / no-decay split).
- ``linear``: the body and the input adaptformer are frozen (``requires_grad=False``); only the task heads
  train. For Medformer a "linear probe" is therefore a *head* probe: each head is a small query
  cross-attention block and a Linear, not a single Linear on a pooled feature.
- ``attentive``: frozen body, trainable attentive-probe heads (learned queries cross-attending to the
  frozen tokens, as in V-JEPA / AIM). Medformer's `QueryHead` already *is* such a head, so for Medformer
  this is the same parameter set as ``linear``; the name records the intent in configs and results.
- ``llrd``: everything trains, with layer-wise learning-rate decay (BEiT, Bao et al. 2022): head x1,
  body block ``i`` (0-based) x ``layer_decay ** (depth - i)``, tokenizers and embeddings
  x ``layer_decay ** (depth + 1)``; the body's final norm counts as the top (x1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

FinetuneMode = Literal["full", "linear", "attentive", "llrd"]
NO_DECAY_WORDS = ("embed", "latent", "token", "query", "queries")
HEAD_PREFIXES = ("output_adaptformer.", "heads.")  # Medformer, the CNN baselines


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm scales (all 1-D) and embeddings / latent / query tokens are not decayed: decaying
    them pulls learned offsets and token vectors to zero without regularising anything useful."""
    return param.ndim <= 1 or any(w in name.lower() for w in NO_DECAY_WORDS)


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and a not-decayed group."""
    return _grouped(((n, p, 1.0) for n, p in model.named_parameters() if p.requires_grad), weight_decay)


def _grouped(items: Iterable[tuple[str, nn.Parameter, float]], weight_decay: float) -> list[dict]:
    """Bucket (name, param, lr_scale) by (lr_scale, decayed?) into AdamW groups, in first-seen order."""
    buckets: dict[tuple[float, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p, scale in items:
        buckets.setdefault((scale, not no_weight_decay(name, p)), []).append((name, p))
    return [
        {
            "params": [p for _, p in named],
            "names": [n for n, _ in named],
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": scale,
        }
        for (scale, decay), named in buckets.items()
    ]


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def layer_scale(name: str, depth: int, layer_decay: float) -> float:
    """The LR multiplier of one parameter under layer-wise decay (see the module docstring)."""
    if is_head(name) or name.startswith("body.norm."):
        return 1.0
    if name.startswith("body.blocks."):
        i = int(name.split(".")[2])
        return layer_decay ** (depth - i)
    return layer_decay ** (depth + 1)  # input adaptformer: tokenizers, modality / collection / task tokens


def finetune_param_groups(
    model: nn.Module, mode: FinetuneMode, lr: float, weight_decay: float, layer_decay: float = 0.75
) -> list[dict]:
    """Parameter groups for a fine-tuning mode (see the module docstring). ``linear``/``attentive`` set
    ``requires_grad=False`` on everything but the heads, so the frozen weights stay bit-identical;
    ``full``/``llrd`` set it back to True everywhere. Each group carries ``lr = lr * lr_scale``."""
    named = list(model.named_parameters())
    if mode in ("linear", "attentive"):
        heads = [n for n, _ in named if is_head(n)]
        if not heads:
            raise ValueError(f"fine-tuning mode {mode!r}: the model has no head parameters ({HEAD_PREFIXES})")
        for n, p in named:
            p.requires_grad_(is_head(n))
        items = [(n, p, 1.0) for n, p in named if p.requires_grad]
    elif mode == "full":
        items = [(n, p.requires_grad_(True), 1.0) for n, p in named]
    elif mode == "llrd":
        blocks = getattr(getattr(model, "body", None), "blocks", None)
        if blocks is None:
            raise ValueError("fine-tuning mode 'llrd' needs a model with body.blocks (a Medformer)")
        items = [(n, p.requires_grad_(True), layer_scale(n, len(blocks), layer_decay)) for n, p in named]
    else:
        raise ValueError(f"unknown fine-tuning mode {mode!r} (full, linear, attentive, llrd)")
    groups = _grouped(items, weight_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


@dataclass
class WarmupCosine:
    """LR factor at step ``s`` (0-based, the step about to be taken): linear warm-up to 1 over
    ``warmup`` steps, then a cosine from 1 down to ``min_ratio`` at ``total``. A callable object (not a
    lambda) so `LambdaLR.state_dict` can save it."""

    total: int
    warmup: int = 0
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
