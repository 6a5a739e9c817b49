"""Masked image modelling: MAE (He et al. 2022) on Medformer's tokens, 2D and 3D with one decoder.

Each step hides ``mask_ratio`` (0.75) of every sample's patch tokens (`masking.py`: uniformly at random,
or BrainMVP's 8^3 blocks), the Main Body encodes **only the visible tokens** (with the collection's latent
tokens; the cost of the body falls about 4x), and a light decoder (a few narrow transformer blocks) puts
a learned mask token at every hidden place, adds the grid position and modality of every place, and
predicts the pixels of each patch. The loss is the mean squared error on the hidden patches only, with
each target patch normalised by its own mean and standard deviation (MAE's ``norm_pix_loss``: the model
must predict structure, not brightness).

Why it helps: to fill a hidden patch from a quarter of the image the body must model anatomy and
texture, which is what a classifier needs later; and it needs no augmentation (an augmentation that is
wrong for an image type cannot hurt it). Since modalities are masked on separate draws, a cell hidden in
one contrast is often visible in another, so on multi-contrast studies part of the task is cross-modal
prediction.

The decoder is shared by 2D and 3D (its blocks work on tokens); only its last Linear (tokens to ``p^d``
pixels) exists once per dimensionality. Padding tokens (a modality a sample lacks) are neither encoded
nor scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medformer.models.body import Block
from medformer.models.tokenizers import (
    Encoded,
    TokenSet,
    pad_to_multiple,
    patchify,
    scatter_tokens,
    sincos_position_embedding,
    tokens_to_image,
)
from medformer.pretext.base import PretextTask
from medformer.pretext.masking import Masking, make_masking
from medformer.pretext.registry import register_task


def patch_targets(tokens: TokenSet) -> Tensor:
    """The pixels of every token's patch, ``(B, N, p^d)`` in token order (modality-major)."""
    x = pad_to_multiple(tokens.images, tokens.patch_size)
    return patchify(x, tokens.patch_size).flatten(1, 2)


