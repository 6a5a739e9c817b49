"""Example predictions for reports: a model's label maps on a few studies, beside their truth.

Why not reuse `evaluate`: metrics are pooled batch by batch and the maps thrown away; a report needs
the maps of a handful of studies, and the demo needs every test study's map once for region Dice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from medformer.data.dataset import collate
from medformer.evaluate.figures import OverlayRow
from medformer.evaluate.predict import to_device

# the modality drawn under a brain-tumour overlay, in order of preference (oedema shows best on FLAIR)
BACKGROUND = ("FLAIR", "T2w", "T1c", "T1w")


@dataclass
class Example:
    """One study: its images ``(M, *spatial)``, which modalities it has, its true label map."""

    id: str
    images: np.ndarray
    modalities: tuple[str, ...]
    present: tuple[bool, ...]
    truth: np.ndarray

    def background(self) -> tuple[str, np.ndarray]:
        """The modality to draw under an overlay: FLAIR when the study has it, else the next best."""
        order = [m for m in BACKGROUND if m in self.modalities] + list(self.modalities)
        name = next(m for m in order if self.present[self.modalities.index(m)])
        return name, self.images[self.modalities.index(name)]


def segmentation_examples(
    dataset: Dataset, label_key: str, limit: int | None = None, tumour_first: bool = True
) -> list[Example]:
    """Up to ``limit`` studies of ``dataset`` that carry the label ``label_key``, in dataset order;
    with ``tumour_first`` those with some foreground come first (the scan stops once ``limit`` of them
    are found, so a large split is not read whole)."""
    found: list[Example] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if label_key not in item["labels"] or not bool(item["has_label"][label_key]):
            continue
        found.append(
            Example(
                id=str(item["id"]),
                images=item["images"].numpy(),
                modalities=tuple(item["modalities"]),
                present=tuple(bool(p) for p in item["present"]),
                truth=item["labels"][label_key].numpy(),
            )
        )
        done = [e for e in found if (e.truth > 0).any()] if tumour_first else found
        if limit is not None and len(done) >= limit:
            break
    if tumour_first:
        found.sort(key=lambda e: not (e.truth > 0).any())  # stable: dataset order within each group
    return found[:limit] if limit is not None else found


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    dataset: Dataset,
    task_key: str,
    ids: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
) -> dict[str, np.ndarray]:
    """Argmax label maps of segmentation task ``task_key`` for the studies ``ids`` (default: all)."""
    model.eval()
    wanted = None if ids is None else set(ids)
    index = [i for i in range(len(dataset)) if wanted is None or _id(dataset, i) in wanted]
    maps: dict[str, np.ndarray] = {}
    for batch in DataLoader(Subset(dataset, index), batch_size=batch_size, collate_fn=collate):
        batch = to_device(batch, torch.device(device))
        logits = model(batch, tasks=[task_key])[task_key]
        for study, pred in zip(batch["ids"], logits.argmax(1).cpu().numpy()):
            maps[str(study)] = pred.astype(np.uint8)
    return maps


def _id(dataset: Dataset, i: int) -> str:
    studies = getattr(dataset, "studies", None)
    return str(studies[i].id) if studies is not None else str(dataset[i]["id"])


def overlay_rows(
    examples: Sequence[Example],
    predictions: dict[str, dict[str, np.ndarray]],
    notes: dict[str, dict[str, str]] | None = None,
) -> list[OverlayRow]:
    """`OverlayRow`s for `segmentation_overlays`: ``predictions`` maps a model's name to its label maps
    by study id; ``notes`` the same to a line of text per study (e.g. its Dice)."""
    rows = []
    for ex in examples:
        name, image = ex.background()
        rows.append(
            OverlayRow(
                study=ex.id,
                image=image,
                image_name=name,
                truth=ex.truth,
                predictions={model: maps[ex.id] for model, maps in predictions.items() if ex.id in maps},
                notes={model: per[ex.id] for model, per in (notes or {}).items() if ex.id in per},
            )
        )
    return rows


def mean_region_dice(model: nn.Module, dataset: Dataset, task_key: str, labels: Sequence[int]) -> float:
    """Mean over the dataset's studies of the Dice of the region ``labels`` (e.g. (1, 2, 3): the whole
    tumour) predicted by segmentation task ``task_key``."""
    maps = predict_labels(model, dataset, task_key, device=next(model.parameters()).device)
    label = model.tasks[task_key].spec.key
    items = [dataset[i] for i in range(len(dataset))]
    return float(np.mean([dice(maps[str(x["id"])], np.asarray(x["labels"][label]), labels) for x in items]))


def dice(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> float:
    """Dice of the region ``labels`` (e.g. (1, 2, 3) for the whole tumour); 1 when both are empty."""
    p, t = np.isin(pred, labels), np.isin(truth, labels)
    total = int(p.sum() + t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
