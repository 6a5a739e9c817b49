"""Controlled, documented domain shifts for benchmarks: what a new site or scanner does to the images.

MedMNIST (2D or 3D, intensities in [0, 1]) -- each shift has one strength parameter:

=============  =========================================================  ===========================
shift          what it does to an image ``x`` (per modality channel)      default strength
=============  =========================================================  ===========================
intensity      ``clip(a x + b)``: another gain and offset                 a = 0.6, b = 0.25
contrast       ``x ** gamma``: another contrast curve                     gamma = 2.0
noise          ``clip(x + N(0, sigma^2))``: lower SNR                     sigma = 0.1
blur           Gaussian blur of width sigma (pixels): another PSF         sigma = 1.0
resolution     down-sample by ``factor`` (area), back up (bilinear)       factor = 2
=============  =========================================================  ===========================

Each shift is deterministic: the noise of study ``i`` comes from ``seed`` and ``i`` only.

Simulated brain MRI: `second_scanner` returns the phantom cohort as a 1.5 T site would acquire it
(`medformer.data.phantom.SCANNER_15T`: other TR/TE/TI, field strength, weaker bias field, more noise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from medformer.data.phantom import SCANNER_15T, PhantomConfig, ScannerProfile
from medformer.data.study import Collection

DEFAULT_STRENGTH = {"intensity": 0.6, "contrast": 2.0, "noise": 0.1, "blur": 1.0, "resolution": 2.0}
INTENSITY_OFFSET = 0.25


@dataclass(frozen=True)
class Shift:
    """One shift: its ``kind`` (a key of `DEFAULT_STRENGTH`) and ``strength`` (default: the table's)."""

    kind: str
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_STRENGTH:
            raise ValueError(f"unknown shift {self.kind!r}; known: {', '.join(DEFAULT_STRENGTH)}")

    @property
    def value(self) -> float:
        return DEFAULT_STRENGTH[self.kind] if self.strength is None else self.strength

    @property
    def name(self) -> str:
        return f"{self.kind}({self.value:g})"

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """``image`` ``(M, *spatial)`` in [0, 1] -> the shifted image, float32."""
        x = np.asarray(image, dtype=np.float32)
        v = self.value
        if self.kind == "intensity":
            return np.clip(v * x + INTENSITY_OFFSET, 0.0, 1.0)
        if self.kind == "contrast":
            return np.clip(x, 0.0, 1.0) ** v
        if self.kind == "noise":
            rng = rng or np.random.default_rng(0)
            return np.clip(x + rng.normal(0.0, v, x.shape).astype(np.float32), 0.0, 1.0)
        t = torch.from_numpy(x)[None]  # (1, M, *spatial)
        if self.kind == "blur":
            from medformer.data.augment import gaussian_blur

            return gaussian_blur(t, torch.tensor([v]))[0].numpy()
        size = t.shape[2:]
        small = [max(1, round(s / v)) for s in size]
        mode = "bilinear" if t.dim() == 4 else "trilinear"
        low = F.adaptive_avg_pool2d(t, small) if t.dim() == 4 else F.adaptive_avg_pool3d(t, small)
        return F.interpolate(low, size=size, mode=mode, align_corners=False)[0].numpy()


def _as_float(image: np.ndarray, scale: float) -> np.ndarray:
    return image.astype(np.float32) * scale if image.dtype.kind in "ui" else image.astype(np.float32)


def shift_collection(
    col: Collection, shift: Shift, splits: tuple[str, ...] = ("test",), seed: int = 0, name: str | None = None
) -> Collection:
    """A copy of an in-memory collection whose studies in ``splits`` are shifted (others unchanged).

    Images come back as float32 in [0, 1]; ``name`` renames the copy (default: the same name).
    """
    scale = float(col.metadata.get("image_scale", 1.0))
    studies = []
    for i, s in enumerate(col.studies):
        if s.split in splits:
            rng = np.random.default_rng([seed, i])
            names = list(s.images)
            stacked = np.stack([_as_float(s.images[m], scale) for m in names])
            shifted = shift(stacked, rng)
            s = replace(s, images=dict(zip(names, shifted)))
        studies.append(s)
    return replace(col, name=name or col.name, studies=studies)


def second_scanner(config: PhantomConfig, scanner: ScannerProfile = SCANNER_15T) -> PhantomConfig:
    """The same cohort (same subjects, tumours and splits) acquired on another scanner: other sequence
    timings (TR/TE/TI), field strength (relaxation times), bias field, noise and gain."""
    return replace(config, scanner=scanner)
