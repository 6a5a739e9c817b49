"""BrainMVP pre-training (Rui et al., "Multi-modal Vision Pre-training for Medical Image Analysis",
CVPR 2025).

Multi-parametric MRI where every study has its own subset of modalities. Each step encodes **one
modality m of each study** (drawn among those it has), so collections with different modality sets
train together. The crop is cut into ``block_size^3`` blocks and ``mask_ratio`` of them are masked;
masked blocks are *filled*, not dropped, which makes two views of the same study:

- **MD** (modality template distillation): masked blocks of m come from m's learnable template
  (`models/templates.py`), cut at the crop's place in the reference grid; reconstruct m (MSE);
- **CMR** (cross-modal reconstruction): masked blocks of m come from the same blocks of another
  modality of the same study; reconstruct m (MSE);
- **MCL** (modality-aware contrastive learning): the pooled features of the two views of a study are
  positives, other studies (on every rank) negatives; InfoNCE both ways through a projection head.

Total loss, as in the official code: ``10 x MD + CMR + MCL``, MCL switched on late (``mcl_start``: 2/3
of the run) and, for the first ``cmr_warmup`` (1/5 of the run), the second view template-filled too
(the official code: 1000 and 300 of 1500 epochs, the latter "for faster template learning"). A study
with a single modality has no partner for CMR: its second view is template-filled and it leaves the CMR
loss out.

On Medformer: both views go through the body as one batch; the chosen modality's tokens are selected
(`TokenSet.select`), so the body sees one modality's grid per study with its modality embedding. The
reconstruction head is SimMIM's: one Linear from each encoded patch token to its ``p^3`` voxels (the
encoder saw every position, so a light decoder suffices). Masking is in voxel space (`block_mask`):
BrainMVP fills masked blocks where MAE drops tokens (`masking.block_masking`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.models.templates import Align, Placement
from medformer.models.tokenizers import unpatchify
from medformer.pretext.base import PretextTask
from medformer.pretext.contrastive import ProjectionHead, cross_info_nce
from medformer.pretext.registry import register_task

log = logging.getLogger(__name__)


def block_mask(batch: int, spatial: Sequence[int], block_size: int, ratio: float) -> Tensor:
    """A random mask ``(B, *spatial)`` (True = masked) of whole ``block_size^d`` blocks.

    Per sample, ``n - floor(n * (1 - ratio))`` of the ``n`` blocks are masked (the official code's
    count); a grid that is not a multiple of the block size is masked on the rounded-up block grid and
    cut back. Random draws come from torch's global generator.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    grid = [math.ceil(s / block_size) for s in spatial]
    n = math.prod(grid)
    masked = n - math.floor(n * (1.0 - ratio))
    rank = torch.rand(batch, n).argsort(1).argsort(1)  # a random permutation per sample
    mask = (rank < masked).view(batch, *grid)
    for axis in range(len(grid)):
        mask = mask.repeat_interleave(block_size, dim=axis + 1)
    return mask[(slice(None), *(slice(0, s) for s in spatial))]


def random_choice(allowed: Tensor) -> Tensor:
    """One allowed index per row of a bool ``(B, M)`` matrix, uniformly; ``-1`` where none is allowed."""
    scores = torch.rand(allowed.shape).masked_fill(~allowed, -1.0)
    choice = scores.argmax(1)
    return torch.where(allowed.any(1), choice, torch.full_like(choice, -1))


