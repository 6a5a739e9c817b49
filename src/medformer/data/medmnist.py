"""MedMNIST v2/v3 as collections: the official ``.npz`` files, checked, held in memory.

A file ``{flag}.npz`` (size 28) or ``{flag}_{size}.npz`` holds ``train/val/test_images`` (uint8,
``N x H x W``, ``N x H x W x 3`` for RGB sets, ``N x D x H x W`` for 3D sets) and
``train/val/test_labels`` (``N x 1``, or ``N x 14`` for the multi-label chestmnist). Files are found in
``root``, else ``$MEDMNIST_ROOT``, else ``~/.medmnist`` (the ``medmnist`` package's own folder).

Choices:

- Each colour channel of an RGB set is its own modality (``pathology_r/_g/_b``): a Study holds
  single-channel arrays and the model tokenizes each modality with its own learned embedding, so
  colour is learned the same way as MRI contrasts are.
- Images are float32 in [0, 1], converted once per split; every study's array is a view into that
  split's array (no per-study copies). When the float32 copy would exceed `FLOAT32_LIMIT` (the
  224-pixel sets), images stay uint8 and ``collection.metadata["image_scale"] == 1/255``: pass
  `to_float` as the dataset's ``load`` to scale each study when it is used.
- Labels are checked against the declared classes for the whole split at once (NumPy, no loop).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medformer.data.study import SPLITS, Collection, Study, TaskSpec
from medformer.errors import ConfigError, DataError

URL = "https://zenodo.org/records/10519652/files/{filename}?download=1"
FLOAT32_LIMIT = 2 * 1024**3  # bytes; above this, images stay uint8 (see the module docstring)
KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))

_INFO: dict[str, dict[str, Any]] = json.loads(
    resources.files("medformer.data").joinpath("medmnist_info.json").read_text(encoding="utf-8")
)
MEDMNIST_FLAGS: list[str] = list(_INFO)

_KINDS = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}
_FILENAME = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?\.npz$")


# --------------------------------------------------------------------------- facts and names


def medmnist_info(flag: str) -> dict[str, Any]:
    """The official facts of one flag (task, n_channels, ndim, labels, n_samples, md5, modality): a copy."""
    return copy.deepcopy(_INFO[_check_flag(flag)])


def medmnist_sizes(flag: str) -> tuple[int, ...]:
    """Image sizes released for a flag: 28/64/128/224 for 2D sets, 28/64 for 3D sets."""
    return tuple(sorted(int(s) for s in _INFO[_check_flag(flag)]["md5"]))


def medmnist_filename(flag: str, size: int = 28) -> str:
    flag = _check_flag(flag)
    size = _check_size(flag, size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_root(root: str | Path | None = None) -> Path:
    """Where MedMNIST files live: ``root``, else ``$MEDMNIST_ROOT``, else ``~/.medmnist``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MEDMNIST_ROOT") or "~/.medmnist").expanduser()


def parse_medmnist_filename(path: str | Path) -> tuple[str, int] | None:
    """``(flag, size)`` when the file name is an official MedMNIST name (``dermamnist_64.npz``), else None."""
    match = _FILENAME.match(Path(path).name)
    if not match or match["flag"] not in _INFO:
        return None
    size = int(match["size"] or 28)
    if match["size"] == "28" or str(size) not in _INFO[match["flag"]]["md5"]:
        return None  # size 28 is named without a suffix
    return match["flag"], size


def is_medmnist_file(path: str | Path) -> bool:
    """Recognise a MedMNIST file by its name (used to auto-detect collections)."""
    return parse_medmnist_filename(path) is not None


def _check_flag(flag: str) -> str:
    key = str(flag).strip().lower()
    if key in _INFO:
        return key
    close = difflib.get_close_matches(key, MEDMNIST_FLAGS, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"unknown MedMNIST flag {flag!r}; {hint}known flags: {', '.join(MEDMNIST_FLAGS)}")


def _check_size(flag: str, size: int) -> int:
    sizes = tuple(sorted(int(s) for s in _INFO[flag]["md5"]))
    if size not in sizes:
        kind = f"{_INFO[flag]['ndim']}D"
        raise ConfigError(
            f"MedMNIST {flag!r} has no size {size!r}: {kind} sets come in sizes {', '.join(map(str, sizes))}"
        )
    return int(size)


