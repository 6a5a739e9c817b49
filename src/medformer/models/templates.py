"""Learned modality templates (BrainMVP, Rui et al., CVPR 2025): one volume per modality on a common grid.

Why: BrainMVP's modality template distillation fills masked blocks of a modality with its template and
asks the network to reconstruct the modality; the templates, learned end to end from zeros, become a
compact per-modality prior of the anatomy (a population-average contrast). Downstream they stand in
for a missing input modality, and replacing some input modalities by their templates is an
augmentation (channel mixing) that makes a fine-tuned model robust to missing ones.

Placement. Templates live on a *reference grid* of shape ``shape``; a study's array is cut out of it
at the array's origin in that grid, zeros outside. The batch carries, per study, where the array sits
in its own uncropped (reoriented, resampled) grid: ``origin``, that grid's shape ``grid`` and its
foreground box ``foreground``, recorded by preprocessing (`medformer.data.transforms`). Two alignments:

- ``"grid"`` (BrainMVP's code): the study's grid is centred on the reference grid. The official code
  crops the foreground symmetrically about the image centre and shifts by ``(template - crop) // 2``,
  which puts the image centre at the template centre: right for atlas-registered cohorts (BraTS:
  SRI24, 240 x 240 x 155) and for a reference grid of the study grid's shape (then the same voxel);
- ``"box"``: the study's foreground box is centred on the reference grid, so brains line up by their
  bounding box: for cohorts that are not registered (any field of view).

A random crop taken later (pre-training crops) only moves ``origin``. Each template is its own
parameter, named after its modality (``input_adaptformer.templates.volumes.T1w``), so a model saves
and loads them like any other weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from medformer.errors import ConfigError

Align = Literal["grid", "box"]
ALIGNMENTS = ("grid", "box")


@dataclass
class Placement:
    """Where a batch's arrays sit in their studies' uncropped grids (see `medformer.data.transforms`)."""

    origin: Tensor  # (B, d) long: the grid voxel of each array's first voxel
    grid: Tensor  # (B, d) long: the grid's shape
    foreground: Tensor  # (B, 2, d) long: the foreground box [start, end) in the grid

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> Placement:
        """The batch's placement; an array without that record is its own grid (and box)."""
        images = batch["images"]
        b, spatial = images.shape[0], list(images.shape[2:])
        whole = torch.tensor(spatial, dtype=torch.long).expand(b, -1)
        origin = batch.get("origin", torch.zeros_like(whole))
        grid = batch.get("grid", whole)
        foreground = batch.get("foreground", torch.stack([torch.zeros_like(whole), whole], 1))
        return cls(*(torch.as_tensor(t).long().to(images.device) for t in (origin, grid, foreground)))

    def shifted(self, corner: Tensor) -> Placement:
        """The placement of windows cut at ``corner`` ``(B, d)`` of the arrays."""
        return replace(self, origin=self.origin + corner.to(self.origin.device))

    def reference_origin(self, shape: Sequence[int], align: Align) -> Tensor:
        """Each array's first voxel in a reference grid of ``shape``, ``(B, d)``: the study's grid
        (``"grid"``) or its foreground box (``"box"``) centred on it, ``(reference - size) // 2``."""
        reference = torch.as_tensor(list(shape), dtype=torch.long, device=self.origin.device)
        if align == "grid":
            return self.origin + torch.div(reference - self.grid, 2, rounding_mode="floor")
        if align == "box":
            start, size = self.foreground[:, 0], self.foreground[:, 1] - self.foreground[:, 0]
            return self.origin - start + torch.div(reference - size, 2, rounding_mode="floor")
        raise ValueError(f"template align {align!r} is not one of {ALIGNMENTS}")


def window(volume: Tensor, origin: Tensor, size: Sequence[int]) -> Tensor:
    """``volume[o : o + size]`` for every origin ``o`` in ``(B, d)``: ``(B, *size)``, zeros outside the
    volume. One gather with broadcast indices (no loop over samples); differentiable in ``volume``."""
    d = len(size)
    index, inside = [], None
    for axis, (n, limit) in enumerate(zip(size, volume.shape)):
        coords = origin[:, axis, None] + torch.arange(n, device=origin.device)  # (B, n)
        view = [-1] + [1] * d
        view[axis + 1] = n
        index.append(coords.clamp(0, limit - 1).view(view))
        ok = ((coords >= 0) & (coords < limit)).view(view)
        inside = ok if inside is None else inside & ok
    return volume[tuple(index)] * inside.to(volume.dtype)


