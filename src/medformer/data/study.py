"""Core data types: a Study (one subject), a TaskSpec (one label), a Collection (a named data set).

A Study maps modality names to single-channel arrays on one grid (2D ``H x W`` or 3D ``D x H x W``).
Any subset of a collection's modalities may be present; a missing modality is simply absent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from medformer.errors import DataError

TaskKind = Literal["binary", "multiclass", "multilabel", "ordinal", "regression", "segmentation"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction target of a collection.

    ``num_classes`` is the number of classes (binary: 2; multilabel: number of labels; segmentation:
    number of classes including background; regression: number of outputs).
    """

    name: str
    kind: TaskKind
    num_classes: int = 2
    classes: tuple[str, ...] | None = None
    label_key: str | None = None  # where the label lives in Study.labels; defaults to `name`

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if self.num_classes < 1 or (self.kind == "binary" and self.num_classes != 2):
            raise ValueError(f"task {self.name!r}: num_classes={self.num_classes} is invalid for {self.kind}")

    @property
    def key(self) -> str:
        return self.label_key or self.name

    @property
    def out_channels(self) -> int:
        """Width of the model output for this task.

        binary: one logit; multiclass/ordinal: one logit per class (the MedMNIST convention, so the
        official evaluator's one-vs-rest AUC applies); multilabel: one logit per label; regression: one
        value per output; segmentation: one logit per class per voxel.
        """
        return 1 if self.kind == "binary" else self.num_classes

    def check_label(self, value: Any, where: str | Path | None) -> None:
        """Raise DataError when `value` is not a valid label for this task."""
        arr = np.asarray(value)
        if self.kind == "regression":
            if arr.size != self.num_classes or not np.all(np.isfinite(arr.astype(np.float64))):
                raise DataError(
                    where, f"label {self.name!r} = {value!r}: expected {self.num_classes} finite value(s)"
                )
            return
        if self.kind == "multilabel":
            if arr.size != self.num_classes or not np.isin(arr, (0, 1)).all():
                raise DataError(
                    where,
                    f"label {self.name!r}: expected {self.num_classes} values in {{0, 1}}, "
                    f"got {arr.tolist()}",
                )
            return
        if arr.size == 0 or not np.all(np.isfinite(arr.astype(np.float64))):
            raise DataError(where, f"label {self.name!r} is empty or not finite")
        if not np.all(arr == np.round(arr)) or arr.min() < 0 or arr.max() >= self.num_classes:
            bad = (arr.max() if arr.max() >= self.num_classes else arr.min()).item()
            raise DataError(
                where,
                f"label {self.name!r} = {bad!r} is out of the declared range 0..{self.num_classes - 1} "
                f"({self.kind}, {self.num_classes} classes)",
            )


@dataclass
class Study:
    """One subject (or one 2D image): modality name -> single-channel array, plus labels and metadata.

    Arrays may be absent until loaded: ``sources`` holds the file of each modality and ``images`` the
    loaded arrays. ``labels`` maps a task's label key to its value (a number, a vector, or for
    segmentation an array on the image grid or the path of a mask file).
    """

    id: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    spacing: tuple[float, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.images) if self.images else list(self.sources)

    @property
    def loaded(self) -> bool:
        return bool(self.images) and set(self.images) >= set(self.sources)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return next(iter(self.images.values())).shape if self.images else None

    def where(self, modality: str | None = None) -> str:
        """The file to name in an error about this study (or its id when it has no file)."""
        if modality is not None and modality in self.sources:
            return str(self.sources[modality])
        if self.sources:
            return str(next(iter(self.sources.values())))
        return f"study {self.id!r}"

    def with_images(self, images: dict[str, np.ndarray], **changes: Any) -> Study:
        return replace(self, images=images, **changes)

    def validate(self, ndim: int | None = None, tasks: list[TaskSpec] | tuple[TaskSpec, ...] = ()) -> None:
        """Check what a model needs: one grid for all modalities, the expected dimensionality,
        finite values, labels in range. Raises DataError naming the file and the problem."""
        if not self.images:
            raise DataError(self.where(), f"study {self.id!r} has no images")
        shapes = {m: a.shape for m, a in self.images.items()}
        for m, a in self.images.items():
            if ndim is not None and a.ndim != ndim:
                kind = {2: "2D", 3: "3D"}.get(a.ndim, f"{a.ndim}-dimensional")
                raise DataError(
                    self.where(m), f"modality {m!r} is {kind} {a.shape}, but this collection is {ndim}D"
                )
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                n = int((~np.isfinite(a)).sum())
                raise DataError(self.where(m), f"modality {m!r} has {n} NaN/Inf voxel(s)")
        if len(set(shapes.values())) > 1:
            desc = ", ".join(f"{m} {s}" for m, s in shapes.items())
            raise DataError(
                self.where(),
                f"modalities of study {self.id!r} are on different grids ({desc}); "
                "resample them to one grid (preprocessing `resample_to_first: true`) or fix the files",
            )
        for task in tasks:
            if task.key in self.labels and task.kind != "segmentation":
                task.check_label(self.labels[task.key], self.where())
            elif task.key in self.labels and isinstance(self.labels[task.key], np.ndarray):
                mask = self.labels[task.key]
                if mask.shape != self.shape:
                    raise DataError(
                        self.where(),
                        f"segmentation {task.name!r} has shape {mask.shape}, image is {self.shape}",
                    )
                if mask.min() < 0 or mask.max() >= task.num_classes:
                    raise DataError(
                        self.where(),
                        f"segmentation {task.name!r} has label {int(mask.max())} "
                        f"outside 0..{task.num_classes - 1}",
                    )


@dataclass
class Collection:
    """A named set of studies of one dimensionality, with a modality vocabulary, splits and tasks."""

    name: str
    ndim: int
    modalities: list[str]
    studies: list[Study]
    tasks: list[TaskSpec] = field(default_factory=list)
    root: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise ValueError(f"collection {self.name!r}: ndim must be 2 or 3, got {self.ndim}")
        if not self.studies:
            raise DataError(self.root, f"collection {self.name!r} is empty: no studies were found")
        unknown = {m for s in self.studies for m in s.modalities} - set(self.modalities)
        if unknown:
            raise DataError(
                self.root, f"collection {self.name!r}: modalities {sorted(unknown)} not in its vocabulary"
            )

    def __len__(self) -> int:
        return len(self.studies)

    def split(self, name: str) -> list[Study]:
        return [s for s in self.studies if s.split == name]

    def split_counts(self) -> dict[str, int]:
        return dict(Counter(s.split for s in self.studies))

    def modality_counts(self) -> dict[str, int]:
        counts = Counter(m for s in self.studies for m in s.modalities)
        return {m: counts.get(m, 0) for m in self.modalities}

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(
            f"collection {self.name!r} has no task {name!r} (tasks: {[t.name for t in self.tasks]})"
        )

    def subset(self, studies: list[Study], name: str | None = None) -> Collection:
        return replace(self, studies=studies, name=name or self.name)


@dataclass(frozen=True)
class Skipped:
    """A study left out because it is bad (with ``skip_bad``): which one, where (a file) and why."""

    study: str
    where: str
    problem: str