def normalise_patches(target: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch standardisation (MAE's ``norm_pix_loss``): normalised target, mean, std."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std


def pixel_mask(masking: Masking, tokens: TokenSet) -> Tensor:
    """The masking as a pixel map ``(B, M, *spatial)`` (True = hidden from the encoder)."""
    size = tokens.patch_size**tokens.ndim
    hidden = masking.mask[..., None].expand(-1, -1, size).to(torch.float32)
    return tokens_to_image(hidden, tokens) > 0.5


class MAEDecoder(nn.Module):
    """MAE's light decoder: visible tokens + mask tokens, positions and modalities -> patch pixels."""

    def __init__(self, dim: int, decoder_dim: int, depth: int, heads: int, patch_sizes: Mapping[int, int]):
        super().__init__()
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(dim, decoder_dim)
        self.modality = nn.Linear(dim, decoder_dim, bias=False)  # from the model's modality embeddings
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, heads, 4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.ModuleDict({f"{d}d": nn.Linear(decoder_dim, p**d) for d, p in patch_sizes.items()})
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: Encoded, tokens: TokenSet, masking: Masking, modality_embed: Tensor) -> Tensor:
        """``encoded`` (of the visible tokens), the full ``tokens``, the ``masking``, the modality embeddings
        ``(M, D)`` of ``tokens.modalities`` -> predicted pixels ``(B, N, p^d)`` for every token."""
        x = self.embed(encoded.tokens)
        latents, visible = x[:, : encoded.num_latents], x[:, encoded.num_latents :]
        full = scatter_tokens(visible, masking.visible, len(tokens), self.mask_token)
        pos = sincos_position_embedding(tokens.grid, self.decoder_dim, x.device, x.dtype)
        full = full + pos[tokens.position] + self.modality(modality_embed)[tokens.modality]
        seq = torch.cat([latents, full], dim=1)
        mask = None
        if tokens.pad is not None:
            pad = torch.cat([tokens.pad.new_zeros(tokens.pad.shape[0], latents.shape[1]), tokens.pad], 1)
            mask = ~pad[:, None, None, :]
        for block in self.blocks:
            seq, _ = block(seq, None, mask)
        return self.pred[f"{tokens.ndim}d"](self.norm(seq[:, latents.shape[1] :]))


@dataclass
class MAEOutput:
    """One MAE pass: the full token set, the masking, the encoder output (visible tokens only), the
    predicted patches and the targets (normalised when ``norm_pix_loss``), both ``(B, N, p^d)``."""

    tokens: TokenSet
    masking: Masking
    encoded: Encoded
    pred: Tensor
    target: Tensor
    weight: Tensor  # (B, N): 1 where a hidden, real (not padding) token is scored


@register_task("mae")
class MAE(PretextTask):
    """Masked image modelling (see the module docstring).

    ``mask_ratio``: fraction of tokens hidden; ``masking``: ``random`` (MAE) or ``block`` (BrainMVP
    blocks of ``block_size`` voxels per side); ``norm_pix_loss``: per-patch normalised targets; the
    decoder has ``decoder_depth`` blocks of width ``decoder_dim``.
    """

    def __init__(
        self,
        mask_ratio: float = 0.75,
        masking: Literal["random", "block"] = "random",
        block_size: int = 8,
        norm_pix_loss: bool = True,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        start_step: int = 0,
    ):
        super().__init__(start_step)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if masking not in ("random", "block"):
            raise ValueError(f"masking must be 'random' or 'block', got {masking!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1 voxel, got {block_size}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim={decoder_dim} is not divisible by decoder_heads={decoder_heads}")
        self.mask_ratio, self.masking, self.block_size = mask_ratio, masking, block_size
        self.norm_pix_loss = norm_pix_loss
        self.decoder_args = (decoder_dim, decoder_depth, decoder_heads)
        self.decoder: MAEDecoder | None = None

    def attach(self, model: nn.Module) -> None:
        cfg = model.config
        dim, depth, heads = self.decoder_args
        patches = {2: cfg.patch_size_2d, 3: cfg.patch_size_3d}
        self.decoder = MAEDecoder(cfg.dim, dim, depth, heads, patches).to(model.body.norm.weight.device)

    def run(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        masking: Masking | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Tokenize, mask (a fresh draw unless ``masking`` is given), encode the visible tokens, decode."""
        if self.decoder is None:
            raise RuntimeError("MAE.attach(model) must run first (Pretrainer does it)")
        tokens = model.tokenize(
            batch["images"], batch["modalities"], batch.get("present"), batch.get("collection")
        )
        if masking is None:
            masking = make_masking(tokens, self.masking, self.mask_ratio, self.block_size, generator)
        encoded = model.encode(tokens, visible=masking.visible)
        embed = torch.stack([model.input_adaptformer.modality_embed[m] for m in tokens.modalities])
        pred = self.decoder(encoded, tokens, masking, embed)
        target = patch_targets(tokens)
        if self.norm_pix_loss:
            target = normalise_patches(target)[0]
        weight = masking.mask.to(pred.dtype)
        if tokens.pad is not None:
            weight = weight * (~tokens.pad).to(pred.dtype)
        return MAEOutput(tokens, masking, encoded, pred, target, weight)

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        out = self.run(model, views)
        per_token = (out.pred.float() - out.target.float()).pow(2).mean(dim=-1)
        loss = (per_token * out.weight).sum() / out.weight.sum().clamp_min(1)
        return loss, {"masked_fraction": float(out.masking.mask.float().mean())}

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Images for a figure: ``original``, ``masked`` input (hidden patches NaN) and ``reconstruction``
        (visible patches as they were, hidden ones predicted), each ``(B, M, *spatial)``."""
        out = self.run(model, batch)
        raw = patch_targets(out.tokens)
        pred = out.pred.float()
        if self.norm_pix_loss:  # back to pixel values with each patch's own statistics
            _, mean, std = normalise_patches(raw)
            pred = pred * std + mean
        hidden = out.masking.mask[..., None]
        filled = torch.where(hidden, pred, raw)
        if out.tokens.pad is not None:  # a modality the study lacks: nothing to show
            filled = filled.masked_fill(out.tokens.pad[..., None], float("nan"))
        return {
            "original": out.tokens.images,
            "masked": tokens_to_image(raw.masked_fill(hidden, float("nan")), out.tokens),  # NaN: drawn blue
            "reconstruction": tokens_to_image(filled, out.tokens),
        }

    def visualise(self, model: nn.Module, batch: Mapping[str, Any]) -> Any | None:
        images = self.reconstruct(model, batch)
        from medformer.pretext.figures import image_grid

        title = f"MAE: {int(self.mask_ratio * 100)}% of the patches hidden ({self.masking} masking)"
        if self.norm_pix_loss:  # the model predicts normalised patches; brightness comes from the truth
            title += "\nhidden patches shown at their true mean and SD (norm_pix_loss)"
        return image_grid(images, title)
