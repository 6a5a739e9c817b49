"""A simulated multi-contrast brain MRI cohort with tumours, built on real MNI ICBM152 anatomy.

Why: the demo, the tests and the benchmarks need 3D multi-modal brain MRI with segmentation,
classification and regression labels that loads offline in seconds; real cohorts (BraTS) cannot ship
with a library.

What is real and what is simulated. The anatomy is real: the ICBM152 2009a (nonlinear symmetric)
grey-matter and white-matter probability maps and brain mask that ship inside nilearn (no download).
CSF is the brain mask minus GM minus WM, which includes the ventricles. Everything else is simulated:
the shape variation between subjects (smooth random deformation + affine jitter), the tumours, the MR
contrasts, the bias field and the noise. The images are physically plausible, not real scans.

Signal model. Each voxel is a partial-volume mixture of tissues t (GM, WM, CSF, oedema, necrosis,
solid tumour) with fractions f_t and per-subject relaxation values (T1, T2, PD)::

    spin echo (T1w, T1c, T2w):    S_t = PD (1 - exp(-TR/T1)) exp(-TE/T2)
    inversion recovery (FLAIR):   S_t = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)
    image = gain * B(x) * sum_t f_t S_t (1 + a_t n(x)),  B = exp(b(x)) a smooth bias field
    Rician noise: |image + e_re + i e_im|, e ~ N(0, sigma^2), sigma = noise * gain * max over GM/WM/CSF of S_t

Gadolinium (T1c only) shortens relaxation in the enhancing rim: 1/T1' = 1/T1 + r1 C, 1/T2' = 1/T2 + r2 C.
Sequence timings live in a `ScannerProfile`, so a second "scanner" (domain shift) changes TR/TE/TI,
field strength (relaxation table), bias and noise. Values and sources: docs/phantom.md.

Conventions. Arrays from `generate_subject` are ``(D, H, W) = (z, y, x)`` in RAS (x to the subject's
right, y anterior, z superior; ``array[k]`` is an axial slice): the order medformer's preprocessing
yields. NIfTI files hold the transpose ``(x, y, z)`` with a diagonal RAS affine, so any reader that
reorients to RAS gets the same arrays back. Labels: 0 background, 1 necrotic / non-enhancing core (NCR),
2 oedema (ED), 3 enhancing tumour (ET); BraTS up to 2021 wrote ET as 4, we use 3 so labels are class
indices.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from medformer.errors import ConfigError

MODALITIES = ("T1w", "T1c", "T2w", "FLAIR")
CLASSES = ("background", "necrosis", "oedema", "enhancing")
NCR, ED, ET = 1, 2, 3
TISSUES = ("gm", "wm", "csf", "oedema", "necrosis", "tumour")  # "tumour": solid (rim) tumour tissue
PHANTOM_VERSION = 2  # bump when the same config produces different images, so cohorts are rewritten
FOV_CENTRE_MNI = (0.0, -18.0, 10.0)  # mm; centre of the brain mask's box, nudged up towards the cerebrum
GD_RELAXIVITY = (4.0, 5.0)  # r1, r2 of a gadolinium agent, L mmol^-1 s^-1 (rounded; docs/phantom.md)
TEXTURE = (0.03, 0.03, 0.02, 0.08, 0.08, 0.08)  # relative texture amplitude a_t per tissue


@dataclass(frozen=True)
class Tissue:
    """Relaxation of one tissue: T1, T2 in ms, PD relative to pure water, and the between-subject
    coefficient of variation applied to each of them."""

    t1: float
    t2: float
    pd: float
    cv: float = 0.05


# Field strength (T) -> tissue -> relaxation. Normal tissue: T1 from Rooney et al. 2007, T2 from Stanisz
# et al. 2005, PD from water-content mapping (Neeb et al. 2006); CSF T2 and all lesion values are
# representative choices of ours (docs/phantom.md says which value comes from where).
RELAXATION: dict[float, dict[str, Tissue]] = {
    3.0: {
        "gm": Tissue(1607.0, 99.0, 0.80),
        "wm": Tissue(838.0, 69.0, 0.70),
        "csf": Tissue(4400.0, 2000.0, 1.00, 0.03),
        "oedema": Tissue(1400.0, 140.0, 0.83, 0.10),
        "necrosis": Tissue(2600.0, 320.0, 0.92, 0.10),
        "tumour": Tissue(1700.0, 110.0, 0.85, 0.10),
    },
    1.5: {
        "gm": Tissue(1197.0, 95.0, 0.80),
        "wm": Tissue(646.0, 72.0, 0.70),
        "csf": Tissue(4400.0, 2000.0, 1.00, 0.03),
        "oedema": Tissue(1100.0, 150.0, 0.83, 0.10),
        "necrosis": Tissue(2300.0, 340.0, 0.92, 0.10),
        "tumour": Tissue(1300.0, 115.0, 0.85, 0.10),
    },
}


@dataclass(frozen=True)
class Sequence:
    """Timing of one contrast in ms: spin echo when ``ti`` is None, inversion recovery otherwise."""

    tr: float
    te: float
    ti: float | None = None

    def signal(self, t1: np.ndarray, t2: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """Steady-state magnitude signal of tissues with the given T1, T2 (ms) and PD."""
        e1 = np.exp(-self.tr / t1)
        longitudinal = 1.0 - e1 if self.ti is None else np.abs(1.0 - 2.0 * np.exp(-self.ti / t1) + e1)
        return pd * longitudinal * np.exp(-self.te / t2)


@dataclass(frozen=True)
class ScannerProfile:
    """Everything a site changes: field strength (selects the relaxation table), sequence timings,
    bias-field strength (SD of log bias), noise (SD relative to the brightest normal tissue) and gain."""

    name: str = "3T"
    field_t: float = 3.0
    t1w: Sequence = Sequence(tr=500.0, te=10.0)
    t1c: Sequence = Sequence(tr=500.0, te=10.0)  # T1w after gadolinium: the same sequence
    t2w: Sequence = Sequence(tr=5000.0, te=100.0)
    flair: Sequence = Sequence(tr=9000.0, te=120.0, ti=2500.0)  # TI near the CSF null for T1 = 4.4 s
    bias: float = 0.15
    noise: float = 0.02
    gain: float = 1000.0

    def __post_init__(self) -> None:
        if self.field_t not in RELAXATION:
            raise ConfigError(f"scanner {self.name!r}: field_t must be one of {sorted(RELAXATION)} T")

    def sequence(self, modality: str) -> Sequence:
        return {"T1w": self.t1w, "T1c": self.t1c, "T2w": self.t2w, "FLAIR": self.flair}[modality]


SCANNER_3T = ScannerProfile()
# A second site for domain-shift experiments: lower field, other timings, weaker bias, lower SNR.
SCANNER_15T = ScannerProfile(
    name="1.5T",
    field_t=1.5,
    t1w=Sequence(tr=450.0, te=12.0),
    t1c=Sequence(tr=450.0, te=12.0),
    t2w=Sequence(tr=4000.0, te=90.0),
    flair=Sequence(tr=8000.0, te=110.0, ti=2400.0),
    bias=0.10,
    noise=0.035,
    gain=800.0,
)
SCANNERS = {SCANNER_3T.name: SCANNER_3T, SCANNER_15T.name: SCANNER_15T}


@dataclass(frozen=True)
class PhantomConfig:
    """A cohort. Subject i depends on ``seed`` and i only (not on ``n_subjects``); ``shape`` is the
    array shape (D, H, W) = (z, y, x); at 2 mm a 64^3 grid spans 128 mm and clips the brain's poles
    (use 96^3, or 3 mm voxels, for the whole brain)."""

    n_subjects: int = 40
    seed: int = 0
    voxel_size_mm: float = 2.0
    shape: tuple[int, int, int] = (64, 64, 64)
    tumour_fraction: float = 0.9  # subjects with a tumour
    enhancing_fraction: float = 0.6  # tumours with an enhancing rim
    missing_fraction: float = 0.2  # subjects that lack one or two modalities
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train / val / test
    scanner: ScannerProfile = SCANNER_3T
    deformation_mm: float = 3.0  # SD of the smooth displacement field
    rotation_deg: float = 4.0  # SD per axis
    scale_sd: float = 0.05  # SD of log brain size (per-axis shape changes: 0.4 x that)
    translation_mm: float = 3.0  # SD per axis
    tumour_radius_mm: tuple[float, float] = (12.0, 26.0)  # range of the whole-tumour radius
    skull_stripped: bool = True  # zero outside the brain, as in BraTS; False keeps Rayleigh background

    def __post_init__(self) -> None:
        fractions = {
            "tumour_fraction": self.tumour_fraction,
            "enhancing_fraction": self.enhancing_fraction,
            "missing_fraction": self.missing_fraction,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"phantom {name} = {value} must be in [0, 1]")
        if self.n_subjects < 1:
            raise ConfigError(f"phantom n_subjects = {self.n_subjects} must be at least 1")
        if self.voxel_size_mm <= 0:
            raise ConfigError(f"phantom voxel_size_mm = {self.voxel_size_mm} must be positive")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ConfigError(f"phantom shape = {self.shape} must be three sizes of at least 8 voxels")
        if len(self.split) != 3 or min(self.split) < 0 or not math.isclose(sum(self.split), 1.0):
            raise ConfigError(f"phantom split = {self.split} must be three fractions summing to 1")
        lo, hi = self.tumour_radius_mm
        if not 0 < lo <= hi:
            raise ConfigError(f"phantom tumour_radius_mm = {self.tumour_radius_mm} must be 0 < low <= high")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists), as stored in cohort.json."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhantomConfig:
        """Inverse of `to_dict`, also for YAML: ``scanner`` may be a profile name ("3T", "1.5T") or a
        mapping of `ScannerProfile` fields (sequences as mappings of tr/te/ti)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"phantom: unknown option(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        scanner = values.get("scanner")
        if isinstance(scanner, str):
            if scanner not in SCANNERS:
                raise ConfigError(f"phantom scanner {scanner!r} is not one of {sorted(SCANNERS)}")
            values["scanner"] = SCANNERS[scanner]
        elif isinstance(scanner, Mapping):
            fields = {k: Sequence(**v) if isinstance(v, Mapping) else v for k, v in scanner.items()}
            try:
                values["scanner"] = ScannerProfile(**fields)
            except TypeError as err:
                raise ConfigError(f"phantom scanner: {err}") from err
        for key in ("shape", "split", "tumour_radius_mm"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


# ----------------------------------------------------------------------------------------------------
# Per-subject random draws


@dataclass(frozen=True, eq=False)
class SubjectParameters:
    """The scalar random draws of one subject (cheap: no images), from its own seed streams."""

    index: int
    id: str
    has_tumour: bool
    enhancing: bool
    missing: tuple[str, ...]
    relaxation: dict[str, tuple[float, float, float]]  # tissue -> (T1 ms, T2 ms, PD) for this subject
    gd_mM: float  # gadolinium concentration in the enhancing rim
    rotation: np.ndarray  # (3, 3) output -> template
    scale: np.ndarray  # (3,) brain size relative to the template
    translation: np.ndarray  # (3,) mm
    tumour_radius_mm: float
    tumour_axes: np.ndarray  # (3,) relative semi-axes of the ellipsoid
    tumour_rotation: np.ndarray  # (3, 3)
    core_fraction: float  # tumour-core radius / whole-tumour radius
    necrosis_fraction: float  # necrosis radius / tumour-core radius
    irregularity: float  # amplitude of the log-radius perturbation
    mass_effect: float  # 0..0.5, how far surrounding tissue is pushed away
    gain: float
    survival_noise: float


def subject_id(index: int) -> str:
    return f"sub-{index:04d}"


def _streams(index: int, seed: int, n: int = 5) -> list[np.random.Generator]:
    """Independent generators for subject `index`: params, missing, fields, tumour, noise. Changing
    one option (e.g. missing_fraction) leaves the other streams, hence the anatomy, unchanged."""
    root = np.random.SeedSequence(seed, spawn_key=(index,))
    return [np.random.default_rng(s) for s in root.spawn(n)]


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (rad) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_parameters(index: int, config: PhantomConfig | None = None) -> SubjectParameters:
    """Draw subject `index`'s scalars. Every draw happens whatever the branch, so a changed fraction
    changes only the draws it governs."""
    config = config or PhantomConfig()
    rng, rng_missing, *_ = _streams(index, config.seed)
    u_tumour, u_enhancing = rng.random(2)
    table = RELAXATION[config.scanner.field_t]
    relaxation = {}
    for name in TISSUES:
        t = table[name]
        f1, f2, fp = np.exp(t.cv * rng.standard_normal(3))
        relaxation[name] = (t.t1 * f1, t.t2 * f2, min(1.0, t.pd * fp))
    angles = np.deg2rad(config.rotation_deg * rng.standard_normal(3))
    scale = np.exp(config.scale_sd * (rng.standard_normal() + 0.4 * rng.standard_normal(3)))  # size, shape
    translation = config.translation_mm * rng.standard_normal(3)
    lo, hi = config.tumour_radius_mm
    radius = rng.uniform(lo, hi)
    axes = np.exp(0.15 * rng.standard_normal(3))
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    tumour_rotation = q * np.sign(np.diag(r))
    low, high = [0.45, 0.3, 0.12, 0.15, 0.3], [0.65, 0.7, 0.25, 0.45, 0.6]
    core, necrosis, irregularity, mass, gd = rng.uniform(low, high)
    gain, survival_noise = np.exp(0.1 * rng.standard_normal()), rng.standard_normal()

    u_missing, u_two = rng_missing.random(2)
    order = rng_missing.permutation(len(MODALITIES))
    n_missing = (1 + int(u_two < 0.5)) if u_missing < config.missing_fraction else 0
    missing = tuple(MODALITIES[i] for i in sorted(order[:n_missing]))
    has_tumour = bool(u_tumour < config.tumour_fraction)
    return SubjectParameters(
        index=index,
        id=subject_id(index),
        has_tumour=has_tumour,
        enhancing=has_tumour and bool(u_enhancing < config.enhancing_fraction),
        missing=missing,
        relaxation=relaxation,
        gd_mM=float(gd),
        rotation=_rotation(angles),
        scale=scale,
        translation=translation,
        tumour_radius_mm=float(radius),
        tumour_axes=axes / np.cbrt(axes.prod()),
        tumour_rotation=tumour_rotation,
        core_fraction=float(core),
        necrosis_fraction=float(necrosis),
        irregularity=float(irregularity),
        mass_effect=float(mass),
        gain=float(gain),
        survival_noise=float(survival_noise),
    )


# ----------------------------------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True, eq=False)
class _Template:
    """GM, WM, CSF fractions (x 255, uint8 to keep it small) on an axis-aligned MNI grid."""

    maps: np.ndarray  # (3, X, Y, Z)
    origin: np.ndarray  # MNI mm of voxel (0, 0, 0)
    spacing: float

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Trilinear fractions at MNI points (3, ...) -> (3, ...) float32 (0 outside the template)."""
        idx = (points.reshape(3, -1) - self.origin[:, None].astype(np.float32)) / np.float32(self.spacing)
        out = np.empty((3, idx.shape[1]), np.float32)
        for c in range(3):  # one call per tissue map, vectorised over voxels
            ndi.map_coordinates(self.maps[c], idx, output=out[c], order=1, mode="constant", prefilter=False)
        return (out / 255.0).reshape(3, *points.shape[1:])


@lru_cache(maxsize=4)
def _template(voxel_size_mm: float) -> _Template:
    """Load the ICBM152 maps from nilearn's package data (offline), derive CSF, low-pass for the target
    voxel size (against aliasing) and keep a grid of spacing max(1, voxel/2) mm around the brain."""
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - nilearn is the `brain` extra
        raise ImportError("the brain phantom needs nilearn: pip install 'medformer[brain]'") from err
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = ndi.binary_fill_holes(np.asarray(mask_img.dataobj) > 0)
    where = np.argwhere(mask)
    lo, hi = np.maximum(where.min(0) - 8, 0), where.max(0) + 9
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain = mask[box].astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)[box]
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)[box]
    keep = np.minimum(1.0, brain / np.maximum(gm + wm, 1e-6))  # GM + WM never exceeds the mask
    gm *= keep
    wm *= keep
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    sigma = math.sqrt(max(voxel_size_mm**2 - 1.0, 0.0)) / 2.355  # FWHM of the target voxel, in 1 mm units
    step = max(1.0, voxel_size_mm / 2.0)
    size = tuple(int((n - 1) // step) + 1 for n in brain.shape)
    maps = np.empty((3, *size), np.uint8)
    for c, m in enumerate((gm, wm, csf)):  # one map at a time keeps the peak memory low
        if sigma > 0:
            m = ndi.gaussian_filter(m, sigma)
        if step > 1.0:
            m = ndi.affine_transform(m, [step] * 3, output_shape=size, order=1)
        maps[c] = np.clip(np.rint(m * 255.0), 0, 255)
    origin = (mask_img.affine @ np.r_[lo, 1.0])[:3]
    return _Template(maps, origin, step)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: float, n: int = 1) -> np.ndarray:
    """`n` smooth Gaussian random fields of unit variance and correlation length `cell` voxels.

    Control-point noise spread by a separable Gaussian kernel: three small tensor contractions
    instead of a 3D filter, and each row of weights normalised so the variance is 1 everywhere.
    """
    cell = max(float(cell), 0.5)
    weights = []
    for size in shape:
        m = math.ceil(size / cell) + 5
        control = (np.arange(m) - 2.0) * cell
        w = np.exp(-0.5 * ((np.arange(size)[:, None] - control[None, :]) / cell) ** 2)
        weights.append((w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32))
    wz, wy, wx = weights
    coarse = rng.standard_normal((n, wz.shape[1], wy.shape[1], wx.shape[1]), dtype=np.float32)
    field = np.matmul(wy, coarse @ wx.T)  # (n, control z, y, x)
    return np.moveaxis(np.tensordot(wz, field, axes=([1], [1])), 0, 1)


def _world_grid(shape: tuple[int, int, int], voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """World mm (x, y, z) of every voxel of a (z, y, x) grid centred on the field of view, and the
    4x4 affine of the (x, y, z)-ordered file."""
    d, h, w = shape
    origin = np.asarray(FOV_CENTRE_MNI) - voxel * (np.array([w, h, d]) - 1) / 2.0
    world = np.empty((3, d, h, w), np.float32)
    world[0] = (origin[0] + voxel * np.arange(w))[None, None, :]
    world[1] = (origin[1] + voxel * np.arange(h))[None, :, None]
    world[2] = (origin[2] + voxel * np.arange(d))[:, None, None]
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = origin
    return world, affine


# ----------------------------------------------------------------------------------------------------
# Tumour


def _tumour_centre(
    fractions: np.ndarray, radius: float, voxel: float, rng: np.random.Generator
) -> tuple[int, int, int]:
    """A voxel in white matter, deep enough in the brain and far enough from the grid's edges."""
    brain = fractions.sum(0) > 0.5
    depth = ndi.distance_transform_edt(brain, sampling=voxel)
    inner = np.zeros_like(brain)
    margin = min(math.ceil(0.6 * radius / voxel), min(brain.shape) // 2 - 1)
    inner[tuple(slice(margin, n - margin) for n in brain.shape)] = True
    for candidates in (
        inner & (fractions[1] > 0.5) & (depth >= 0.5 * radius),
        inner & brain & (depth >= 0.5 * depth[inner].max(initial=0.0)),
    ):
        idx = np.flatnonzero(candidates)
        if idx.size:
            return tuple(int(i) for i in np.unravel_index(idx[rng.integers(idx.size)], brain.shape))
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(depth)), brain.shape))