class ModalityTemplates(nn.Module):
    """One learnable volume per modality (initialised to zeros, as in BrainMVP) on a reference grid.

    ``align``: how a study is placed on the grid (module docstring). ``normalise``: min-max scale each
    template to [0, 1] before use, as BrainMVP's code does (off by default: the scaling multiplies the
    gradient of a near-constant template by 1 / (max - min), which dominates a global gradient-norm
    clip). ``fill_missing``: `Medformer.forward` fills a study's missing modalities from their templates
    (saved with the model, so inference does the same). ``lr_scale``: the templates learn this many
    times faster than the network: each is stored divided by it (``volumes``) and used multiplied by it,
    so an Adam step, about ``lr`` on the stored value, moves the template ``lr_scale x lr``. Why: a
    template has to travel from 0 to the images' intensities, a voxel's gradient is noisy, and a
    schedule tuned for the network would leave it near zero for a long time.
    """

    def __init__(
        self,
        shape: Sequence[int],
        modalities: Sequence[str] = (),
        align: Align = "grid",
        normalise: bool = False,
        fill_missing: bool = False,
        lr_scale: float = 10.0,
    ):
        super().__init__()
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"template shape must be 2 or 3 positive sizes, got {list(shape)}")
        if align not in ALIGNMENTS:
            raise ValueError(f"template align {align!r} is not one of {ALIGNMENTS}")
        if lr_scale <= 0:
            raise ValueError(f"template lr_scale must be positive, got {lr_scale}")
        self.shape = tuple(int(s) for s in shape)
        self.align: Align = align
        self.normalise = normalise
        self.fill_missing = fill_missing
        self.lr_scale = float(lr_scale)
        self.volumes = nn.ParameterDict()
        for name in modalities:
            self.add(name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def modalities(self) -> list[str]:
        return list(self.volumes)

    def add(self, name: str) -> None:
        """A zero template for a new modality (idempotent), on the device and dtype of the others."""
        if name in self.volumes:
            return
        like = next(iter(self.volumes.values()), None)
        kwargs = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.volumes[name] = nn.Parameter(torch.zeros(self.shape, **kwargs))

    def template(self, name: str) -> Tensor:
        """The template of one modality as used for filling (min-max scaled when ``normalise``)."""
        t = self.volumes[name] * self.lr_scale
        if self.normalise:
            t = (t - t.min()) / (t.max() - t.min() + 1e-9)
        return t

    @torch.no_grad()
    def set(self, name: str, values: Tensor | np.ndarray) -> None:
        """Set a modality's template (before any ``normalise`` scaling), e.g. from an atlas."""
        self.add(name)
        raw = self.volumes[name]
        raw.copy_(torch.as_tensor(values, dtype=raw.dtype).to(raw.device).expand(self.shape) / self.lr_scale)

    def origin(self, batch: Mapping[str, Any]) -> Tensor:
        """Each array's first voxel in the reference grid, ``(B, d)``."""
        return Placement.of(batch).reference_origin(self.shape, self.align)

    def crop(self, modalities: Sequence[str], origin: Tensor, size: Sequence[int]) -> Tensor:
        """The template of ``modalities[b]`` (one name per sample) at ``origin[b]``: ``(B, *size)``."""
        rows: dict[str, list[int]] = {}
        for b, name in enumerate(modalities):
            rows.setdefault(name, []).append(b)
        missing = sorted(set(rows) - set(self.volumes))
        if missing:
            raise KeyError(f"no template for modalities {missing} (templates: {self.modalities})")
        parts = [
            window(self.template(n), origin[torch.tensor(r, device=origin.device)], size)
            for n, r in rows.items()
        ]
        order = torch.tensor([b for r in rows.values() for b in r], device=origin.device)
        return torch.cat(parts)[torch.argsort(order)]

    @torch.no_grad()
    def fill(self, batch: Mapping[str, Any], replace: Tensor | None = None) -> dict[str, Any]:
        """A new batch whose missing modalities (and those marked in ``replace (B, M)``) hold their
        templates, now marked present. Modalities without a template, and batches of another
        dimensionality, are left as they are. No gradient reaches the templates."""
        images, present = batch["images"], batch["present"].to(batch["images"].device)
        if images.dim() - 2 != self.ndim:
            return dict(batch)
        has = torch.tensor([m in self.volumes for m in batch["modalities"]], device=images.device)
        target = (~present if replace is None else ~present | replace.to(images.device)) & has
        if not bool(target.any()):
            return dict(batch)
        origin, spatial = self.origin(batch), tuple(images.shape[2:])
        out = images.clone()
        for j, name in enumerate(batch["modalities"]):
            rows = torch.nonzero(target[:, j]).flatten()
            if len(rows):
                out[rows, j] = window(self.template(name), origin[rows], spatial).to(out.dtype)
        return {**batch, "images": out, "present": present | target}

    # -- saving and viewing -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What `Medformer.save` writes into config.json to rebuild this module."""
        return {
            "shape": list(self.shape),
            "modalities": self.modalities,
            "align": self.align,
            "normalise": self.normalise,
            "fill_missing": self.fill_missing,
            "lr_scale": self.lr_scale,
        }

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> ModalityTemplates:
        return cls(d["shape"], d.get("modalities", ()), d.get("align", "grid"), d.get("normalise", False),
                   d.get("fill_missing", False), d.get("lr_scale", 1.0))  # fmt: skip

    @torch.no_grad()
    def arrays(self) -> dict[str, np.ndarray]:
        """Modality -> template as float32 NumPy (as used for filling)."""
        return {m: self.template(m).detach().float().cpu().numpy() for m in self.volumes}


class TemplateMix:
    """BrainMVP's template channel mixing for fine-tuning: per study, replace ``0..max_mix`` of its present
    modalities (drawn uniformly, at least one real modality kept) by their templates.

    A batch callable like `medformer.data.augment.Augment`; draws come from torch's global generator,
    which the engine seeds per rank and checkpoints.
    """

    def __init__(self, templates: ModalityTemplates, max_mix: int = 1):
        if max_mix < 0:
            raise ValueError(f"max_mix must be >= 0, got {max_mix}")
        self.templates, self.max_mix = templates, max_mix

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        images, present = batch["images"], batch["present"].cpu()
        if self.max_mix == 0 or images.dim() - 2 != self.templates.ndim:
            return dict(batch)
        b, m = present.shape
        has = torch.tensor([name in self.templates.volumes for name in batch["modalities"]])
        eligible = present & has
        cap = torch.minimum(eligible.sum(1), present.sum(1) - 1).clamp(0, self.max_mix)  # keep one real
        count = (torch.rand(b) * (cap + 1)).floor().long()  # uniform over 0..cap
        scores = torch.rand(b, m).masked_fill(~eligible, 2.0)
        rank = scores.argsort(1).argsort(1)  # a random order of the eligible modalities first
        replace = eligible & (rank < count[:, None])
        return self.templates.fill(batch, replace=replace)


def export_templates(
    templates: ModalityTemplates, directory: str | Path, spacing: Sequence[float] | None = None
) -> list[Path]:
    """Write each template as ``<modality>.nii.gz`` and a PNG of mid-slices of all of them.

    3D arrays are ``(z, y, x)`` (RAS, as preprocessing yields): NIfTI files hold ``(x, y, z)`` with a
    diagonal affine of ``spacing`` (1 mm by default), as the brain phantom writes its volumes.
    """
    import nibabel as nib

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = templates.arrays()
    spacing = list(spacing or [1.0] * templates.ndim)
    written = []
    for name, arr in arrays.items():
        data = arr.transpose(2, 1, 0) if arr.ndim == 3 else arr.T
        affine = np.diag([*spacing[::-1], *([1.0] * (4 - len(spacing)))])
        img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        img.header.set_xyzt_units("mm")
        path = out / f"{name}.nii.gz"
        nib.save(img, path)
        written.append(path)
    if arrays:
        written.append(plot_templates(arrays, out / "templates.png"))
    return written


def plot_templates(arrays: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """One row per modality: axial, coronal and sagittal mid-slices (3D) or the image (2D), each in its
    own grey range, radiological view (anterior up, the subject's right on the left)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(arrays)
    three_d = next(iter(arrays.values())).ndim == 3
    cols = 3 if three_d else 1
    fig = Figure(figsize=(2.6 * cols, 2.6 * len(names) + 0.4))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(names), cols, squeeze=False))
    for row, name in enumerate(names):
        a = arrays[name]
        if three_d:
            d, h, w = a.shape
            views = {
                "axial": a[d // 2][::-1, ::-1],
                "coronal": a[:, h // 2][::-1, ::-1],
                "sagittal": a[:, :, w // 2][::-1],
            }
        else:
            views = {"image": a}
        lo, hi = float(a.min()), float(a.max())
        for ax, (title, img) in zip(axes[row], views.items()):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1.0)
            ax.set_axis_off()
            ax.set_title(f"{name} {title}" if three_d else name, fontsize=9)
    fig.suptitle("learned modality templates (mid-slices)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def templates_for_finetuning(
    model: nn.Module, fill_missing: bool, mix: int, augment: Callable[[Any], Any] | None = None
) -> Callable[[Mapping[str, Any]], dict[str, Any]] | None:
    """Use a pre-trained model's templates while fine-tuning: the training-batch transform (template
    fill of missing modalities, then channel mixing of up to ``mix`` modalities, then ``augment``).

    ``fill_missing`` is set on the model's templates, so the fine-tuned model saved from this run fills
    missing modalities at evaluation and prediction too. Raises `ConfigError` when the model has none.
    """
    if not (fill_missing or mix):
        return augment
    templates = getattr(model, "templates", None)
    if templates is None:
        raise ConfigError(
            "templates.fill_missing / templates.mix need a model with modality templates: "
            "model.init = a model pre-trained with task: brainmvp"
        )
    templates.fill_missing = fill_missing
    mixer = TemplateMix(templates, mix) if mix else None

    def transform(batch: Mapping[str, Any]) -> dict[str, Any]:
        out = templates.fill(batch) if fill_missing else dict(batch)
        out = mixer(out) if mixer is not None else out
        return augment(out) if augment is not None else out

    return transform
