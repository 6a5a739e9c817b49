"""Random augmentation of whole batches, 2D and 3D alike, on whatever device the batch is on.

Why batched tensor ops rather than per-sample transforms: a training step of a small model on 28x28
images takes milliseconds, and a Python loop over 64 samples would cost more than the step. Every
spatial change (flip, rotation, zoom, shift) is folded into one affine matrix per sample and applied
with one ``grid_sample`` call; the same warp moves segmentation masks (nearest neighbour), so image and
mask stay aligned. Intensity changes (scale, shift, gamma, noise, blur) are drawn per sample and per
modality, as MRI contrasts vary independently. They are the usual medical-image augmentations (MONAI's
RandFlip, RandAffine, RandScaleIntensity, RandShiftIntensity, RandAdjustContrast, RandGaussianNoise,
RandGaussianSmooth) expressed for a batch. Randomness comes from torch's global generator, which the
engine seeds per rank and checkpoints, so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medformer.config import AugmentConfig


def rotation_matrix(angles: Tensor, ndim: int) -> Tensor:
    """Rotation matrices ``(B, d, d)`` from angles in radians: ``(B,)`` in 2D, ``(B, 3)`` (about each
    axis, applied in turn) in 3D."""
    if ndim == 2:
        c, s = angles.cos(), angles.sin()
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    b = angles.shape[0]
    out = torch.eye(3, dtype=angles.dtype, device=angles.device).expand(b, 3, 3)
    for axis in range(3):
        i, j = [a for a in range(3) if a != axis]
        c, s = angles[:, axis].cos(), angles[:, axis].sin()
        r = torch.eye(3, dtype=angles.dtype, device=angles.device).repeat(b, 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = r @ out
    return out


def random_affine(config: AugmentConfig, batch: int, ndim: int, device: torch.device) -> Tensor:
    """Per-sample affine maps ``(B, d, d + 1)`` in ``affine_grid``'s normalised coordinates: output
    position -> input position. Flips are a sign on an axis, so they are exact (no interpolation blur)."""
    dt = torch.float32

    def uniform(*shape: int, bound: float) -> Tensor:
        return (torch.rand(*shape, dtype=dt) * 2 - 1) * bound

    linear = torch.eye(ndim, dtype=dt).repeat(batch, 1, 1)
    if config.rotate > 0:
        shape = (batch,) if ndim == 2 else (batch, 3)
        linear = rotation_matrix(uniform(*shape, bound=math.radians(config.rotate)), ndim)
    if config.zoom > 0:
        linear = linear / (1 + uniform(batch, 1, 1, bound=config.zoom))  # zoom in = sample a smaller area
    if config.flip > 0:
        # affine_grid's columns are (x, y[, z]) = the spatial axes in reverse order
        axes = config.flip_axes if config.flip_axes is not None else list(range(ndim))
        sign = torch.ones(batch, ndim, dtype=dt)
        for axis in axes:
            col = ndim - 1 - (axis % ndim)  # -1: the last spatial axis (left-right in 2D and RAS 3D)
            flips = torch.rand(batch) < config.flip
            sign[flips, col] = -1.0
        linear = linear * sign[:, None, :]
    shift = (
        uniform(batch, ndim, 1, bound=2 * config.shift) if config.shift > 0 else torch.zeros(batch, ndim, 1)
    )
    return torch.cat([linear, shift], dim=2).to(device)


def warp(x: Tensor, theta: Tensor, mode: str) -> Tensor:
    """Resample ``(B, C, *spatial)`` with per-sample affine maps (zeros outside the image)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` with a per-sample sigma ``(B,)`` (0 = unchanged)."""
    b, c, *spatial = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.dtype).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K); sigma ~ 0 gives a delta
    out = x.reshape(1, b * c, *spatial)
    weight = kernel.repeat_interleave(c, 0)  # one kernel per (sample, channel) group
    for axis in range(len(spatial)):
        shape = [b * c, 1] + [1] * len(spatial)
        shape[2 + axis] = kernel.shape[1]
        pad = [0, 0] * len(spatial)
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        conv = F.conv2d if len(spatial) == 2 else F.conv3d
        out = conv(F.pad(out, pad, mode="replicate"), weight.reshape(shape), groups=b * c)
    return out.reshape(b, c, *spatial)


class Augment:
    """Callable ``batch -> augmented batch`` (a new dict; the input is not changed).

    Works on the loader's batch format: ``images (B, M, *spatial)`` with ``present (B, M)``; labels of
    segmentation tasks (``(B, *spatial)`` integer masks) follow the spatial warp, other labels are kept.
    """

    def __init__(self, config: AugmentConfig | None = None, **overrides: Any):
        self.config = (config or AugmentConfig()).model_copy(update=overrides)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        if not self.config.active:
            return out
        images: Tensor = batch["images"]
        b, _, *spatial = images.shape
        ndim = len(spatial)
        cfg = self.config
        x = images.float()
        if cfg.spatial:
            theta = random_affine(cfg, b, ndim, x.device)
            x = warp(x, theta, "bilinear")
            labels = {}
            for key, value in batch.get("labels", {}).items():
                if value.dim() == ndim + 1 and tuple(value.shape[1:]) == tuple(spatial):
                    moved = warp(value[:, None].float(), theta, "nearest")[:, 0]
                    labels[key] = moved.round().to(value.dtype)
                else:
                    labels[key] = value
            out["labels"] = labels
        x = self.intensity(x)
        present = batch.get("present")
        if present is not None:
            x = x * present.to(x.dtype).reshape(b, -1, *([1] * ndim))
        out["images"] = x.to(images.dtype) if images.is_floating_point() else x
        return out

    def intensity(self, x: Tensor) -> Tensor:
        cfg = self.config
        b, m = x.shape[:2]
        view = (b, m) + (1,) * (x.dim() - 2)

        def uniform(bound: float) -> Tensor:
            return ((torch.rand(b, m, dtype=x.dtype) * 2 - 1) * bound).to(x.device).reshape(view)

        if cfg.gamma > 0:
            x = x.clamp_min(0) ** uniform(cfg.gamma).exp()
        if cfg.intensity_scale > 0:
            x = x * (1 + uniform(cfg.intensity_scale))
        if cfg.intensity_shift > 0:
            x = x + uniform(cfg.intensity_shift)
        if cfg.blur > 0:
            sigma = torch.rand(b, dtype=x.dtype) * cfg.blur * (torch.rand(b) < cfg.blur_prob)
            if bool((sigma > 0).any()):
                x = gaussian_blur(x, sigma.to(x.device))
        if cfg.noise > 0:
            std = (torch.rand(b, m, dtype=x.dtype) * cfg.noise).to(x.device).reshape(view)
            x = x + torch.randn(x.shape, dtype=x.dtype, device=x.device) * std
        return x
