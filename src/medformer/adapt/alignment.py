"""Unsupervised feature alignment between a labelled source and an unlabelled target collection, as an
objective of the training engine.

Two established methods, chosen by ``method``:

- ``"dann"``: domain-adversarial training (Ganin & Lempitsky 2015): a domain classifier behind a
  gradient reversal layer (`gradient_reversal.py`), binary cross-entropy on source (0) vs target (1).
- ``"coral"``: deep CORAL (Sun & Saenko 2016): the squared Frobenius distance between the source and
  target feature covariances, divided by ``4 d^2``.

The feature is the body's output mean-pooled over the patch tokens (padding excluded): the vector the
task heads' queries attend over. The engine hands an objective one collection's batch at a time, so the
objective draws its target batches itself from its own endless loader; it returns ``None`` for
batches that are not from the source collection.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medformer.adapt.gradient_reversal import DomainClassifier, dann_lambda
from medformer.data.dataset import collate

AlignMethod = Literal["dann", "coral"]


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL: ``||C_s - C_t||_F^2 / (4 d^2)`` for features ``(n, d)`` (n >= 2 each)."""
    d = source.shape[1]

    def covariance(x: Tensor) -> Tensor:
        x = x.float() - x.float().mean(0, keepdim=True)
        return x.T @ x / max(x.shape[0] - 1, 1)

    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)


def pooled_features(model: nn.Module, batch: Mapping[str, Any], collection: str | None = None) -> Tensor:
    """The body's patch tokens of ``batch`` averaged per sample ``(B, D)``; padding tokens excluded.
    ``collection`` overrides the batch's (which latent tokens the body sees)."""
    tokens = model.tokenize(
        batch["images"], batch["modalities"], batch.get("present"), collection or batch["collection"]
    )
    encoded = model.encode(tokens)
    patches = encoded.patches
    pad = encoded.pad
    if pad is None:
        return patches.mean(1)
    keep = (~pad[:, encoded.num_latents :]).to(patches.dtype).unsqueeze(-1)
    return (patches * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def endless(dataset: Dataset, batch_size: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Shuffled batches of ``dataset`` forever (a fresh order every pass)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
        collate_fn=collate, generator=generator,
    )  # fmt: skip
    while True:
        yield from loader


class AlignmentObjective(nn.Module):
    """An engine objective aligning source and target features (see the module docstring).

    ``source``: the labelled collection's name; ``target``: the unlabelled target images;
    ``total_steps``: the run's length, for DANN's lambda schedule (lambda = 1 throughout when None).
    The domain classifier is a module of this objective: give its parameters to the optimizer
    (`parameter_groups`). ``target_collection`` (default: ``source``) is the latent tokens the target
    images are encoded with.
    """

    def __init__(
        self,
        source: str,
        target: Dataset,
        dim: int,
        method: AlignMethod = "dann",
        batch_size: int = 32,
        total_steps: int | None = None,
        target_collection: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if method not in ("dann", "coral"):
            raise ValueError(f"unknown alignment method {method!r} (dann, coral)")
        self.name = f"align_{method}"
        self.method, self.source, self.total_steps = method, source, total_steps
        self.target_collection = target_collection or source
        self.classifier = DomainClassifier(dim) if method == "dann" else None
        self.target = endless(target, batch_size, seed)
        self.calls = 0

    def parameter_groups(self) -> list[dict]:
        """AdamW groups for the domain classifier (empty for CORAL, which has no parameters)."""
        if self.classifier is None:
            return []
        named = list(self.classifier.named_parameters())
        return [{"params": [p for _, p in named], "names": [f"domain_classifier.{n}" for n, _ in named],
                 "weight_decay": 0.0}]  # fmt: skip

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        if batch["collection"] != self.source:
            return None, {}
        device = batch["images"].device
        target = next(self.target)
        target = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in target.items()}
        fs = pooled_features(model, batch)
        ft = pooled_features(model, target, self.target_collection)
        self.calls += 1
        if self.method == "coral":
            loss = coral_loss(fs, ft)
            return loss, {"coral": float(loss.detach())}
        lambd = 1.0 if not self.total_steps else dann_lambda(self.calls / self.total_steps)
        logits = self.classifier(torch.cat([fs, ft]).float(), lambd)
        labels = torch.cat([fs.new_zeros(len(fs)), ft.new_ones(len(ft))]).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        accuracy = float(((logits > 0).float() == labels).float().mean())
        return loss, {"domain_acc": accuracy, "lambda": lambd}