@register_task("brainmvp")
class BrainMVP(PretextTask):
    """CMR + MD + MCL on 3D multi-parametric MRI (module docstring). Weights of 0 switch a part off,
    which gives the paper's ablation: CMR (``md_weight=0, mcl_weight=0``), +MD (``mcl_weight=0``), +MCL.

    ``template_shape``: the reference grid of the templates (e.g. the preprocessed size); ``align``:
    how studies sit on it (`models/templates.py`); ``crop_size``: random crops of the batch's arrays
    (None: the whole array); ``mcl_start`` and ``cmr_warmup``: steps, or fractions of ``total_steps``
    when below 1; ``masked_only``: reconstruction loss on masked voxels only (the official code scores
    every voxel); ``temperature``, ``proj_dim``, ``gather``: MCL's InfoNCE, projection head and
    cross-rank negatives; ``template_lr_scale``: how much faster the templates learn than the network
    (`ModalityTemplates`).
    """

    def __init__(
        self,
        template_shape: Sequence[int],
        *,
        block_size: int = 8,
        mask_ratio: float = 0.8,
        crop_size: Sequence[int] | None = None,
        md_weight: float = 10.0,
        cmr_weight: float = 1.0,
        mcl_weight: float = 1.0,
        mcl_start: float = 2 / 3,
        cmr_warmup: float = 0.2,
        total_steps: int | None = None,
        temperature: float = 0.1,
        proj_dim: int = 128,
        gather: bool = True,
        align: Align = "grid",
        normalise_templates: bool = False,
        template_lr_scale: float = 10.0,
        masked_only: bool = False,
        start_step: int = 0,
    ):
        super().__init__(start_step)
        if min(md_weight, cmr_weight, mcl_weight) < 0 or md_weight + cmr_weight == 0:
            raise ValueError("BrainMVP weights must be >= 0, with MD or CMR switched on")
        if len(template_shape) != 3 or block_size < 1 or temperature <= 0:
            raise ValueError("BrainMVP needs a 3D template_shape, block_size >= 1 and temperature > 0")
        self.template_shape = tuple(int(s) for s in template_shape)
        self.block_size, self.mask_ratio = block_size, mask_ratio
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.weights = {"md": md_weight, "cmr": cmr_weight, "mcl": mcl_weight}
        self.mcl_start = self._steps("mcl_start", mcl_start, total_steps)
        self.cmr_warmup = self._steps("cmr_warmup", cmr_warmup, total_steps)
        self.temperature, self.proj_dim, self.gather = temperature, proj_dim, gather
        self.align, self.normalise_templates = align, normalise_templates
        self.template_lr_scale = template_lr_scale
        self.masked_only = masked_only
        self.step = 0

    @staticmethod
    def _steps(name: str, value: float, total: int | None) -> int:
        """A step number, or a fraction (< 1) of the run's ``total`` steps."""
        if value >= 1 or value == 0:
            return int(value)
        if total is None:
            log.warning(
                "brainmvp: %s=%.3g is a fraction of the run but total_steps is not set: 0", name, value
            )
            return 0
        return int(value * total)

    @property
    def ndim(self) -> int:
        return len(self.template_shape)

    def attach(self, model: nn.Module) -> None:
        """Templates on the model (saved with it), a SimMIM reconstruction head and MCL's projector."""
        model.add_templates(
            self.template_shape, self.align, self.normalise_templates, lr_scale=self.template_lr_scale
        )
        dim, p = model.config.dim, model.input_adaptformer.patch_size(self.ndim)
        self.patch_size = p
        self.decoder = nn.Linear(dim, p**self.ndim)
        nn.init.trunc_normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)
        self.projector = ProjectionHead(dim, out_dim=self.proj_dim)
        self.to(model.body.norm.weight.device)

    def active(self, step: int) -> bool:
        self.step = step  # MCL and the CMR warm-up follow the optimizer step
        return super().active(step)

    # -- views ----------------------------------------------------------------------------------------
    def views(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Random crop, the modality m to encode and its CMR partner per study, and the two block masks."""
        images, present = batch["images"], batch["present"].to(batch["images"].device)
        if images.dim() - 2 != self.ndim:
            return {"skip": f"a {images.dim() - 2}D batch (BrainMVP templates are {self.ndim}D)"}
        placement = Placement.of(batch)
        if self.crop_size is not None:
            images, corner = self._crop(images)
            placement = placement.shifted(corner)
        b, spatial = images.shape[0], tuple(images.shape[2:])
        chosen = random_choice(present.cpu()).to(images.device)
        others = present.clone()
        others[torch.arange(b), chosen] = False
        partner = random_choice(others.cpu()).to(images.device)
        rows = torch.arange(b, device=images.device)
        has_partner = partner >= 0
        return {
            "images": images,
            "modalities": tuple(batch["modalities"]),
            "collection": batch.get("collection"),
            "chosen": chosen,
            "target": images[rows, chosen],
            "partner": images[rows, partner.clamp_min(0)] * has_partner.view(-1, *[1] * len(spatial)),
            "has_partner": has_partner,
            "origin": placement.reference_origin(self.template_shape, self.align),
            "mask_md": block_mask(b, spatial, self.block_size, self.mask_ratio).to(images.device),
            "mask_cmr": block_mask(b, spatial, self.block_size, self.mask_ratio).to(images.device),
        }

    def _crop(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """A random ``crop_size`` window per study, and its corner ``(B, d)``."""
        spatial, b = images.shape[2:], images.shape[0]
        size = [min(c, s) for c, s in zip(self.crop_size, spatial)]
        corner = torch.stack([torch.randint(0, s - c + 1, (b,)) for c, s in zip(size, spatial)], 1)
        crops = [
            img[(slice(None), *(slice(int(o), int(o) + c) for o, c in zip(corner[i], size)))]
            for i, img in enumerate(images)
        ]
        return torch.stack(crops), corner

    # -- loss -----------------------------------------------------------------------------------------
    def fill(self, model: nn.Module, views: Mapping[str, Any], md: bool, cmr: bool) -> dict[str, Tensor]:
        """The template crop and the masked-and-filled inputs ``(B, *spatial)``: ``"md"`` (blocks from
        the template), ``"cmr"`` (blocks from the partner modality; from the template during the warm-up
        and for studies without a partner)."""
        target, spatial = views["target"], tuple(views["target"].shape[1:])
        names = [views["modalities"][int(i)] for i in views["chosen"]]
        template = model.templates.crop(names, views["origin"], spatial).to(target.dtype)
        out = {"template": template}
        if md:
            out["md"] = torch.where(views["mask_md"], template, target)
        if cmr:
            keep = views["has_partner"].view(-1, *[1] * len(spatial)) & (self.step >= self.cmr_warmup)
            cross = torch.where(keep, views["partner"], template)
            out["cmr"] = torch.where(views["mask_cmr"], cross, target)
        return out

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        if "skip" in views:
            return None, {}
        w = self.weights
        use_mcl = w["mcl"] > 0 and self.step >= self.mcl_start
        inputs = self.fill(model, views, md=w["md"] > 0 or use_mcl, cmr=w["cmr"] > 0 or use_mcl)
        parts = [k for k in ("md", "cmr") if k in inputs]
        target, b = views["target"].float(), views["target"].shape[0]
        x = torch.cat([inputs[k] for k in parts])  # the views one after the other, one body pass
        features = self.encode(model, x, views["chosen"].repeat(len(parts)), views)
        recon = self.reconstruct(features, tuple(target.shape[1:])).float()

        total, logs = target.new_zeros(()), {}
        for i, part in enumerate(parts):
            err = (recon[i * b : (i + 1) * b] - target) ** 2
            weight = views[f"mask_{part}"].float() if self.masked_only else torch.ones_like(err)
            if part == "cmr" and self.step >= self.cmr_warmup:  # a study without a partner has no CMR
                weight = weight * views["has_partner"].float().view(-1, *[1] * (err.dim() - 1))
            value = (err * weight).sum() / weight.sum().clamp_min(1.0)
            logs[part] = float(value.detach())
            total = total + w[part] * value
        if use_mcl:  # the two views of a study are positives, every other study a negative
            z = self.projector(features.mean(1))
            value, accuracy = cross_info_nce(z[:b], z[b:], self.temperature, self.gather)
            total = total + w["mcl"] * value
            logs.update(mcl=float(value.detach()), mcl_top1=float(accuracy))
        return total, logs

    def encode(self, model: nn.Module, x: Tensor, chosen: Tensor, views: Mapping[str, Any]) -> Tensor:
        """Encode one modality per sample: ``x (N, *spatial)`` placed as modality ``chosen[n]`` -> the
        encoded patch tokens ``(N, G, D)`` in grid order."""
        n, m = x.shape[0], len(views["modalities"])
        onehot = F.one_hot(chosen, m).bool()
        images = x[:, None] * onehot.view(n, m, *[1] * (x.dim() - 1)).to(x.dtype)
        collection = views["collection"] if views["collection"] in model.collections else None
        tokens = model.tokenize(images, views["modalities"], onehot, collection)
        g = tokens.num_patches
        # tokenize dropped modalities no sample has: find each chosen modality's slot in the TokenSet
        slot = torch.tensor([tokens.modalities.index(views["modalities"][int(c)]) for c in chosen])
        index = slot.to(x.device)[:, None] * g + torch.arange(g, device=x.device)
        tokens = replace(tokens.select(index), pad=None, full=True)  # one whole grid per sample
        return model.encode(tokens).patches

    def reconstruct(self, features: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """SimMIM's linear head: each token -> its ``p^d`` voxels, back on the grid, cut to ``spatial``."""
        p = self.patch_size
        grid = tuple(math.ceil(s / p) for s in spatial)
        patches = self.decoder(features)[:, None]  # (N, 1, G, p^d)
        volume = unpatchify(patches, grid, p)[:, 0]
        return volume[(slice(None), *(slice(0, s) for s in spatial))]

    # -- picture --------------------------------------------------------------------------------------
    @torch.no_grad()
    def visualise(self, model: nn.Module, batch: Mapping[str, Any]) -> Any | None:
        """Mid-slices per study: the encoded modality, both filled views, their reconstructions and
        the template crop."""
        from medformer.pretext.figures import image_grid

        views = self.views(batch)
        if "skip" in views:
            return None
        inputs = self.fill(model, views, md=True, cmr=True)
        b, spatial = views["target"].shape[0], tuple(views["target"].shape[1:])
        features = self.encode(
            model, torch.cat([inputs["md"], inputs["cmr"]]), views["chosen"].repeat(2), views
        )
        recon = self.reconstruct(features, spatial)
        columns = {
            "modality m": views["target"],
            "template view (MD)": inputs["md"],
            "cross-modal view (CMR)": inputs["cmr"],
            "from MD view": recon[:b],
            "from CMR view": recon[b:],
            "template": inputs["template"],
        }
        title = "BrainMVP: masked blocks of m filled (MD: template, CMR: another modality), m rebuilt"
        return image_grid({k: v[:, None] for k, v in columns.items()}, title)