def _tumour_memberships(
    world: np.ndarray,
    centre: np.ndarray,
    p: SubjectParameters,
    wm: np.ndarray,
    voxel: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft nested memberships (whole tumour, tumour core, necrosis) of an irregular ellipsoid.

    Radii are perturbed by smooth noise (irregular borders); oedema reaches further in white matter
    than in grey matter, as vasogenic oedema spreads along white-matter tracts.
    """
    rel = np.einsum("ij,i...->j...", p.tumour_rotation, world - centre[:, None, None, None])
    r = np.sqrt(((rel / (p.tumour_radius_mm * p.tumour_axes)[:, None, None, None]) ** 2).sum(0))
    n_core, n_necrosis, n_oedema = _smooth_noise(rng, r.shape, 6.0 / voxel, n=3)
    width = 0.5 * voxel / p.tumour_radius_mm  # soft edge of about half a voxel
    a = p.irregularity
    r_core = r * np.exp(a * n_core)
    m_core = expit((p.core_fraction - r_core) / width)
    r_necrosis = r * np.exp(a * n_necrosis)
    m_necrosis = np.minimum(expit((p.core_fraction * p.necrosis_fraction - r_necrosis) / width), m_core)
    r_oedema = r * np.exp(1.5 * a * n_oedema) / (0.7 + 0.6 * wm)
    m_whole = np.maximum(expit((1.0 - r_oedema) / width), m_core)
    return m_whole, m_core, m_necrosis


def survival_days(wt_volume_ml: float, midline_mm: float, enhancing: bool, noise: float) -> float:
    """Simulated survival: 1200 d x exp(-V/60 ml) x (1 - 0.5 exp(-d/15 mm)) x (0.7 if enhancing)
    x exp(0.1 noise). Larger tumours, tumours near the midline and enhancing ones do worse."""
    value = 1200.0 * math.exp(-wt_volume_ml / 60.0) * (1.0 - 0.5 * math.exp(-midline_mm / 15.0))
    return round(value * (0.7 if enhancing else 1.0) * math.exp(0.1 * noise), 1)


def brats_regions(label: np.ndarray) -> dict[str, np.ndarray]:
    """BraTS evaluation regions from a 0/1/2/3 label map: ET = 3, TC = ET + NCR, WT = TC + ED."""
    label = np.asarray(label)
    et = label == ET
    tc = et | (label == NCR)
    return {"ET": et, "TC": tc, "WT": tc | (label == ED)}


# ----------------------------------------------------------------------------------------------------
# One subject


def generate_subject(index: int, config: PhantomConfig | None = None) -> dict[str, Any]:
    """Simulate subject `index`.

    Returns ``id``, ``images`` (modality -> float32 (z, y, x); missing modalities absent), ``label``
    (uint8 (z, y, x), 0..3), ``tissues`` (normal-tissue fractions gm/wm/csf), ``brain`` (bool mask),
    ``enhancing`` (0/1: the tumour has enhancing voxels), ``survival`` (days), ``missing``, ``affine``
    (4x4 of the (x, y, z) file), ``spacing`` and ``info`` (lesion volumes, centre, relaxation values).
    """
    config = config or PhantomConfig()
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    p = subject_parameters(index, config)
    _, _, rng_fields, rng_tumour, rng_noise = _streams(index, config.seed)
    voxel, shape = float(config.voxel_size_mm), tuple(int(s) for s in config.shape)
    template = _template(voxel)
    world, affine = _world_grid(shape, voxel)

    # output world -> template MNI: q = c + R S^-1 (p - c) + t + u(p), u a smooth displacement field
    centre_fov = np.asarray(FOV_CENTRE_MNI, np.float32)[:, None, None, None]
    linear = (p.rotation / p.scale[None, :]).astype(np.float32)
    shift = centre_fov + p.translation.astype(np.float32)[:, None, None, None]
    disp = config.deformation_mm * _smooth_noise(rng_fields, shape, 30.0 / voxel, n=3)

    def to_template(points: np.ndarray, displacement: np.ndarray) -> np.ndarray:
        moved = linear @ (points - centre_fov).reshape(3, -1)
        return moved.reshape(points.shape) + shift + displacement

    m_whole = m_core = m_necrosis = np.zeros(shape, np.float32)
    if p.has_tumour:
        # choose the centre on a grid of every other voxel (an 8th of the work), then add the mass
        # effect: sample the template closer to the centre, which pushes tissue outwards (the radial
        # map r -> r (1 - s exp(-r^2 / 2R^2)) stays monotone for s < 1: no folding)
        coarse = (slice(None), *(slice(None, None, 2),) * 3)
        coarse_fractions = template.sample(to_template(world[coarse], disp[coarse]))
        k, j, i = _tumour_centre(coarse_fractions, p.tumour_radius_mm, 2 * voxel, rng_tumour)
        centre = world[:, 2 * k, 2 * j, 2 * i] + voxel * rng_tumour.uniform(-1.0, 1.0, 3).astype(np.float32)
        offset = world - centre[:, None, None, None]
        push = p.mass_effect * np.exp(-(offset**2).sum(0) / (2.0 * p.tumour_radius_mm**2))
        template_points = to_template(centre[:, None, None, None] + offset * (1.0 - push), disp)
    else:
        template_points = to_template(world, disp)
    fractions = template.sample(template_points)
    if p.has_tumour:
        m_whole, m_core, m_necrosis = _tumour_memberships(world, centre, p, fractions[1], voxel, rng_tumour)
    brain_fraction = fractions.sum(0)
    brain = brain_fraction > 0.5
    normal = fractions * (1.0 - m_whole)
    lesion = np.stack([m_whole - m_core, m_necrosis, m_core - m_necrosis]) * brain_fraction
    f = np.concatenate([normal, lesion]).astype(np.float32)  # (6, z, y, x) in TISSUES order

    label = np.zeros(shape, np.uint8)
    label[m_whole > 0.5] = ED
    label[m_core > 0.5] = ET if p.enhancing else NCR
    label[m_necrosis > 0.5] = NCR
    label[~brain] = 0

    # signal: partial-volume mixture of per-tissue signals, textured, biased, Rician noise
    texture = _smooth_noise(rng_fields, shape, 3.0 / voxel)[0]
    f_textured = f * (1.0 + np.asarray(TEXTURE, np.float32)[:, None, None, None] * texture)
    bias = np.exp(config.scanner.bias * _smooth_noise(rng_fields, shape, 60.0 / voxel)[0])
    t1, t2, pd = (np.array([p.relaxation[t][c] for t in TISSUES]) for c in range(3))
    r1, r2 = GD_RELAXIVITY
    gain = config.scanner.gain * p.gain
    images = {}
    for modality in MODALITIES:
        t1m, t2m = t1.copy(), t2.copy()
        if modality == "T1c" and p.enhancing:  # gadolinium in the enhancing rim (per ms: C r / 1000)
            rim = TISSUES.index("tumour")
            t1m[rim] = 1.0 / (1.0 / t1[rim] + r1 * p.gd_mM / 1000.0)
            t2m[rim] = 1.0 / (1.0 / t2[rim] + r2 * p.gd_mM / 1000.0)
        s = config.scanner.sequence(modality).signal(t1m, t2m, pd).astype(np.float32)
        clean = gain * bias * np.tensordot(s, f_textured, axes=1)
        sigma = config.scanner.noise * gain * float(s[:3].max())
        noise = sigma * rng_noise.standard_normal((2, *shape), dtype=np.float32)
        image = np.hypot(clean + noise[0], noise[1])
        if config.skull_stripped:
            image[~brain] = 0.0
        images[modality] = image.astype(np.float32)

    wt = label > 0
    enhancing = p.enhancing and bool((label == ET).any())  # a rim too thin for the grid does not count
    volume = {k: float(v.sum() * voxel**3 / 1000.0) for k, v in brats_regions(label).items()}
    if wt.any():
        centroid = template_points[:, wt].mean(1)  # MNI mm of the whole tumour's centre of mass
        midline = abs(float(centroid[0]))
    else:
        centroid, midline = None, math.inf
    survival = survival_days(volume["WT"], midline, enhancing, p.survival_noise)
    info = {
        "has_tumour": p.has_tumour,
        "volume_ml": volume,
        "centroid_mni_mm": None if centroid is None else [round(float(c), 2) for c in centroid],
        "midline_distance_mm": None if centroid is None else round(midline, 2),
        "relaxation_ms": {t: [round(v, 4) for v in p.relaxation[t]] for t in TISSUES},
        "gadolinium_mM": round(p.gd_mM, 4) if enhancing else 0.0,
        "scanner": config.scanner.name,
    }
    return {
        "id": p.id,
        "index": index,
        "images": {m: images[m] for m in MODALITIES if m not in p.missing},
        "label": label,
        "tissues": dict(zip(("gm", "wm", "csf"), normal.astype(np.float32))),
        "brain": brain,
        "enhancing": int(enhancing),
        "survival": survival,
        "missing": list(p.missing),
        "affine": affine,
        "spacing": (voxel, voxel, voxel),
        "info": info,
    }


# ----------------------------------------------------------------------------------------------------
# A cohort on disk


def assign_splits(n: int, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Deterministic train/val/test of exactly round(n x fraction) subjects (at least one in val and
    test when n >= 3 and their fraction is positive), by a seeded permutation."""
    n_val, n_test = (round(n * f) for f in fractions[1:])
    if n >= 3:
        n_val = max(n_val, int(fractions[1] > 0))
        n_test = max(n_test, int(fractions[2] > 0))
    n_train = n - n_val - n_test
    order = np.random.default_rng([seed, 0x53504C54]).permutation(n)
    splits = [""] * n
    for rank, i in enumerate(order):
        splits[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return splits


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_nifti(path: Path, array_zyx: np.ndarray, affine: np.ndarray) -> None:
    """Write a (z, y, x) array as an (x, y, z) NIfTI with the given RAS affine (gzip level 1: fast)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    img.set_data_dtype(array_zyx.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"medformer brain phantom (simulated)"
    _write_atomic(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


MANIFEST_COLUMNS = (
    "id",
    "split",
    *(f"image:{m}" for m in MODALITIES),
    "label:enhancing",
    "label:survival",
    "mask:tumour",
)
COLLECTION = {
    "name": "brain_phantom",
    "ndim": 3,
    "tasks": [
        {"name": "tumour", "kind": "segmentation", "num_classes": 4, "classes": list(CLASSES)},
        {"name": "enhancing", "kind": "binary", "num_classes": 2, "classes": ["non-enhancing", "enhancing"]},
        {"name": "survival", "kind": "regression", "num_classes": 1},
    ],
}
_SUBJECT_FILES = (*(f"{m}.nii.gz" for m in MODALITIES), "seg.nii.gz", "subject.json")


def _stamp(config: PhantomConfig) -> dict[str, Any]:
    return {"generator": "medformer.data.phantom", "version": PHANTOM_VERSION, "config": config.to_dict()}


def _complete(root: Path, config: PhantomConfig) -> bool:
    """True when `root` holds a cohort written from this very config, with all its files."""
    try:
        if json.loads((root / "cohort.json").read_text()) != _stamp(config):
            return False
        with open(root / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError):
        return False
    paths = [r[c] for r in rows for c in MANIFEST_COLUMNS if c.startswith(("image:", "mask:")) and r[c]]
    return len(rows) == config.n_subjects and all((root / p).is_file() for p in paths)


def _remove_stale(root: Path, keep: set[str]) -> None:
    """Delete the files of subjects that a previous manifest listed and this cohort does not."""
    try:
        with open(root / "manifest.csv", newline="") as fh:
            old = {r["id"] for r in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError):
        return
    for sid in old - keep:
        folder = root / sid
        for name in _SUBJECT_FILES:
            (folder / name).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def write_cohort(root: str | Path, config: PhantomConfig | None = None, progress: bool = True) -> Path:
    """Write the cohort as ``root/<id>/<modality>.nii.gz`` + ``seg.nii.gz`` + ``subject.json``, a
    ``manifest.csv`` and a ``collection.yaml``; return the manifest path.

    Idempotent: when ``cohort.json`` records the same config (and version) and every file exists,
    nothing is written. ``cohort.json`` is written last, so an interrupted run is redone.
    """
    import yaml
    from tqdm.auto import tqdm

    config = config or PhantomConfig()
    root = Path(root)
    manifest = root / "manifest.csv"
    if _complete(root, config):
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    (root / "cohort.json").unlink(missing_ok=True)
    ids = [subject_id(i) for i in range(config.n_subjects)]
    _remove_stale(root, set(ids))
    splits = assign_splits(config.n_subjects, config.seed, config.split)
    rows = []
    bar = tqdm(range(config.n_subjects), desc="brain phantom", unit="subject", disable=not progress)
    for i in bar:
        s = generate_subject(i, config)
        folder = root / s["id"]
        folder.mkdir(exist_ok=True)
        row = {"id": s["id"], "split": splits[i]}
        for m in MODALITIES:
            path = folder / f"{m}.nii.gz"
            if m in s["images"]:
                _save_nifti(path, s["images"][m], s["affine"])
                row[f"image:{m}"] = f"{s['id']}/{m}.nii.gz"
            else:
                path.unlink(missing_ok=True)  # a stale file from another config must not look present
                row[f"image:{m}"] = ""
        _save_nifti(folder / "seg.nii.gz", s["label"], s["affine"])
        details = {
            "id": s["id"],
            "enhancing": s["enhancing"],
            "survival": s["survival"],
            "missing": s["missing"],
            **s["info"],
        }
        _write_atomic(folder / "subject.json", json.dumps(details, indent=1).encode())
        row.update(
            {
                "label:enhancing": s["enhancing"],
                "label:survival": s["survival"],
                "mask:tumour": f"{s['id']}/seg.nii.gz",
            }
        )
        rows.append(row)

    tmp = root / ".manifest.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    _write_atomic(root / "collection.yaml", yaml.safe_dump(COLLECTION, sort_keys=False).encode())
    _write_atomic(root / "cohort.json", json.dumps(_stamp(config), indent=1).encode())
    return manifest


# ----------------------------------------------------------------------------------------------------
# A picture


def plot_subject(subject: dict[str, Any], path: str | Path, slice_index: int | None = None) -> Path:
    """Save an axial slice of the four contrasts and the label overlay as PNG, in radiological
    convention (anterior at the top, the subject's right on the viewer's left). Default slice: the one
    with the most tumour, else the middle."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    label = subject["label"]
    if slice_index is None:
        area = (label > 0).sum((1, 2))
        slice_index = int(area.argmax()) if area.any() else label.shape[0] // 2

    def view(a: np.ndarray) -> np.ndarray:  # (y, x) -> rows anterior first, columns right first
        return a[slice_index][::-1, ::-1]

    fig = Figure(figsize=(3.0 * (len(MODALITIES) + 1), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(MODALITIES) + 1)
    for ax, m in zip(axes, MODALITIES):
        ax.set_title(m)
        ax.set_axis_off()
        if m not in subject["images"]:
            ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            continue
        img = view(subject["images"][m])
        hi = np.percentile(img[img > 0], 99.5) if (img > 0).any() else 1.0
        ax.imshow(img, cmap="gray", vmin=0, vmax=hi)
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, va="center")
    shown = [m for m in ("FLAIR", "T1c", "T2w", "T1w") if m in subject["images"]]
    background = view(subject["images"][shown[0]]) if shown else None
    ax = axes[-1]
    ax.set_axis_off()
    ax.set_title("label: NCR / ED / ET")
    if background is not None:
        ax.imshow(background, cmap="gray", vmin=0, vmax=np.percentile(background, 99.5) or 1.0)
    overlay = np.ma.masked_equal(view(label), 0)
    ax.imshow(
        overlay,
        cmap=ListedColormap(["red", "limegreen", "yellow"]),
        vmin=0.5,
        vmax=3.5,
        alpha=0.6,
        interpolation="nearest",
    )
    fig.suptitle(
        f"{subject['id']} (simulated), axial slice {slice_index}: enhancing={subject['enhancing']}, "
        f"survival={subject['survival']} d"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


__all__ = [
    "CLASSES",
    "MODALITIES",
    "SCANNERS",
    "SCANNER_3T",
    "SCANNER_15T",
    "PhantomConfig",
    "ScannerProfile",
    "Sequence",
    "SubjectParameters",
    "Tissue",
    "assign_splits",
    "brats_regions",
    "generate_subject",
    "plot_subject",
    "subject_parameters",
    "survival_days",
    "write_cohort",
]
