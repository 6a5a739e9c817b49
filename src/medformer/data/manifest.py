"""Collections described by files: a CSV manifest, a MONAI/Decathlon JSON datalist, and
`open_collection`, which tells what a path holds (subject folders are read by `discover.py`).

Studies built here are lazy: ``Study.sources`` holds file paths (``file#c`` for channel ``c`` of a
multi-channel file, see `readers.read_volume`) and ``Study.images`` stays empty until a reader or the
preprocessing cache loads them. Segmentation masks are ``Path`` values in ``Study.labels``.

**CSV manifest** (one row per study)::

    id,split,image:t1,image:flair,label:grade,mask:tumour,age
    s001,train,s001/t1.nii.gz,s001/flair.nii.gz,2,s001/seg.nii.gz,64
    s002,val,s002/t1.nii.gz,,0,,71

- ``id`` (required, unique); ``split`` train/val/test (aliases: training, validation, testing;
  default train); ``image:<modality>`` a path relative to the CSV's folder or absolute, an empty cell
  meaning the study lacks that modality; ``label:<task>`` a number, a class name, or ``;``-separated
  values for multi-label/vector tasks (empty = unlabelled); ``mask:<task>`` a segmentation mask path.
  Other columns are kept in ``Study.metadata``.
- A sidecar ``collection.yaml`` beside the CSV (or passed as ``sidecar``) may declare ``name``,
  ``ndim``, ``modalities`` and ``tasks: [{name, kind, num_classes, classes}]``. Undeclared tasks are
  inferred from their column: integers all in {0, 1} -> binary; other non-negative integers ->
  multiclass with ``max + 1`` classes; other numbers -> regression; ``;``-vectors of 0/1 ->
  multilabel; words -> classes in alphabetical order (binary for two); masks -> segmentation with the
  first mask's ``max + 1`` classes (at least 2). ``ndim`` comes from the first image's header.
- A modality column whose first file has several channels (an RGB picture, a 4D NIfTI) becomes one
  modality per channel: ``<m>_r/_g/_b`` for RGB, ``<m>_0, <m>_1, ...`` otherwise.

**Datalist** (``dataset.json`` of the Medical Segmentation Decathlon or MONAI): ``training`` ->
train, ``validation`` -> val, ``test`` -> test; each entry ``{"image": path or [paths], "label":
mask path or class value, ...}`` or a bare path. ``modality`` ({"0": "FLAIR", ...}) names the channels:
with one 4D image per entry each channel becomes a modality (sources ``image.nii.gz#0``, ...), with a
list of paths each path is one modality. ``labels`` ({"0": "background", ...}) declares the
segmentation task, named ``segmentation``.

Problems (missing files, bad labels, duplicate ids) are collected for all rows and raised as one
DataError naming the manifest, each row and each missing path; with ``skip_bad=True`` the bad studies
are left out and listed in ``collection.metadata["skipped"]``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medformer.data.readers import channel_source, image_stem, peek_image, read_volume, split_source
from medformer.data.study import TASK_KINDS, Collection, Skipped, Study, TaskSpec
from medformer.errors import DataError

SIDECAR = "collection.yaml"
SIDECAR_KEYS = ("name", "ndim", "modalities", "tasks", "manifest", "description")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
COLUMN_KINDS = ("image", "label", "mask")
SEGMENTATION_TASK = "segmentation"
_GENERIC_STEMS = {"manifest", "dataset", "data", "index", "studies", "collection", "datalist"}
_SHOW = 20  # problems spelled out in one error message


# --------------------------------------------------------------------------- shared pieces


@dataclass
class Problems:
    """Problems found while building a collection: raised together, or (skip_bad) left out and listed."""

    source: Path
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (study id, where, problem)

    def add(self, study: str, where: str, problem: str) -> None:
        self.items.append((study, where, problem))

    def __bool__(self) -> bool:
        return bool(self.items)

    def finish(self, skip_bad: bool, kept: int) -> list[Any]:
        """Raise one DataError listing every problem, unless skipping; return the ``skipped`` list."""
        if self.items and (not skip_bad or kept == 0):
            shown = "; ".join(f"{where}: {problem}" for _, where, problem in self.items[:_SHOW])
            more = f"; and {len(self.items) - _SHOW} more" if len(self.items) > _SHOW else ""
            hint = "" if skip_bad else " (pass skip_bad=True to leave those studies out and list them)"
            raise DataError(self.source, f"{len(self.items)} problem(s): {shown}{more}{hint}")
        if not self.items:
            return []
        source = str(self.source)
        return [
            Skipped(study, where if where.startswith(source) else f"{source} {where}", problem)
            for study, where, problem in self.items
        ]


def normalize_split(value: str, where: str) -> str:
    """train/val/test from a cell (empty -> train), or DataError naming the cell."""
    key = value.strip().lower()
    if not key:
        return "train"
    if key not in SPLIT_ALIASES:
        raise DataError(where, f"split {value!r} is not one of train, val, test")
    return SPLIT_ALIASES[key]


def resolve_path(cell: str, base: Path) -> Path:
    path = Path(cell.strip()).expanduser()
    return path if path.is_absolute() else base / path


def source_exists(source: Path) -> bool:
    """Whether the file behind a source (``file#c`` included) exists."""
    return split_source(source)[0].exists()


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """A ``collection.yaml``: name, ndim, modalities and tasks (as TaskSpecs), checked."""
    import yaml

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(path, f"cannot be read as YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise DataError(path, "must be a mapping with keys such as name, ndim and tasks")
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise DataError(path, f"unknown key(s) {unknown}; allowed: {', '.join(SIDECAR_KEYS)}")
    if "ndim" in data and data["ndim"] not in (2, 3):
        raise DataError(path, f"ndim must be 2 or 3, got {data['ndim']!r}")
    tasks = []
    for i, entry in enumerate(data.get("tasks") or []):
        if not isinstance(entry, dict) or "name" not in entry or "kind" not in entry:
            raise DataError(path, f"tasks[{i}] must be a mapping with at least name and kind")
        extra = sorted(set(entry) - {"name", "kind", "num_classes", "classes"})
        if extra:
            raise DataError(
                path, f"tasks[{i}] has unknown key(s) {extra}; allowed: name, kind, num_classes, classes"
            )
        classes = tuple(str(c) for c in entry["classes"]) if entry.get("classes") else None
        default = 2 if entry["kind"] in ("binary", "segmentation") and not classes else len(classes or (1,))
        try:
            tasks.append(
                TaskSpec(
                    name=str(entry["name"]),
                    kind=entry["kind"],
                    num_classes=int(entry.get("num_classes", default)),
                    classes=classes,
                )
            )
        except (TypeError, ValueError) as exc:
            raise DataError(path, f"tasks[{i}]: {exc} (kinds: {', '.join(TASK_KINDS)})") from exc
    data["tasks"] = tasks
    return data


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def infer_task(name: str, cells: Sequence[str], where: str | Path) -> TaskSpec:
    """A task from a label column's non-empty cells (rules in the module docstring)."""
    values = [c.strip() for c in cells if c.strip()]
    if not values:
        raise DataError(
            where, f"label {name!r} has no values; declare the task in {SIDECAR} or drop the column"
        )
    parts = [[p.strip() for p in v.split(";") if p.strip()] for v in values]
    vector = any(len(p) > 1 for p in parts) or any(";" in v for v in values)
    numbers = [[_number(p) for p in row] for row in parts]
    numeric = all(n is not None for row in numbers for n in row)
    if vector:
        if numeric:
            lengths = {len(row) for row in numbers}
            if len(lengths) > 1:
                raise DataError(where, f"label {name!r} has vectors of different lengths {sorted(lengths)}")
            flat = {n for row in numbers for n in row}
            kind = "multilabel" if flat <= {0.0, 1.0} else "regression"
            return TaskSpec(name, kind, num_classes=lengths.pop())
        classes = tuple(sorted({p for row in parts for p in row}))
        return TaskSpec(name, "multilabel", num_classes=len(classes), classes=classes)
    if numeric:
        flat = [row[0] for row in numbers]
        if all(float(v).is_integer() for v in flat):
            if set(flat) <= {0.0, 1.0}:
                return TaskSpec(name, "binary", num_classes=2)
            if min(flat) >= 0:
                return TaskSpec(name, "multiclass", num_classes=int(max(flat)) + 1)
        return TaskSpec(name, "regression", num_classes=1)
    classes = tuple(sorted(set(values)))
    if len(classes) < 2:
        raise DataError(
            where, f"label {name!r} has a single class {classes[0]!r}; declare the task in {SIDECAR}"
        )
    kind = "binary" if len(classes) == 2 else "multiclass"
    return TaskSpec(name, kind, num_classes=len(classes), classes=classes)


def parse_label(task: TaskSpec, cell: str, where: str) -> Any:
    """A cell as the label value a Study holds (int class, 0/1 vector, float), checked against the task."""
    parts = [p.strip() for p in str(cell).split(";") if p.strip()]
    index = {c: i for i, c in enumerate(task.classes or ())}
    numbers = [_number(p) for p in parts]
    if task.kind == "multilabel":
        if (
            index
            and all(p in index for p in parts)
            and not (len(parts) == task.num_classes and all(n is not None for n in numbers))
        ):
            value: Any = np.zeros(task.num_classes, dtype=np.int64)
            value[[index[p] for p in parts]] = 1
        else:
            value = _numbers(task, cell, numbers, where).astype(np.int64)
    elif task.kind == "regression":
        array = _numbers(task, cell, numbers, where)
        value = float(array[0]) if array.size == 1 and task.num_classes == 1 else array.astype(np.float32)
    else:
        if len(parts) != 1:
            raise DataError(
                where, f"label {task.name!r} = {cell!r}: expected one class, got {len(parts)} values"
            )
        if parts[0] in index:
            value = index[parts[0]]
        elif numbers[0] is not None and float(numbers[0]).is_integer():
            value = int(numbers[0])
        else:
            names = f" or one of {list(index)}" if index else ""
            raise DataError(where, f"label {task.name!r} = {cell!r} is not a class number{names}")
        if not 0 <= value < task.num_classes:
            raise DataError(
                where,
                f"label {task.name!r} = {value} is out of the declared range 0..{task.num_classes - 1} "
                f"({task.kind}, {task.num_classes} classes)",
            )
    task.check_label(value, where)
    return value


def _numbers(task: TaskSpec, cell: str, numbers: list[float | None], where: str) -> np.ndarray:
    if any(n is None for n in numbers) or not numbers:
        raise DataError(where, f"label {task.name!r} = {cell!r}: expected {task.num_classes} number(s)")
    return np.asarray(numbers, dtype=np.float64)


def infer_mask_classes(masks: Iterable[Path], limit: int = 3) -> int:
    """Number of segmentation classes from the first readable masks: max label + 1, at least 2."""
    for i, mask in enumerate(masks):
        if i >= limit:
            break
        try:
            return max(2, int(np.max(read_volume(mask).array)) + 1)
        except DataError:
            continue
    return 2


def expand_channels(first_sources: dict[str, Path]) -> dict[str, list[str]]:
    """modality -> its per-channel modality names when its first file has several channels."""
    out = {}
    for modality, source in first_sources.items():
        info = peek_image(split_source(source)[0])
        if info.channels == 1 or split_source(source)[1] is not None:
            out[modality] = [modality]
        elif info.channels == 3:
            out[modality] = [f"{modality}_{c}" for c in "rgb"]
        else:
            out[modality] = [f"{modality}_{c}" for c in range(info.channels)]
    return out


def split_channel_sources(sources: dict[str, Path], channels: dict[str, list[str]]) -> dict[str, Path]:
    """Replace each multi-channel modality's source with one ``file#c`` source per channel."""
    out = {}
    for modality, source in sources.items():
        names = channels.get(modality, [modality])
        if len(names) == 1:
            out[names[0]] = source
        else:
            out.update({name: channel_source(source, c) for c, name in enumerate(names)})
    return out


def first_ndim(studies: Sequence[Study], where: str | Path) -> int:
    """Spatial dimensionality from the first image whose header can be read."""
    error: DataError | None = None
    for study in studies[:5]:
        for source in study.sources.values():
            try:
                ndim = peek_image(split_source(source)[0]).ndim
            except DataError as err:
                error = error or err
                continue
            if ndim not in (2, 3):
                raise DataError(source, f"is {ndim}-dimensional; collections are 2D or 3D")
            return ndim
    raise error or DataError(where, "no image to tell the dimensionality from")


def collection_name(path: Path, name: str | None, sidecar: dict[str, Any]) -> str:
    """``name`` argument, else the sidecar's, else the file stem (a generic stem: its folder's name)."""
    if name:
        return name
    if sidecar.get("name"):
        return str(sidecar["name"])
    stem = image_stem(path) if path.is_file() else path.name
    return path.resolve().parent.name if stem.lower() in _GENERIC_STEMS else stem


def order_modalities(found: list[str], sidecar: dict[str, Any], where: str | Path) -> list[str]:
    """The vocabulary: the sidecar's ``modalities`` order when given (it must cover what was found)."""
    declared = [str(m) for m in sidecar.get("modalities") or []]
    if not declared:
        return found
    missing = [m for m in found if m not in declared]
    if missing:
        raise DataError(where, f"modalities {missing} are not among those {SIDECAR} declares ({declared})")
    return declared


# --------------------------------------------------------------------------- CSV manifest


def load_manifest(
    path: str | Path, sidecar: str | Path | None = None, *, name: str | None = None, skip_bad: bool = False
) -> Collection:
    """A collection from a CSV manifest (format in the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "manifest not found")
    side_path = Path(sidecar) if sidecar else path.parent / SIDECAR
    side = read_sidecar(side_path) if side_path.exists() else {"tasks": []}
    if sidecar and not side_path.exists():
        raise DataError(side_path, "sidecar not found")
    header, rows = _read_csv(path)
    columns = _manifest_columns(path, header)
    declared = {t.name: t for t in side["tasks"]}
    base = path.parent
    problems = Problems(path)

    tasks: list[TaskSpec] = []
    for task_name in columns["label"]:
        cells = [row.get(f"label:{task_name}", "") for _, row in rows]
        tasks.append(
            declared.get(task_name) or infer_task(task_name, cells, f"{path} column label:{task_name}")
        )
    for task_name in columns["mask"]:
        task = declared.get(task_name)
        if task is None:
            masks = (
                resolve_path(row[f"mask:{task_name}"], base) for _, row in rows if row[f"mask:{task_name}"]
            )
            task = TaskSpec(task_name, "segmentation", num_classes=infer_mask_classes(masks))
        tasks.append(task)
    for task in tasks:
        is_mask = task.name in columns["mask"]
        if (task.kind == "segmentation") != is_mask:
            column = f"{'mask' if is_mask else 'label'}:{task.name}"
            raise DataError(
                side_path,
                f"declares task {task.name!r} as {task.kind}, but its column is {column}; "
                "segmentation tasks take mask: columns, the others label: columns",
            )
    order = [t.name for t in side["tasks"]]  # declared tasks in the sidecar's order, then inferred ones
    tasks.sort(key=lambda t: order.index(t.name) if t.name in order else len(order))
    unused = sorted(set(declared) - set(columns["label"]) - set(columns["mask"]))
    if unused:
        raise DataError(
            side_path, f"declares task(s) {unused} but {path.name} has no label:/mask: column for them"
        )
    by_name = {t.name: t for t in tasks}

    studies: list[Study] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        study_id = row.get("id", "").strip()
        where = f"line {line} (id {study_id!r})"
        if not study_id:
            problems.add(f"line {line}", f"line {line}", "the id cell is empty")
            continue
        if study_id in seen:
            problems.add(
                study_id, where, f"id {study_id!r} is also on line {seen[study_id]}; ids must be unique"
            )
            continue
        seen[study_id] = line
        study = _manifest_study(row, study_id, where, columns, by_name, base, problems)
        if study is not None:
            studies.append(study)
    return finish_collection(path, studies, tasks, side, name, problems, skip_bad, columns["image"])


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = []
            for raw in reader:
                if not any(c.strip() for c in raw):
                    continue
                if len(raw) > len(header):
                    raise DataError(
                        path, f"line {reader.line_num} has {len(raw)} cells but the header {len(header)}"
                    )
                rows.append((reader.line_num, dict(zip(header, [c.strip() for c in raw]))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot be read as a CSV manifest: {exc}") from exc
    for _, row in rows:  # short rows: missing trailing cells are empty
        for column in header:
            row.setdefault(column, "")
    return header, rows


def _manifest_columns(path: Path, header: list[str]) -> dict[str, list[str]]:
    if "id" not in header:
        raise DataError(
            path, f"has no 'id' column (columns: {header}); a manifest needs id and image:<modality>"
        )
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(path, f"has duplicate column(s) {duplicates}")
    columns: dict[str, list[str]] = {kind: [] for kind in COLUMN_KINDS}
    for column in header:
        if ":" not in column:
            continue
        kind, _, rest = column.partition(":")
        if kind not in columns or not rest.strip():
            raise DataError(path, f"column {column!r} is not image:<modality>, label:<task> or mask:<task>")
        columns[kind].append(rest.strip())
    if not columns["image"]:
        raise DataError(path, "has no image:<modality> column; name each modality's column image:<modality>")
    clash = set(columns["label"]) & set(columns["mask"])
    if clash:
        raise DataError(path, f"task(s) {sorted(clash)} have both a label: and a mask: column")
    return columns


def _manifest_study(
    row: dict[str, str],
    study_id: str,
    where: str,
    columns: dict[str, list[str]],
    tasks: dict[str, TaskSpec],
    base: Path,
    problems: Problems,
) -> Study | None:
    errors: list[str] = []
    sources = {}
    for modality in columns["image"]:
        cell = row[f"image:{modality}"]
        if cell:
            sources[modality] = resolve_path(cell, base)
    missing = [f"image:{m} file {p} is missing" for m, p in sources.items() if not source_exists(p)]
    if not sources:
        errors.append("every image: cell is empty")
    labels: dict[str, Any] = {}
    for task_name in columns["label"]:
        cell = row[f"label:{task_name}"]
        if cell:
            try:
                labels[task_name] = parse_label(tasks[task_name], cell, where)
            except DataError as err:
                errors.append(err.problem)
    for task_name in columns["mask"]:
        cell = row[f"mask:{task_name}"]
        if cell:
            labels[task_name] = resolve_path(cell, base)
            if not labels[task_name].exists():
                missing.append(f"mask:{task_name} file {labels[task_name]} is missing")
    try:
        split = normalize_split(row.get("split", ""), where)
    except DataError as err:
        errors.append(err.problem)
    errors = missing + errors
    if errors:
        problems.add(study_id, where, "; ".join(errors))
        return None
    known = {"id", "split"} | {f"{k}:{v}" for k in COLUMN_KINDS for v in columns[k]}
    metadata = {k: v for k, v in row.items() if k not in known and v}
    return Study(study_id, sources=sources, labels=labels, split=split, metadata=metadata)


def finish_collection(
    path: Path,
    studies: list[Study],
    tasks: list[TaskSpec],
    side: dict[str, Any],
    name: str | None,
    problems: Problems,
    skip_bad: bool,
    modalities: list[str],
    root: Path | None = None,
) -> Collection:
    """Common end of every file-based loader: problems, channels, ndim, vocabulary, the Collection."""
    skipped = problems.finish(skip_bad, kept=len(studies))
    if not studies:
        raise DataError(root or path, "no studies found")
    first = {}
    for study in studies:
        for modality, source in study.sources.items():
            first.setdefault(modality, source)
    channels = expand_channels(first)
    if any(len(v) > 1 for v in channels.values()):
        for study in studies:
            study.sources = split_channel_sources(study.sources, channels)
    vocabulary = [n for m in modalities if m in channels for n in channels[m]]
    vocabulary = order_modalities(vocabulary, side, path)
    ndim = int(side.get("ndim") or first_ndim(studies, path))
    return Collection(
        name=collection_name(path, name, side),
        ndim=ndim,
        modalities=vocabulary,
        studies=studies,
        tasks=tasks,
        root=root or path,
        metadata={"source": path.suffix.lstrip(".") or "folder", "file": str(path), "skipped": skipped},
    )


# --------------------------------------------------------------------------- datalists


_DATALIST_SPLITS = (("training", "train"), ("validation", "val"), ("test", "test"))


def load_datalist(
    path: str | Path, *, base_dir: str | Path | None = None, name: str | None = None, skip_bad: bool = False
) -> Collection:
    """A collection from a MONAI/Decathlon ``dataset.json`` (format in the module docstring)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            path, f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot be read: {exc}") from exc
    if not isinstance(data, dict) or not any(key in data for key, _ in _DATALIST_SPLITS):
        raise DataError(path, "is not a datalist: it has none of the lists training, validation, test")
    base = Path(base_dir) if base_dir else path.parent
    names = _indexed_names(path, data.get("modality"), "modality")
    label_names = _indexed_names(path, data.get("labels"), "labels")
    problems = Problems(path)
    studies: list[Study] = []
    class_cells: list[tuple[Study, str]] = []
    seen: set[str] = set()
    for key, split in _DATALIST_SPLITS:
        entries = data.get(key) or []
        if not isinstance(entries, list):
            raise DataError(path, f"{key!r} must be a list of entries")
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]"
            study = _datalist_study(entry, where, split, names, base, problems)
            if study is None:
                continue
            study.id = _unique(study.id, seen)
            label = study.metadata.pop("_label", None)
            if isinstance(label, (int, float, list)):
                class_cells.append(
                    (study, ";".join(map(str, label)) if isinstance(label, list) else str(label))
                )
            studies.append(study)
    tasks = _datalist_tasks(path, studies, class_cells, label_names, problems)
    side = {"name": data.get("name")} if data.get("name") else {}
    vocabulary = names or sorted({m for s in studies for m in s.sources}, key=_natural)
    collection = finish_collection(path, studies, tasks, side, name, problems, skip_bad, vocabulary)
    if names:
        _check_channel_count(path, collection, names)
    return collection


def _indexed_names(path: Path, value: Any, key: str) -> list[str]:
    """{"0": "FLAIR", "1": "T1w"} (or a list) -> ["FLAIR", "T1w"]; placeholders fill gaps."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if not isinstance(value, dict):
        raise DataError(path, f"{key!r} must map indices to names")
    try:
        indexed = {int(k): str(v) for k, v in value.items()}
    except ValueError as exc:
        raise DataError(path, f"{key!r} keys must be integers, got {list(value)}") from exc
    return [indexed.get(i, f"{key}_{i}") for i in range(max(indexed, default=-1) + 1)]


def _datalist_study(
    entry: Any, where: str, split: str, names: list[str], base: Path, problems: Problems
) -> Study | None:
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        problems.add(where, where, "entry has no 'image'")
        return None
    images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    paths = [resolve_path(str(p), base) for p in images]
    if names and len(paths) == 1 and len(names) > 1:
        sources = {m: channel_source(paths[0], c) for c, m in enumerate(names)}
    elif names and len(paths) == len(names):
        sources = dict(zip(names, paths))
    elif not names:
        sources = {"image": paths[0]} if len(paths) == 1 else {f"image_{i}": p for i, p in enumerate(paths)}
    else:
        problems.add(
            where, where, f"has {len(paths)} image paths but 'modality' names {len(names)} modalities"
        )
        return None
    missing = sorted({str(split_source(p)[0]) for p in sources.values() if not source_exists(p)})
    labels: dict[str, Any] = {}
    metadata = {k: v for k, v in entry.items() if k not in ("image", "label", "id")}
    label = entry.get("label")
    if isinstance(label, str):
        labels[SEGMENTATION_TASK] = resolve_path(label, base)
        if not labels[SEGMENTATION_TASK].exists():
            missing.append(str(labels[SEGMENTATION_TASK]))
    elif label is not None:
        metadata["_label"] = label
    study_id = str(entry.get("id") or image_stem(paths[0]))
    if missing:
        problems.add(study_id, f"{where} (id {study_id!r})", "missing file(s): " + ", ".join(missing))
        return None
    return Study(study_id, sources=sources, labels=labels, split=split, metadata=metadata)


def _datalist_tasks(
    path: Path,
    studies: list[Study],
    class_cells: list[tuple[Study, str]],
    label_names: list[str],
    problems: Problems,
) -> list[TaskSpec]:
    tasks = []
    masks = [s.labels[SEGMENTATION_TASK] for s in studies if SEGMENTATION_TASK in s.labels]
    if masks:
        if label_names:
            task = TaskSpec(SEGMENTATION_TASK, "segmentation", len(label_names), tuple(label_names))
        else:
            task = TaskSpec(SEGMENTATION_TASK, "segmentation", infer_mask_classes(masks))
        tasks.append(task)
    if class_cells:
        task = infer_task("label", [c for _, c in class_cells], f"{path} 'label' values")
        for study, cell in class_cells:
            try:
                study.labels["label"] = parse_label(task, cell, study.id)
            except DataError as err:
                problems.add(study.id, f"id {study.id!r}", err.problem)
                studies.remove(study)
        tasks.append(task)
    return tasks


def _check_channel_count(path: Path, collection: Collection, names: list[str]) -> None:
    """One 4D image per entry must have as many channels as 'modality' names."""
    for study in collection.studies[:1]:
        file, channel = split_source(next(iter(study.sources.values())))
        if channel is None:
            return
        info = peek_image(file)
        if info.channels != len(names):
            raise DataError(
                path,
                f"'modality' names {len(names)} channels ({', '.join(names)}) but {file} has {info.channels}",
            )


def _unique(study_id: str, seen: set[str]) -> str:
    candidate, n = study_id, 1
    while candidate in seen:
        n += 1
        candidate = f"{study_id}_{n}"
    seen.add(candidate)
    return candidate


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- which kind is a path?


def detect_format(path: str | Path) -> str:
    """What a path holds: ``medmnist`` (one file or a flag), ``medmnist_folder``, ``manifest``,
    ``datalist`` or ``folder``; a DataError when it is none of them."""
    from medformer.data.medmnist import MEDMNIST_FLAGS, is_medmnist_file

    path = Path(path).expanduser()
    if not path.exists():
        if str(path).strip().lower() in MEDMNIST_FLAGS:
            return "medmnist"
        raise DataError(path, "does not exist (and is not a MedMNIST flag)")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            if is_medmnist_file(path):
                return "medmnist"
            raise DataError(
                path,
                "is not named like a MedMNIST file ('<flag>.npz' or '<flag>_<size>.npz'); rename it, or list "
                "single images in a CSV manifest",
            )
        if suffix == ".csv":
            return "manifest"
        if suffix == ".json":
            return "datalist"
        if suffix in (".yaml", ".yml"):
            return "manifest"
        raise DataError(path, _NOTHING)
    if (path / "dataset.json").is_file():
        return "datalist"
    manifests = [c for c in sorted(path.glob("*.csv")) if _is_manifest(c)]
    if len(manifests) > 1:
        raise DataError(
            path, f"holds several CSV manifests ({', '.join(c.name for c in manifests)}); name one"
        )
    if manifests:
        return "manifest"
    if any(is_medmnist_file(f) for f in path.glob("*.npz")):
        return "medmnist_folder"
    return "folder"


_NOTHING = (
    "no collection found: expected a MedMNIST .npz, a CSV manifest (id and image:<modality> columns), "
    "a dataset.json datalist, or subject folders (root/<subject>/<modality>.nii.gz)"
)


def _is_manifest(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "id" in header and any(h.startswith("image:") for h in header)


def open_collection(
    path: str | Path,
    *,
    name: str | None = None,
    skip_bad: bool = False,
    size: int | None = None,
    download: bool = False,
    check_md5: bool = True,
) -> Collection:
    """Open whatever collection a path holds (see `detect_format`); one collection only.

    ``size``/``download``/``check_md5`` apply to MedMNIST, ``skip_bad`` to file-based collections.
    """
    from medformer.data.discover import load_folder
    from medformer.data.medmnist import load_medmnist, parse_medmnist_filename

    path = Path(path).expanduser()
    kind = detect_format(path)
    if kind == "medmnist":
        if path.exists():
            flag, file_size = parse_medmnist_filename(path)  # type: ignore[misc]
            collection = load_medmnist(flag, file_size, root=path.parent, check_md5=check_md5)
        else:
            flag = str(path).strip().lower()
            collection = load_medmnist(flag, size or 28, download=download, check_md5=check_md5)
        return collection.subset(collection.studies, name=name) if name else collection
    if kind == "medmnist_folder":
        found = _medmnist_files(path, size)
        if len(found) != 1:
            listed = ", ".join(f.name for f in found) or "none of that size"
            raise DataError(
                path, f"holds {len(found)} MedMNIST files ({listed}); use open_collections for all"
            )
        return open_collection(found[0], name=name, check_md5=check_md5)
    if kind == "manifest":
        if path.is_dir():
            path = next(c for c in sorted(path.glob("*.csv")) if _is_manifest(c))
        elif path.suffix.lower() in (".yaml", ".yml"):
            side = read_sidecar(path)
            if not side.get("manifest"):
                raise DataError(path, "has no 'manifest' key naming the CSV it describes")
            return load_manifest(
                resolve_path(str(side["manifest"]), path.parent), path, name=name, skip_bad=skip_bad
            )
        return load_manifest(path, name=name, skip_bad=skip_bad)
    if kind == "datalist":
        return load_datalist(path / "dataset.json" if path.is_dir() else path, name=name, skip_bad=skip_bad)
    return load_folder(path, name=name, skip_bad=skip_bad)


def open_collections(
    path: str | Path,
    *,
    skip_bad: bool = False,
    size: int | None = None,
    download: bool = False,
    check_md5: bool = True,
) -> list[Collection]:
    """Every collection a path holds: one per MedMNIST file of a folder (of ``size`` when given),
    else the single collection `open_collection` finds."""
    path = Path(path).expanduser()
    if path.is_dir() and detect_format(path) == "medmnist_folder":
        found = _medmnist_files(path, size)
        if not found:
            raise DataError(path, f"holds MedMNIST files, but none of size {size}")
        return [open_collection(f, check_md5=check_md5) for f in found]
    return [open_collection(path, skip_bad=skip_bad, size=size, download=download, check_md5=check_md5)]


def _medmnist_files(folder: Path, size: int | None) -> list[Path]:
    from medformer.data.medmnist import parse_medmnist_filename

    found = []
    for file in sorted(folder.glob("*.npz")):
        parsed = parse_medmnist_filename(file)
        if parsed and (size is None or parsed[1] == size):
            found.append(file)
    return found
