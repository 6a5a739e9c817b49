"""From studies to tensors: a torch Dataset over one collection split, and the batch format.

A batch is a dict (every model, objective and metric reads this one format):

- ``images``: float32 ``(B, M, *spatial)`` with ``M = len(modalities)``; a missing modality is zeros
- ``present``: bool ``(B, M)``: which modalities each study really has
- ``modalities``: the collection's modality vocabulary (the order of the ``M`` axis)
- ``collection``: the collection's name; ``ndim``: 2 or 3
- ``labels``: task label key -> tensor ``(B, ...)``; ``has_label``: key -> bool ``(B,)``
- ``ids``: the study ids
- ``origin``: long ``(B, ndim)``: where each array's first voxel lies in its study's uncropped grid,
  ``grid``: long ``(B, ndim)``: that grid's shape, ``foreground``: long ``(B, 2, ndim)``: the foreground
  box ``[start, end)`` in it (recorded by preprocessing; an array without that record is its own grid)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medformer.data.study import Collection, Study, TaskSpec

Batch = dict[str, Any]


def label_tensor(task: TaskSpec, value: Any) -> torch.Tensor:
    """A label as the tensor its loss expects (missing labels become a placeholder of the right shape)."""
    if task.kind in ("multiclass", "ordinal"):
        return torch.as_tensor(
            -1 if value is None else int(np.asarray(value).reshape(-1)[0]), dtype=torch.long
        )
    if task.kind == "segmentation":
        return torch.as_tensor(np.asarray(value), dtype=torch.long)
    if value is None:
        return torch.zeros(task.out_channels)
    return torch.as_tensor(np.asarray(value, dtype=np.float32).reshape(-1))


class CollectionDataset(Dataset):
    """Items of one split of a collection, as dicts that `collate` stacks into a batch.

    ``load`` turns a study into a loaded, preprocessed study (e.g. a `PreprocessCache`); for
    collections held in memory (MedMNIST) it is the identity. ``transform`` is an optional augmentation
    applied to the ``(M, *spatial)`` array.
    """

    def __init__(
        self,
        collection: Collection,
        split: str | None = "train",
        load: Callable[[Study], Study] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        studies: Sequence[Study] | None = None,
    ):
        self.collection = collection
        self.studies = (
            list(studies)
            if studies is not None
            else (collection.split(split) if split else list(collection.studies))
        )
        self.load = load
        self.transform = transform

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        if self.load is not None:
            study = self.load(study)
        return study_to_item(study, self.collection, self.transform)


def study_to_item(
    study: Study, collection: Collection, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> dict[str, Any]:
    shape = study.shape
    images = np.zeros((len(collection.modalities), *shape), dtype=np.float32)
    present = np.zeros(len(collection.modalities), dtype=bool)
    integer = False
    for i, m in enumerate(collection.modalities):
        if m in study.images:
            images[i] = study.images[m]
            present[i] = True
            integer |= study.images[m].dtype.kind in "ui"
    if integer and "image_scale" in collection.metadata:  # large MedMNIST sets are kept as uint8
        images *= collection.metadata["image_scale"]
    if transform is not None:
        images = np.asarray(transform(images), dtype=np.float32)
    labels, has_label = {}, {}
    for task in collection.tasks:
        value = study.labels.get(task.key)
        if task.kind == "segmentation" and value is None:
            value = np.zeros(images.shape[1:], dtype=np.int64)
        labels[task.key] = label_tensor(task, value)
        has_label[task.key] = value is not None and not (
            task.kind == "segmentation" and task.key not in study.labels
        )
    origin = study.metadata.get("origin", [0] * len(shape))
    grid = study.metadata.get("grid", list(shape))
    foreground = study.metadata.get("foreground", [[0] * len(shape), list(shape)])
    return {
        "images": torch.from_numpy(images),
        "present": torch.from_numpy(present),
        "origin": torch.as_tensor(origin, dtype=torch.long),
        "grid": torch.as_tensor(grid, dtype=torch.long),
        "foreground": torch.as_tensor(foreground, dtype=torch.long),
        "labels": labels,
        "has_label": has_label,
        "id": study.id,
        "collection": collection.name,
        "modalities": tuple(collection.modalities),
        "ndim": collection.ndim,
    }


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack items of one collection into a batch (see the module docstring for the format)."""
    first = items[0]
    if any(it["collection"] != first["collection"] for it in items):
        raise ValueError("a batch must hold studies of one collection (use MultiCollectionSampler)")
    placement = {
        k: torch.stack([it[k] for it in items]) for k in ("origin", "grid", "foreground") if k in first
    }
    return {
        "images": torch.stack([it["images"] for it in items]),
        "present": torch.stack([it["present"] for it in items]),
        **placement,
        "labels": {k: torch.stack([it["labels"][k] for it in items]) for k in first["labels"]},
        "has_label": {k: torch.tensor([it["has_label"][k] for it in items]) for k in first["has_label"]},
        "ids": [it["id"] for it in items],
        "collection": first["collection"],
        "modalities": first["modalities"],
        "ndim": first["ndim"],
    }
