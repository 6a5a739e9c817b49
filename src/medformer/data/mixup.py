"""Mixup (Zhang et al. 2018): train on convex combinations of pairs of studies and of their labels.

Why: on a few hundred labelled images a transformer memorises the training set within a few epochs
(BreastMNIST: 546 images; validation AUC peaks, then falls). Mixing each study with another of the
same batch, ``x = lam * x_i + (1 - lam) * x_j`` with ``lam ~ Beta(alpha, alpha)``, and asking for
``lam * loss(y_i) + (1 - lam) * loss(y_j)`` regularises it towards linear behaviour between studies; it
is a standard part of training vision transformers on small data (DeiT, Touvron et al. 2021).

One ``lam`` per batch and one permutation of the batch, drawn from torch's global generator (which the
engine seeds per rank and checkpoints, so a resumed run draws the same mixes). A modality is present in
a mixed study only where both studies have it; a study that shares no modality with its partner is left
unmixed (paired with itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def mixup(batch: Mapping[str, Any], alpha: float) -> tuple[dict[str, Any], Tensor, float]:
    """Mix each study of ``batch`` with ``batch[perm]``: returns the mixed batch, ``perm`` and ``lam``.

    Labels are left as they are: the loss of the mixed batch is ``lam * loss(labels) + (1 - lam) *
    loss(labels[perm])`` (`medformer.losses.SupervisedObjective` does this for every task).
    """
    if alpha <= 0:
        raise ValueError(f"mixup needs alpha > 0, got {alpha}")
    images = batch["images"]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.shape[0]).to(images.device)
    shared = (batch["present"] & batch["present"][perm]).any(dim=1)
    perm = torch.where(shared, perm, torch.arange(len(perm), device=perm.device))
    present = batch["present"] & batch["present"][perm]
    mixed = lam * images + (1 - lam) * images[perm]
    shape = present.shape + (1,) * (images.dim() - present.dim())
    out = dict(batch)
    out["images"] = mixed * present.view(shape).to(mixed.dtype)
    out["present"] = present
    return out, perm, lam
