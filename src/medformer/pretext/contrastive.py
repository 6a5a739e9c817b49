"""Contrastive learning: SimCLR (Chen et al. 2020) with the InfoNCE / NT-Xent loss, across ranks.

Two random views of every study (a random crop resized back to the full grid, then flips, small
rotations, intensity scale / shift, gamma, Gaussian noise and blur: the batched MONAI-style transforms
of `medformer.data.augment`) are encoded by the model, mean-pooled over the patch tokens, and mapped by a
projection head (an MLP) to a unit vector ``z``. For ``2N`` views of ``N`` studies, each view's positive
is the other view of its study and its negatives are the other ``2N - 2`` views::

    loss = mean_i  -log( exp(z_i . z_pos(i) / t) / sum_{j != i} exp(z_i . z_j / t) )

Why it helps: the body learns to give the same embedding to an image whatever its crop, orientation,
contrast and noise, so features that survive acquisition differences (anatomy, lesion shape) are kept and
nuisance ones dropped; the pooled embedding becomes linearly useful, which is what a classifier trained
on very few labels can exploit.

Under `torchrun`, every rank's embeddings are gathered with gradients (`gather_with_grad`), so each view
is contrasted with the views of the *global* batch, and the loss and the averaged gradients equal those
of one process on the whole batch. `info_nce`, `cross_info_nce`, `pool_tokens` and `ProjectionHead` are
shared with the other embedding-agreement tasks (cross-dimensional consistency).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.config import AugmentConfig
from medformer.data.augment import Augment, warp
from medformer.models.tokenizers import Encoded
from medformer.pretext.base import PretextTask
from medformer.pretext.registry import register_task
from medformer.train.distributed import Gathered, gather_with_grad

# SimCLR-style views for grey-level medical images: mild geometry, strong intensity changes, no colour
DEFAULT_VIEW = AugmentConfig(
    flip=0.5, rotate=15.0, intensity_scale=0.25, intensity_shift=0.1, gamma=0.3, noise=0.05,
    blur=1.0, blur_prob=0.3,
)  # fmt: skip


def pool_tokens(encoded: Encoded) -> Tensor:
    """The mean of the encoded patch tokens ``(B, D)``, padding (absent modalities) left out."""
    x = encoded.patches
    if encoded.pad is None:
        return x.mean(dim=1)
    keep = (~encoded.pad[:, encoded.num_latents :]).to(x.dtype)[..., None]
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1)


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP, with a LayerNorm in place of BatchNorm (no batch statistics to keep in
    step across ranks and one-collection micro-batches): LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _gather(x: Tensor, gather: bool) -> Gathered:
    return gather_with_grad(x) if gather else Gathered(x, [x.shape[0]], 0)


def _halves(g: Gathered) -> tuple[Tensor, Tensor]:
    """Row indices of the first and the second half of every rank's block (its ``[a_r; b_r]``)."""
    first, second, offset = [], [], 0
    for size in g.sizes:
        half = size // 2
        first.append(torch.arange(offset, offset + half))
        second.append(torch.arange(offset + half, offset + size))
        offset += size
    return torch.cat(first).to(g.rows.device), torch.cat(second).to(g.rows.device)


