"""Preprocessing run once per study (then cached): reorient, resample, crop, scale, resize.

Built on MONAI transforms. All modalities of a study are processed together as channels of one
image, so they stay on one grid and one crop. The output arrays are ``(D, H, W)`` = ``(z, y, x)``
after reorientation to RAS for 3D (``array[k]`` is an axial slice), ``(H, W)`` for 2D.

Where the output sits is recorded, because learned per-position priors (BrainMVP's modality templates)
must be cropped at the same place: ``meta["grid"]`` is the shape of the reoriented, resampled image
(before any crop), ``meta["origin"]`` the voxel of that grid where the output's first voxel lies (the
foreground crop and the centred pad/crop moved it; negative where padding was added) and
``meta["foreground"]`` the foreground box ``[start, end)`` in that grid, all in the output's axis order.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CropForeground,
    Orientation,
    ResampleToMatch,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
)

from medformer.config import PreprocessConfig
from medformer.data.readers import LoadedImage
from medformer.errors import DataError

Volume = LoadedImage  # one image as read from disk: array in file index order + voxel->RAS affine


class Preprocessor:
    """Applies a `PreprocessConfig` to the modalities (and optional mask) of one study."""

    VERSION = 2  # bump when the output of the same settings changes, to invalidate caches

    def __init__(self, config: PreprocessConfig | None = None):
        self.config = config or PreprocessConfig()

    def fingerprint(self) -> str:
        """A short hash of the settings: part of every cache key, so a changed setting misses the cache."""
        payload = json.dumps({"v": self.VERSION, **self.config.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __call__(
        self, images: dict[str, Volume], masks: dict[str, Volume] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        """Returns processed arrays per modality, processed masks per label key, and metadata
        (spacing, foreground crop box in the reoriented/resampled grid, final shape)."""
        if not images:
            raise DataError(None, "a study with no images cannot be preprocessed")
        names = list(images)
        first = images[names[0]]
        ndim = first.array.ndim
        for name, vol in images.items():
            if not np.isfinite(vol.array).all():
                bad = int((~np.isfinite(vol.array)).sum())
                raise DataError(vol.path, f"modality {name!r} has {bad} NaN/Inf voxel(s)")
        vols = self._on_one_grid(images, first)
        cfg = self.config
        img = MetaTensor(
            np.stack([v.array.astype(np.float32) for v in vols]), affine=torch.as_tensor(first.affine)
        )
        masks = masks or {}
        seg = None
        for mask in masks.values():
            if mask.array.shape != first.array.shape:
                raise DataError(
                    mask.path, f"mask shape {mask.array.shape} differs from the image's {first.array.shape}"
                )
        if masks:
            stacked = np.stack([m.array.astype(np.float32) for m in masks.values()])
            seg = MetaTensor(stacked, affine=torch.as_tensor(first.affine))

        if ndim == 3 and cfg.orientation:
            orient = Orientation(axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))
            img = orient(img)
            seg = orient(seg) if seg is not None else None
        if cfg.spacing:
            if len(cfg.spacing) != ndim:
                raise DataError(
                    first.path, f"preprocess.spacing has {len(cfg.spacing)} values, image is {ndim}D"
                )
            img = Spacing(pixdim=cfg.spacing, mode="bilinear")(img)
            seg = Spacing(pixdim=cfg.spacing, mode="nearest")(seg) if seg is not None else None
        grid_affine, grid_shape = np.asarray(img.affine, np.float64), list(img.shape[1:])
        box = None
        if cfg.crop_foreground:
            cropper = CropForeground(select_fn=_above_background, allow_smaller=True)
            start, end = cropper.compute_bounding_box(img)
            box = [np.asarray(start).tolist(), np.asarray(end).tolist()]
            img = cropper.crop_pad(img, start, end)
            seg = cropper.crop_pad(seg, start, end) if seg is not None else None
        img = self._scale(img)
        if cfg.size:
            if len(cfg.size) != ndim:
                raise DataError(first.path, f"preprocess.size has {len(cfg.size)} values, image is {ndim}D")
            if cfg.resize == "pad_crop":
                img = ResizeWithPadOrCrop(cfg.size)(img)
                seg = ResizeWithPadOrCrop(cfg.size)(seg) if seg is not None else None
            else:
                img = Resize(cfg.size, mode="trilinear" if ndim == 3 else "bilinear")(img)
                seg = Resize(cfg.size, mode="nearest")(seg) if seg is not None else None
        spacing = tuple(float(s) for s in np.sqrt((np.asarray(img.affine)[:ndim, :ndim] ** 2).sum(0)))
        # the output's first voxel in the uncropped grid (exact for crops and pads; approximate after an
        # interpolating resize, which also changes the voxel size)
        to_grid = np.linalg.solve(grid_affine, np.asarray(img.affine, np.float64))
        origin = np.rint(to_grid[:ndim, -1]).astype(int).tolist()
        foreground = box or [[0] * ndim, grid_shape]
        arr = np.asarray(img.array if hasattr(img, "array") else img, dtype=np.float32)
        seg_arr = np.zeros((0, *arr.shape[1:]), np.uint8) if seg is None else np.rint(np.asarray(seg.array))
        seg_arr = seg_arr.astype(np.uint8)
        if ndim == 3:  # (x, y, z) -> (z, y, x): axis 0 indexes axial slices
            arr = np.ascontiguousarray(arr.transpose(0, 3, 2, 1))
            seg_arr = np.ascontiguousarray(seg_arr.transpose(0, 3, 2, 1))
            spacing = spacing[::-1]
            origin, grid_shape = origin[::-1], grid_shape[::-1]
            foreground = [list(foreground[0])[::-1], list(foreground[1])[::-1]]
        meta = {
            "spacing": spacing,
            "crop_box": box,
            "shape": list(arr.shape[1:]),
            "grid": [int(n) for n in grid_shape],
            "origin": origin,
            "foreground": [[int(i) for i in foreground[0]], [int(i) for i in foreground[1]]],
        }
        return dict(zip(names, arr, strict=True)), dict(zip(masks, seg_arr, strict=True)), meta

    def _on_one_grid(self, images: dict[str, Volume], first: Volume) -> list[Volume]:
        differ = [
            n
            for n, v in images.items()
            if v.array.shape != first.array.shape or not np.allclose(v.affine, first.affine, atol=1e-3)
        ]
        if not differ:
            return list(images.values())
        if not self.config.resample_to_first:
            desc = ", ".join(f"{n} {images[n].array.shape}" for n in differ)
            raise DataError(
                first.path,
                f"modalities are on different grids: {desc} differ from {next(iter(images))} "
                f"{first.array.shape} (shape or affine); "
                "set preprocess.resample_to_first=true to resample them",
            )
        ref = MetaTensor(first.array[None].astype(np.float32), affine=torch.as_tensor(first.affine))
        out = []
        for vol in images.values():
            src = MetaTensor(vol.array[None].astype(np.float32), affine=torch.as_tensor(vol.affine))
            res = ResampleToMatch(mode="bilinear")(src, img_dst=ref)
            out.append(Volume(np.asarray(res.array)[0], first.affine, vol.path))
        return out

    def _scale(self, img: MetaTensor) -> MetaTensor:
        cfg = self.config
        if cfg.intensity == "percentile":
            lo, hi = cfg.percentiles
            return ScaleIntensityRangePercentiles(lo, hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)(
                img
            )
        if cfg.intensity == "ct_window":
            lo, hi = cfg.ct_window
            return ScaleIntensityRange(lo, hi, b_min=0.0, b_max=1.0, clip=True)(img)
        if cfg.intensity == "minmax":
            flat = img.reshape(img.shape[0], -1)
            lo, hi = flat.amin(1), flat.amax(1)
            shape = (-1,) + (1,) * (img.ndim - 1)
            return (img - lo.view(shape)) / (hi - lo).clamp_min(1e-8).view(shape)
        return img


def _above_background(x: torch.Tensor) -> torch.Tensor:
    """Foreground = voxels above their channel's minimum in any modality (air/background is the minimum)."""
    lowest = x.reshape(x.shape[0], -1).amin(1).view(-1, *([1] * (x.ndim - 1)))
    return (x > lowest).any(0, keepdim=True)
