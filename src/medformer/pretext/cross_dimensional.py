"""Cross-dimensional consistency (Medformer-native): a 2D slice's embedding agrees with its 3D volume's.

Medformer reads 2D images with a 2D patch tokenizer and 3D volumes with a 3D one, then runs both through
one body. Nothing in supervised training ties the two paths together: a 2D X-ray collection and a 3D CT
collection could live in separate corners of the token space and share nothing but weights. This task
ties them. For every 3D study in a batch, a random slice is cut (along one axis per batch, from the
central ``central`` share of that axis, where the anatomy is) and read as a 2D image; volume and slice
are encoded separately (same collection latent tokens, same modalities), mean-pooled, projected by one
shared head, and a symmetric InfoNCE loss (CLIP's; `contrastive.cross_info_nce`, negatives gathered
across ranks) makes each slice's embedding closest to its own volume's among all volumes of the
(global) batch, and each volume's closest to its own slice's among all slices.

Why it helps: the 2D path must learn to recognise, from one slice, the study that the 3D path sees whole,
so what the body learns on 3D data transfers to 2D inputs and the other way round; a 2D collection
pre-trained next to 3D ones borrows their anatomy. It also teaches the 3D embedding to summarise what
every slice holds (it must match all of them), a view-invariance that augmentations cannot produce.
Batches of 2D collections have no volume: the task skips them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.pretext.base import PretextTask
from medformer.pretext.contrastive import ProjectionHead, cross_info_nce, encode_pooled
from medformer.pretext.registry import register_task


def random_slices(volumes: Tensor, axis: int, central: float = 0.5) -> tuple[Tensor, Tensor]:
    """One slice per study of ``volumes`` ``(B, M, D, H, W)`` along spatial ``axis`` -> ``(B, M, ...)``
    2D images and the slice indices ``(B,)``, drawn from the central ``central`` share of the axis."""
    b, size = volumes.shape[0], volumes.shape[2 + axis]
    lo = round(size * (1 - central) / 2)
    hi = max(lo + 1, size - lo)
    index = torch.randint(lo, hi, (b,)).to(volumes.device)
    moved = volumes.movedim(2 + axis, 2)  # (B, M, S, ., .)
    return moved[torch.arange(b, device=volumes.device), :, index], index


@register_task("crossdim")
class CrossDimensional(PretextTask):
    """InfoNCE between each 3D study and one of its 2D slices (see the module docstring).

    ``axis``: the spatial axis to slice (0, 1, 2; null: a random axis per batch); ``central``: the share
    of that axis slices are drawn from; ``temperature``, ``hidden_dim``, ``proj_dim``, ``gather`` as in
    the contrastive task.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        proj_dim: int = 128,
        hidden_dim: int = 512,
        axis: int | None = None,
        central: float = 0.5,
        gather: bool = True,
        start_step: int = 0,
    ):
        super().__init__(start_step)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if axis is not None and axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1, 2 or null (random), got {axis}")
        if not 0 < central <= 1:
            raise ValueError(f"central must be in (0, 1], got {central}")
        self.temperature, self.axis, self.central, self.gather = temperature, axis, central, gather
        self.sizes = (hidden_dim, proj_dim)
        self.projector: ProjectionHead | None = None

    def attach(self, model: nn.Module) -> None:
        self.projector = ProjectionHead(model.config.dim, *self.sizes).to(model.body.norm.weight.device)

    def views(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if batch["images"].dim() != 5:
            return {**batch, "slices": None}
        axis = self.axis if self.axis is not None else int(torch.randint(0, 3, ()))
        slices, index = random_slices(batch["images"], axis, self.central)
        return {**batch, "slices": slices, "slice_axis": axis, "slice_index": index}

    def embeddings(self, model: nn.Module, views: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Projected embeddings of the slices (2D path) and of their volumes (3D path), ``(B, d)`` each."""
        z2d = self.projector(encode_pooled(model, views, views["slices"]))
        z3d = self.projector(encode_pooled(model, views))
        return z2d, z3d

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        if views.get("slices") is None:
            return None, {}  # a 2D collection: no volume to agree with
        z2d, z3d = self.embeddings(model, views)
        loss, accuracy = cross_info_nce(z2d, z3d, self.temperature, self.gather)
        with torch.no_grad():
            agreement = F.cosine_similarity(z2d.float(), z3d.float(), dim=1).mean()
        return loss, {"top1": float(accuracy), "cosine": float(agreement)}

    @torch.no_grad()
    def visualise(self, model: nn.Module, batch: Mapping[str, Any]) -> Any | None:
        views = self.views(batch)
        if views["slices"] is None:
            return None
        from medformer.pretext.figures import similarity_figure

        z2d, z3d = (F.normalize(z.float(), dim=1) for z in self.embeddings(model, views))
        return similarity_figure(
            {f"slice (axis {views['slice_axis']})": views["slices"], "volume": views["images"]},
            z2d @ z3d.T,
            "cross-dimensional consistency: slice vs volume embeddings",
        )