# --------------------------------------------------------------------------- files


def file_md5(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_medmnist_md5(path: str | Path, flag: str, size: int = 28) -> None:
    """Raise DataError when the file is not the official release (name, expected and actual MD5)."""
    expected = _INFO[_check_flag(flag)]["md5"][str(_check_size(flag, size))]
    actual = file_md5(path)
    if actual != expected:
        raise DataError(
            path,
            f"MD5 is {actual}, expected {expected} for MedMNIST {flag} (size {size}): the file is damaged or "
            "not the official release; download it again, or pass check_md5=False for a file of your own",
        )


def download_medmnist(
    flag: str, size: int = 28, root: str | Path | None = None, timeout: float = 60.0
) -> Path:
    """Download one official file (MD5-checked) into ``root``; a file already there and intact is kept.

    Writes to a temporary file in the same folder and renames it when complete, so an interrupted
    download never leaves a half file under the real name.
    """
    filename = medmnist_filename(flag, size)
    flag = _check_flag(flag)
    folder = medmnist_root(root)
    dest = folder / filename
    expected = _INFO[flag]["md5"][str(size)]
    if dest.exists() and file_md5(dest) == expected:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    url = URL.format(filename=filename)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress(total, filename) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != expected:
            raise DataError(
                url,
                f"downloaded data has MD5 {digest.hexdigest()}, expected {expected}; try the download again",
            )
        os.replace(tmp, dest)
    except (OSError, urllib.error.URLError) as exc:
        raise DataError(
            url, f"download failed ({exc}); download {filename} by hand and put it in {folder}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _progress(total: int | None, name: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in KEYS if k not in archive.files]
            if missing:
                raise DataError(
                    path,
                    f"is missing key(s) {', '.join(missing)}; a MedMNIST file holds {', '.join(KEYS)}",
                )
            return {k: archive[k] for k in KEYS}
    except DataError:
        raise
    except Exception as exc:  # zipfile, zlib and NumPy errors alike: the file is damaged
        raise DataError(path, f"cannot be read as a MedMNIST .npz file: {exc}") from exc


# --------------------------------------------------------------------------- the collection


def load_medmnist(
    flag: str,
    size: int = 28,
    root: str | Path | None = None,
    download: bool = False,
    check_md5: bool = True,
    as_uint8: bool | None = None,
) -> Collection:
    """One MedMNIST set as a Collection with its train/val/test splits, in memory.

    ``as_uint8``: keep images uint8 (None: only when float32 would exceed `FLOAT32_LIMIT`).
    """
    flag = _check_flag(flag)
    size = _check_size(flag, size)
    info = _INFO[flag]
    filename = medmnist_filename(flag, size)
    folder = medmnist_root(root)
    path = folder / filename
    if not path.exists():
        if not download:
            raise DataError(
                path,
                f"MedMNIST file not found; pass download=True, set MEDMNIST_ROOT to the folder that holds "
                f"{filename}, or download it from {URL.format(filename=filename)}",
            )
        path = download_medmnist(flag, size, folder)
    elif check_md5:
        check_medmnist_md5(path, flag, size)
    return medmnist_collection(path, flag, size, as_uint8=as_uint8, info=info)


def medmnist_collection(
    path: str | Path, flag: str, size: int = 28, as_uint8: bool | None = None, info: dict | None = None
) -> Collection:
    """Build the collection from a MedMNIST-format file (no MD5 check: see `load_medmnist`)."""
    path = Path(path)
    info = info or _INFO[_check_flag(flag)]
    arrays = _read_npz(path)
    kind = _KINDS[info["task"]]
    classes = tuple(info["labels"][str(i)] for i in range(len(info["labels"])))
    task = TaskSpec(name="label", kind=kind, num_classes=len(classes), classes=classes)  # key: <flag>/label
    rgb = int(info["n_channels"]) == 3
    modality = info["modality"]
    modalities = [f"{modality}_{c}" for c in "rgb"] if rgb else [modality]
    expected = (size,) * int(info["ndim"]) + ((3,) if rgb else ())
    if as_uint8 is None:
        voxels = sum(arrays[f"{s}_images"].size for s in SPLITS)
        as_uint8 = voxels * 4 > FLOAT32_LIMIT
    name = flag if size == 28 else f"{flag}_{size}"

    studies: list[Study] = []
    for split in SPLITS:
        images, labels = arrays.pop(f"{split}_images"), arrays.pop(f"{split}_labels")  # freed once converted
        images = _check_images(path, split, images, expected, flag)
        labels = _check_labels(path, split, labels, len(images), task, info["task"])
        images = _as_studies_array(images, rgb, as_uint8)
        values = labels[:, 0].tolist() if task.kind != "multilabel" else list(labels)
        prefix = f"{name}/{split}/"
        if rgb:
            for i, (image, value) in enumerate(zip(images, values)):
                studies.append(
                    Study(
                        f"{prefix}{i:07d}", dict(zip(modalities, image)), labels={"label": value}, split=split
                    )
                )
        else:
            studies.extend(
                Study(f"{prefix}{i:07d}", {modality: image}, labels={"label": value}, split=split)
                for i, (image, value) in enumerate(zip(images, values))
            )
    metadata = {
        "source": "medmnist",
        "flag": flag,
        "size": size,
        "file": str(path),
        "task_type": info["task"],
        "n_samples": dict(info["n_samples"]),
        "image_scale": 1 / 255 if as_uint8 else 1.0,
        "skipped": [],
    }
    return Collection(
        name=name,
        ndim=int(info["ndim"]),
        modalities=modalities,
        studies=studies,
        tasks=[task],
        root=path,
        metadata=metadata,
    )


def _as_studies_array(images: np.ndarray, rgb: bool, as_uint8: bool) -> np.ndarray:
    """float32 in [0, 1] (or uint8 as is), RGB as (N, 3, H, W): one allocation for the whole split."""
    if rgb:  # channel-first view; each study's channel is a slice of it
        images = np.moveaxis(images, -1, 1)
    if as_uint8 and images.dtype == np.uint8:
        return images
    out = np.empty(images.shape, dtype=np.float32)
    if images.dtype == np.uint8:
        np.divide(images, np.float32(255), out=out)
    else:
        out[...] = images
    return out


def _check_images(
    path: Path, split: str, images: np.ndarray, expected: tuple[int, ...], flag: str
) -> np.ndarray:
    if images.shape[1:] != expected or images.dtype.kind not in "uf":
        raise DataError(
            path,
            f"{split}_images has shape {images.shape} and dtype {images.dtype}; MedMNIST {flag} at this size "
            f"needs (N, {', '.join(map(str, expected))}) uint8",
        )
    return images


def _check_labels(
    path: Path, split: str, labels: np.ndarray, n: int, task: TaskSpec, official: str
) -> np.ndarray:
    """Shape and range of a whole split's labels at once; the error names the first bad value."""
    width = task.num_classes if task.kind == "multilabel" else 1
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.shape != (n, width):
        raise DataError(
            path, f"{split}_labels has shape {labels.shape}; expected ({n}, {width}) for {n} images"
        )
    if labels.dtype.kind not in "iub" and not np.array_equal(labels, np.round(labels)):
        raise DataError(path, f"{split}_labels holds non-integer values; expected class indices")
    high = 2 if task.kind == "multilabel" else task.num_classes
    bad = (labels < 0) | (labels >= high)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value = labels[row, col].item()
        raise DataError(
            path,
            f"{split}_labels[{row}] = {value} is out of the declared range 0..{high - 1} for {task.name} "
            f"({official}, {task.num_classes} {'labels' if task.kind == 'multilabel' else 'classes'}); "
            f"{int(bad.any(axis=1).sum())} image(s) have such labels",
        )
    return labels.astype(np.int64) if labels.dtype.kind == "f" else labels


def to_float(study: Study) -> Study:
    """A study with uint8 images scaled to float32 [0, 1] (the ``load`` for collections kept uint8)."""
    if all(a.dtype != np.uint8 for a in study.images.values()):
        return study
    images = {m: np.divide(a, np.float32(255), dtype=np.float32) for m, a in study.images.items()}
    return replace(study, images=images)
