"""Source prediction (Medformer-native): tell the collection and the modality from the pixels alone.

Medformer normally *tells* the body what it is looking at: a learned latent token per collection is
prepended to the sequence and a learned embedding per modality is added to every token. This task takes
both away and asks the body to recover them:

- the tokens are made without the collection's latent tokens (``collection=None``), the modality
  embedding is subtracted from every token (``hide_modality``), and only a random ``keep_ratio`` of the
  tokens is encoded (a partial view, so the answer must come from local appearance, not a global trick);
- a linear head on the mean of the encoded tokens predicts the **collection** (cross-entropy over every
  collection the model knows), and a linear head on each encoded token predicts that token's
  **modality** (cross-entropy over the model's modality vocabulary).

Why it helps: to name the source from a partial view, the body must encode what differs between
acquisitions and body parts (the speckle of ultrasound, the projection look of an X-ray, the sharp
edges of a CT mask, the tissue contrast of T1 against T2), which is the same "what am I looking at"
summary a downstream head needs, now computed from the image itself. A fine-tuned collection the model
never saw gets fresh, untrained latent tokens; a body that can infer the source from content does not
depend on them. On multi-contrast MRI the per-token modality head is a contrast-recognition task per
patch (which tissue looks how in which sequence). The task is easy and is solved early, so it is meant
as a light auxiliary (weight about 0.1) next to MAE or contrastive learning, not on its own.

The heads are sized when the task is attached: register every collection and modality on the model
first (`medformer pretrain` does). A task that has only one class to tell apart skips that part.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.pretext.base import PretextTask
from medformer.pretext.contrastive import pool_tokens
from medformer.pretext.masking import random_masking
from medformer.pretext.registry import register_task


def classifier(dim: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))


@register_task("source")
class SourcePrediction(PretextTask):
    """Predict the collection (per study) and the modality (per token) with both withheld.

    ``keep_ratio``: the share of tokens encoded; ``hide_modality``: subtract the modality embedding;
    ``collection_weight`` / ``modality_weight``: the two parts' weights in the task's loss.
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        hide_modality: bool = True,
        collection_weight: float = 1.0,
        modality_weight: float = 1.0,
        start_step: int = 0,
    ):
        super().__init__(start_step)
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio, self.hide_modality = keep_ratio, hide_modality
        self.collection_weight, self.modality_weight = collection_weight, modality_weight
        self.collections: list[str] = []
        self.modalities: list[str] = []

    def attach(self, model: nn.Module) -> None:
        self.collections, self.modalities = list(model.collections), list(model.modalities)
        dim, device = model.config.dim, model.body.norm.weight.device
        self.collection_head = classifier(dim, max(len(self.collections), 1)).to(device)
        self.modality_head = classifier(dim, max(len(self.modalities), 1)).to(device)

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Collection logits ``(B, C)``, per-token modality logits ``(B, K, M)``, each kept token's
        modality index in the model's vocabulary ``(B, K)``, and its weight (0 = padding) ``(B, K)``."""
        tokens = model.tokenize(batch["images"], batch["modalities"], batch.get("present"), None)
        if self.hide_modality:
            embed = torch.stack([model.input_adaptformer.modality_embed[m] for m in tokens.modalities])
            tokens = replace(tokens, tokens=tokens.tokens - embed.to(tokens.tokens.dtype)[tokens.modality])
        visible = None if self.keep_ratio >= 1 else random_masking(tokens, 1 - self.keep_ratio).visible
        encoded = model.encode(tokens, visible=visible)
        kept = encoded.tokenset
        vocab = torch.tensor([self.modalities.index(m) for m in kept.modalities], device=kept.modality.device)
        weight = torch.ones_like(kept.modality, dtype=encoded.tokens.dtype)
        if kept.pad is not None:
            weight = weight * (~kept.pad).to(weight.dtype)
        collection_logits = self.collection_head(pool_tokens(encoded))
        modality_logits = self.modality_head(encoded.patches)
        return collection_logits, modality_logits, vocab[kept.modality], weight

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        collection = views.get("collection")
        if collection not in self.collections:
            raise ValueError(
                f"source prediction: collection {collection!r} was not registered on the model when the "
                f"task was attached (known: {self.collections}); add every collection before building "
                "the Pretrainer"
            )
        unknown = [m for m in views["modalities"] if m not in self.modalities]
        if unknown:
            raise ValueError(f"source prediction: modalities {unknown} were not registered when attached")
        use_collection = len(self.collections) > 1 and self.collection_weight > 0
        use_modality = len(self.modalities) > 1 and self.modality_weight > 0
        if not (use_collection or use_modality):
            return None, {}
        col_logits, mod_logits, mod_target, weight = self.predict(model, views)
        total: Tensor = col_logits.new_zeros(())
        logs: dict[str, float] = {}
        if use_collection:
            target = torch.full(
                (col_logits.shape[0],), self.collections.index(collection), device=col_logits.device
            )
            loss = F.cross_entropy(col_logits.float(), target)
            total = total + self.collection_weight * loss
            logs["collection_loss"] = float(loss.detach())
            logs["collection_acc"] = float((col_logits.argmax(1) == target).float().mean())
        if use_modality:
            per_token = F.cross_entropy(
                mod_logits.float().flatten(0, 1), mod_target.flatten(), reduction="none"
            )
            w = weight.flatten().float()
            loss = (per_token * w).sum() / w.sum().clamp_min(1)
            total = total + self.modality_weight * loss
            logs["modality_loss"] = float(loss.detach())
            hit = (mod_logits.argmax(-1) == mod_target).float().flatten()
            logs["modality_acc"] = float((hit * w).sum() / w.sum().clamp_min(1))
        return total, logs

    @torch.no_grad()
    def visualise(self, model: nn.Module, batch: dict[str, Any]) -> Any | None:
        if len(self.collections) < 2:
            return None
        from matplotlib.figure import Figure

        from medformer.pretext.figures import middle_slice

        col_logits = self.predict(model, dict(batch))[0].float().softmax(1)
        rows = min(4, col_logits.shape[0])
        fig = Figure(figsize=(6.5, 2.0 * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, 2, squeeze=False, width_ratios=[1, 2])
        for r in range(rows):
            axes[r, 0].imshow(middle_slice(batch["images"][r, 0]), cmap="gray")
            axes[r, 0].set_axis_off()
            axes[r, 1].barh(self.collections, col_logits[r].cpu().numpy())
            axes[r, 1].set_xlim(0, 1)
            axes[r, 1].tick_params(labelsize=7)
        fig.suptitle(f"source prediction: which collection? (truth: {batch['collection']})", fontsize=10)
        return fig
