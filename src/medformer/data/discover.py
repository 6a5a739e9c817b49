"""A collection discovered from a folder layout, with no manifest to write.

::

    root/
      collection.yaml          optional: name, ndim, modalities, tasks (as for a CSV manifest)
      splits.csv               optional: id,split
      sub-001/t1.nii.gz        one file per modality, named after it (.nii, .nii.gz, .npy, .png, ...)
      sub-001/flair.nii.gz
      sub-001/seg.nii.gz       seg / label / mask / segmentation (any extension): the segmentation mask
      sub-002/t1/IM0001 ...    a DICOM series: a subfolder named after the modality
      sub-002/ct/...           a subject may lack some modalities

- Subject folders become studies (id = folder name); a folder with no image file is skipped and
  listed in ``collection.metadata["skipped"]``. A root holding image files directly (no subject
  folders) gives one study per file, modality ``image``.
- Masks form one task named ``segmentation`` (or the single segmentation task the sidecar declares),
  with the sidecar's ``num_classes`` or the first mask's ``max + 1``.
- Splits: ``splits.csv`` (id,split) when present, subjects it does not list going to train; without
  it a deterministic hash of the id (`hash_split`): 80% train, 10% val, 10% test, the same on every
  machine and run, and stable when subjects are added (no subject moves between splits).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from medformer.data.manifest import (
    SEGMENTATION_TASK,
    SIDECAR,
    Problems,
    finish_collection,
    infer_mask_classes,
    normalize_split,
    read_sidecar,
)
from medformer.data.readers import has_dicom_magic, image_stem, is_dicom_folder, is_image_file
from medformer.data.study import Collection, Skipped, Study, TaskSpec
from medformer.errors import DataError

MASK_NAMES = ("seg", "label", "mask", "segmentation")
SPLITS_FILE = "splits.csv"
_NO_STUDIES = (
    "no studies found: expected subject folders root/<subject>/<modality>.nii.gz (or .nii, .npy, .png, "
    "or a DICOM series folder root/<subject>/<modality>/), image files directly in the folder, a CSV "
    "manifest, a dataset.json datalist, or MedMNIST .npz files"
)


def hash_split(study_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """train/val/test from a hash of the id: deterministic everywhere (unlike Python's ``hash``)."""
    digest = hashlib.sha256(study_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def read_splits(path: Path) -> dict[str, str]:
    """``splits.csv`` (columns id, split) -> {id: split}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in reader.fieldnames or []]
            if "id" not in fields or "split" not in fields:
                raise DataError(path, f"needs columns id and split, has {fields}")
            splits = {}
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if row.get("id"):
                    splits[row["id"]] = normalize_split(row["split"], f"{path} line {reader.line_num}")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot be read as CSV: {exc}") from exc
    return splits


def load_folder(
    root: str | Path, *, name: str | None = None, sidecar: str | Path | None = None, skip_bad: bool = False
) -> Collection:
    """A collection from the folder layout in the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    side_path = Path(sidecar) if sidecar else root / SIDECAR
    side = read_sidecar(side_path) if side_path.exists() else {"tasks": []}
    problems = Problems(root)
    skipped_dirs: list[Path] = []
    studies = []
    for subject in _visible(root):
        if not subject.is_dir():
            continue
        study = _subject_study(subject, problems)
        if study is None:
            skipped_dirs.append(subject)
        else:
            studies.append(study)
    if not studies and not problems:
        studies = [
            Study(image_stem(f), sources={"image": f})
            for f in _visible(root)
            if f.is_file() and is_image_file(f)
        ]
    if not studies and not problems:
        raise DataError(root, _NO_STUDIES)

    splits_path = root / SPLITS_FILE
    listed = read_splits(splits_path) if splits_path.exists() else None
    for study in studies:
        study.split = listed.get(study.id, "train") if listed is not None else hash_split(study.id)

    tasks = _mask_tasks(studies, side, side_path)
    modalities = sorted({m for s in studies for m in s.sources})
    collection = finish_collection(
        root, studies, tasks, side, name, problems, skip_bad, modalities, root=root
    )
    if skipped_dirs:
        collection.metadata["skipped"] += [
            Skipped(d.name, str(d), "no image files (not a subject folder)") for d in skipped_dirs
        ]
    collection.metadata["source"] = "folder"
    collection.metadata["splits"] = str(splits_path) if listed is not None else "hash 80/10/10"
    return collection


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _subject_study(subject: Path, problems: Problems) -> Study | None:
    """One subject folder as a study; None when it holds no image at all."""
    images: dict[str, Path] = {}
    masks: list[Path] = []
    clashes: list[str] = []
    for entry in _visible(subject):
        if entry.is_file() and is_image_file(entry):
            key = image_stem(entry)
        elif entry.is_dir() and is_dicom_folder(entry):
            key = entry.name
        else:
            continue
        if key.lower() in MASK_NAMES:
            masks.append(entry)
        elif key in images:
            clashes.append(f"{images[key].name} and {entry.name} both claim modality {key!r}")
        else:
            images[key] = entry
    if not images and not masks:
        dicom = [f for f in _visible(subject) if f.is_file() and has_dicom_magic(f)]
        if not dicom:
            return None
        images["image"] = subject  # the subject folder itself holds one DICOM series
    where = str(subject)
    if not images:
        problems.add(subject.name, where, f"has a mask ({masks[0].name}) but no image")
        return None
    if clashes or len(masks) > 1:
        several = [f"several masks ({', '.join(m.name for m in masks)}); keep one"] if len(masks) > 1 else []
        problems.add(subject.name, where, "; ".join(clashes + several))
        return None
    labels = {SEGMENTATION_TASK: masks[0]} if masks else {}
    return Study(subject.name, sources=images, labels=labels)


def _mask_tasks(studies: list[Study], side: dict, side_path: Path) -> list[TaskSpec]:
    masks = [s.labels[SEGMENTATION_TASK] for s in studies if SEGMENTATION_TASK in s.labels]
    declared = [t for t in side["tasks"] if t.kind == "segmentation"]
    others = [t.name for t in side["tasks"] if t.kind != "segmentation"]
    if others:
        raise DataError(
            side_path,
            f"declares task(s) {others}, but a folder layout has only segmentation masks; use a CSV manifest",
        )
    if not masks:
        return list(declared)
    if len(declared) > 1:
        raise DataError(
            side_path, "declares several segmentation tasks, but a folder layout has one mask per subject"
        )
    if declared:
        task = declared[0]
        if task.name != SEGMENTATION_TASK:
            for study in studies:
                if SEGMENTATION_TASK in study.labels:
                    study.labels[task.name] = study.labels.pop(SEGMENTATION_TASK)
        return [task]
    return [TaskSpec(SEGMENTATION_TASK, "segmentation", num_classes=infer_mask_classes(masks))]
