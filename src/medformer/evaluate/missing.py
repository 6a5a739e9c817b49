"""Robustness to missing modalities: segment with some input modalities withheld at test time.

A multi-parametric MRI protocol is often incomplete in the clinic (a contrast not acquired, a series
corrupted). How a model copes depends on what stands in for the missing images:

- ``drop``: the modality is marked absent; Medformer simply has no tokens for it (its native way);
- ``zero``: the image is replaced by zeros and marked present (what a fixed-channel network such as a
  UNet has to do, and the baseline of the BrainMVP paper);
- ``template``: the image is replaced by the modality's learned BrainMVP template at the study's
  position (`medformer.models.templates.ModalityTemplates.fill`) and marked present.

The chosen fill applies to every missing modality of a study: those withheld here and those the study
never had.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medformer.data.dataset import collate
from medformer.evaluate.metrics import brats_dice
from medformer.evaluate.predict import to_device

Fill = Literal["drop", "zero", "template"]
FILLS: tuple[Fill, ...] = ("drop", "zero", "template")


def withheld_sets(modalities: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """Every choice of ``k`` modalities to withhold (``k = 0``: the one empty choice)."""
    return list(itertools.combinations(modalities, k))


def fill_absent(batch: Mapping[str, Any], fill: Fill, templates: nn.Module | None = None) -> dict[str, Any]:
    """The batch with its missing modalities handled by ``fill`` (module docstring)."""
    if fill == "drop":
        return dict(batch)
    if fill == "zero":
        images, present = batch["images"], batch["present"].to(batch["images"].device)
        mask = present.view(*present.shape, *[1] * (images.dim() - 2))
        zeros = torch.zeros((), dtype=images.dtype, device=images.device)  # NaN stand-ins too
        return {**batch, "images": torch.where(mask, images, zeros), "present": torch.ones_like(present)}
    if fill == "template":
        if templates is None:
            raise ValueError("fill='template' needs a model with modality templates (BrainMVP pre-training)")
        return templates.fill(batch)
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")


def _batches(dataset: Dataset, withheld: Sequence[str], batch_size: int) -> Iterator[dict[str, Any]]:
    """The dataset's studies with ``withheld`` marked absent, batched; a study left with no modality is
    skipped (there is nothing to segment from)."""
    items = []
    for i in range(len(dataset)):
        item = dict(dataset[i])
        cols = [item["modalities"].index(m) for m in withheld if m in item["modalities"]]
        present = item["present"].clone()
        present[cols] = False
        if not bool(present.any()):
            continue
        items.append({**item, "present": present})
        if len(items) == batch_size:
            yield collate(items)
            items = []
    if items:
        yield collate(items)


@torch.no_grad()
def missing_modality_scores(
    model: nn.Module,
    dataset: Dataset,
    task_key: str,
    withheld: Sequence[Sequence[str]],
    fill: Fill,
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]] = brats_dice,
    batch_size: int = 2,
) -> dict[str, float]:
    """Mean ``score(pred, truth)`` (default: BraTS-region Dice) of segmentation task ``task_key`` over
    the studies of ``dataset`` and the modality sets in ``withheld`` (each withheld in turn), with the
    missing modalities handled by ``fill``; ``n`` counts the (study, set) pairs scored.

    The model's own ``templates.fill_missing`` is switched off meanwhile, so ``fill`` alone decides.
    """
    model.eval()
    device = next(model.parameters()).device
    templates = getattr(model, "templates", None)
    saved = getattr(templates, "fill_missing", False)
    label = model.tasks[task_key].spec.key
    sums: dict[str, float] = {}
    count = 0
    try:
        if templates is not None:
            templates.fill_missing = False
        for names in withheld:
            for batch in _batches(dataset, names, batch_size):
                batch = fill_absent(to_device(batch, device), fill, templates)
                pred = model(batch, tasks=[task_key])[task_key].argmax(1).cpu().numpy()
                for key, value in score(pred, batch["labels"][label].cpu().numpy()).items():
                    sums[key] = sums.get(key, 0.0) + value * len(pred)
                count += len(pred)
    finally:
        if templates is not None:
            templates.fill_missing = saved
    if count == 0:
        raise ValueError(f"no study of the dataset keeps a modality with {list(withheld)} withheld")
    return {**{k: v / count for k, v in sums.items()}, "n": count}


__all__ = ["FILLS", "Fill", "fill_absent", "missing_modality_scores", "withheld_sets"]
