"""`medformer data inspect`: what a path holds and what is wrong with it, before any training."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medformer.data.study import SPLITS, Collection, Skipped, Study
from medformer.errors import DataError


@dataclass
class CollectionReport:
    """The facts `inspect` prints for one collection."""

    name: str
    ndim: int
    splits: dict[str, int]
    modalities: dict[str, int]
    shapes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[Skipped] = field(default_factory=list)

    def format(self) -> str:
        n = sum(self.splits.values())
        lines = [f"collection {self.name!r}: {n} studies, {self.ndim}D"]
        order = {s: i for i, s in enumerate(SPLITS)}
        splits = sorted(self.splits.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
        lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in splits))
        lines.append("  modalities: " + ", ".join(f"{m} ({c}/{n})" for m, c in self.modalities.items()))
        lines.append("  shapes: " + _top(self.shapes))
        if self.spacings:
            lines.append("  spacings: " + _top(self.spacings))
        for task, dist in self.labels.items():
            lines.append(f"  labels {task}: " + ", ".join(f"{k}: {v}" for k, v in dist.items()))
        if self.problems:
            lines.append(f"  problems ({len(self.problems)}):")
            lines.extend(f"    - {p.where}: {p.problem}" for p in self.problems)
        else:
            lines.append("  problems: none")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ndim": self.ndim,
            "splits": self.splits,
            "modalities": self.modalities,
            "shapes": {str(k): v for k, v in self.shapes.items()},
            "spacings": {str(k): v for k, v in self.spacings.items()},
            "labels": self.labels,
            "problems": [p.__dict__ for p in self.problems],
        }


def _top(counter: Counter, k: int = 4) -> str:
    items = counter.most_common(k)
    more = len(counter) - len(items)
    return ", ".join(f"{s} x{c}" for s, c in items) + (f", ... ({more} more)" if more > 0 else "")


def _read_raw(study: Study) -> Study:
    """Read a lazy study's files as they are (no preprocessing), to check them."""
    from medformer.data.readers import read_volume

    if not study.sources:
        return study
    vols = {m: read_volume(src) for m, src in study.sources.items()}
    affines = {m: v.affine for m, v in vols.items()}
    first = next(iter(affines.values()))
    shapes_equal = len({v.array.shape for v in vols.values()}) == 1
    if shapes_equal and not all(np.allclose(a, first, atol=1e-3) for a in affines.values()):
        differ = [m for m, a in affines.items() if not np.allclose(a, first, atol=1e-3)]
        raise DataError(study.where(), f"modalities {differ} have a different orientation/spacing (affine)")
    labels = dict(study.labels)
    for k, v in study.labels.items():
        if isinstance(v, (str, Path)):
            labels[k] = read_volume(v).array.astype(np.int64)
    spacing = tuple(float(s) for s in np.sqrt((first[:3, :3] ** 2).sum(0)))
    return study.with_images({m: v.array for m, v in vols.items()}, labels=labels, spacing=spacing)


def inspect_collection(
    collection: Collection, skip_bad: bool = True, progress: bool = True
) -> CollectionReport:
    """Read every study of a collection and collect facts and problems.

    Without ``skip_bad`` the first problem raises its DataError; with it, every problem is listed.
    """
    report = CollectionReport(
        collection.name, collection.ndim, collection.split_counts(), collection.modality_counts()
    )
    report.problems.extend(collection.metadata.get("skipped", []))
    label_counts: dict[str, Counter] = {
        t.name: Counter() for t in collection.tasks if t.kind != "segmentation"
    }
    for study in tqdm(
        collection.studies, desc=f"inspect {collection.name}", unit="study", disable=not progress
    ):
        try:
            loaded = _read_raw(study)
            loaded.validate(collection.ndim, collection.tasks)
        except DataError as e:
            if not skip_bad:
                raise
            report.problems.append(Skipped(study.id, e.path or study.where(), e.problem))
            continue
        report.shapes[loaded.shape] += 1
        if loaded.spacing:
            report.spacings[tuple(round(s, 3) for s in loaded.spacing)] += 1
        for task in collection.tasks:
            if task.name in label_counts and task.key in loaded.labels:
                label_counts[task.name][_label_name(task, loaded.labels[task.key])] += 1
    report.labels = {k: dict(sorted(v.items())) for k, v in label_counts.items()}
    return report


def _label_name(task, value) -> str:
    arr = np.asarray(value).reshape(-1)
    if task.kind == "regression":
        return "values"
    if task.kind == "multilabel":
        return "positives=" + str(int(arr.sum()))
    i = int(arr[0])
    return task.classes[i] if task.classes and i < len(task.classes) else str(i)


def inspect_path(
    path: str | Path, skip_bad: bool = False, progress: bool = True, **open_kw
) -> list[CollectionReport]:
    """Find the collections under `path` and inspect each."""
    from medformer.data.manifest import open_collections

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(path, "does not exist")
    collections = open_collections(path, skip_bad=skip_bad, **open_kw)
    return [inspect_collection(c, skip_bad=skip_bad, progress=progress) for c in collections]