def info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.1, gather: bool = True) -> tuple[Tensor, Tensor]:
    """SimCLR's NT-Xent between paired views ``z1[i] <-> z2[i]`` ``(n, d)``: (loss, top-1 accuracy).

    Every view is an anchor; its keys are all other views. With ``gather`` and a process group the keys
    are every rank's views (gradients flow back to each rank's rows) and the anchors this rank's, so the
    mean over ranks is the loss of the global batch.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d): this rank's block [z1; z2]
    n = z1.shape[0]
    g = _gather(z, gather)
    logits = z @ g.rows.T / temperature  # (2n, 2N)
    rows = torch.arange(2 * n, device=z.device)
    own = g.start + rows
    logits = logits.masked_fill(F.one_hot(own, g.rows.shape[0]).bool(), float("-inf"))
    positive = g.start + (rows + n) % (2 * n)  # z1[i] <-> z2[i], inside this rank's block
    loss = F.cross_entropy(logits, positive)
    return loss, (logits.argmax(dim=1) == positive).float().mean().detach()


def cross_info_nce(
    a: Tensor, b: Tensor, temperature: float = 0.1, gather: bool = True
) -> tuple[Tensor, Tensor]:
    """InfoNCE across two kinds of embedding (CLIP's symmetric loss): ``a[i]`` must pick ``b[i]`` among
    all ``b`` of the (global) batch, and ``b[i]`` must pick ``a[i]`` among all ``a``; (loss, top-1)."""
    x = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    g = _gather(x, gather)
    first, second = _halves(g)
    keys_a, keys_b = g.rows[first], g.rows[second]
    target = g.start // 2 + torch.arange(n, device=x.device)
    logits_ab = x[:n] @ keys_b.T / temperature
    logits_ba = x[n:] @ keys_a.T / temperature
    loss = 0.5 * (F.cross_entropy(logits_ab, target) + F.cross_entropy(logits_ba, target))
    return loss, (logits_ab.argmax(dim=1) == target).float().mean().detach()


def random_resized_crop(images: Tensor, scale: tuple[float, float] = (0.4, 1.0)) -> Tensor:
    """Per sample, a random axis-aligned crop covering ``scale`` of the image (area in 2D, volume in 3D),
    resized back to the full grid (one batched ``grid_sample``, like torchvision's RandomResizedCrop)."""
    lo, hi = scale
    if lo >= 1.0:
        return images
    b, ndim = images.shape[0], images.dim() - 2
    fraction = torch.empty(b).uniform_(lo, hi)
    side = fraction ** (1.0 / ndim)  # the crop's extent along each axis, as a fraction of the image
    centre = (torch.rand(b, ndim) * 2 - 1) * (1 - side)[:, None]  # keeps the crop inside the image
    theta = torch.cat([torch.diag_embed(side[:, None].expand(b, ndim)), centre[..., None]], dim=2)
    return warp(images.float(), theta.to(images.device), "bilinear")


def encode_pooled(model: nn.Module, batch: Mapping[str, Any], images: Tensor | None = None) -> Tensor:
    """Encode a batch (or other ``images`` with the batch's modalities) -> pooled embedding ``(B, D)``."""
    images = batch["images"] if images is None else images
    tokens = model.tokenize(images, batch["modalities"], batch.get("present"), batch.get("collection"))
    return pool_tokens(model.encode(tokens))


@register_task("contrastive")
class Contrastive(PretextTask):
    """SimCLR / InfoNCE between two augmented views of each study (see the module docstring).

    ``temperature`` of the softmax; projection head ``hidden_dim -> proj_dim``; ``crop_scale``: the range
    of the random crop's share of the image; ``augment``: the view transforms (default `DEFAULT_VIEW`);
    ``gather``: contrast with every rank's views under torchrun.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        proj_dim: int = 128,
        hidden_dim: int = 512,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        augment: AugmentConfig | None = None,
        gather: bool = True,
        start_step: int = 0,
    ):
        super().__init__(start_step)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.temperature, self.gather = temperature, gather
        self.crop_scale = tuple(crop_scale)
        self.augment = Augment(augment if augment is not None else DEFAULT_VIEW)
        self.sizes = (hidden_dim, proj_dim)
        self.projector: ProjectionHead | None = None

    def attach(self, model: nn.Module) -> None:
        device = model.body.norm.weight.device
        self.projector = ProjectionHead(model.config.dim, *self.sizes).to(device)

    def view(self, batch: Mapping[str, Any]) -> Tensor:
        """One random view of the batch's images."""
        cropped = {**batch, "images": random_resized_crop(batch["images"], self.crop_scale)}
        return self.augment(cropped)["images"]

    def views(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {**batch, "view1": self.view(batch), "view2": self.view(batch)}

    def embed(self, model: nn.Module, batch: Mapping[str, Any], images: Tensor) -> Tensor:
        return self.projector(encode_pooled(model, batch, images))

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        z1 = self.embed(model, views, views["view1"])
        z2 = self.embed(model, views, views["view2"])
        loss, accuracy = info_nce(z1, z2, self.temperature, self.gather)
        return loss, {"top1": float(accuracy)}

    @torch.no_grad()
    def visualise(self, model: nn.Module, batch: Mapping[str, Any]) -> Any | None:
        from medformer.pretext.figures import similarity_figure

        views = self.views(batch)
        z1 = F.normalize(self.embed(model, views, views["view1"]).float(), dim=1)
        z2 = F.normalize(self.embed(model, views, views["view2"]).float(), dim=1)
        return similarity_figure(
            {"view 1": views["view1"], "view 2": views["view2"]},
            z1 @ z2.T,
            f"contrastive: two views per study (t = {self.temperature})",
        )
