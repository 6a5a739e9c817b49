"""On-disk cache of preprocessed studies, so preprocessing runs once and epochs read arrays.

A study's cache key hashes its source files (absolute path, size, modification time) and the
preprocessing settings' fingerprint: editing a file or changing a setting misses the cache and the
study is processed again. Entries are plain ``.npy`` arrays (read at disk speed, no decompression)
plus a small JSON, each written to a temporary name and renamed, so an interrupted run never leaves a
half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medformer.data.readers import read_volume
from medformer.data.study import Collection, Skipped, Study
from medformer.data.transforms import Preprocessor, Volume
from medformer.errors import DataError

Reader = Callable[[str | Path], Volume]
PLACEMENT = ("crop_box", "grid", "origin", "foreground")  # where the array sits (see transforms.py)


class PreprocessCache:
    """Preprocess studies on first use and serve the stored arrays afterwards.

    >>> cache = PreprocessCache("runs/.cache", Preprocessor(config.preprocess))
    >>> good, skipped = cache.prepare(collection, skip_bad=True)   # once, with a progress bar
    >>> study = cache(study)                                        # in a Dataset: reads the cache
    """

    def __init__(
        self, root: str | Path, preprocessor: Preprocessor | None = None, reader: Reader = read_volume
    ):
        self.root = Path(root)
        self.preprocessor = preprocessor or Preprocessor()
        self.reader = reader
        self.fingerprint = self.preprocessor.fingerprint()

    def key(self, study: Study) -> str:
        h = hashlib.sha256(self.fingerprint.encode())
        for name, src in sorted({**study.sources, **_mask_sources(study)}.items()):
            path = Path(str(src).split("#")[0])
            try:
                st = path.stat()
            except OSError:
                raise DataError(path, f"file of {name!r} for study {study.id!r} does not exist") from None
            h.update(f"{name}|{path.resolve()}|{src}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def __call__(self, study: Study) -> Study:
        """The preprocessed study: from the cache when present, else processed and stored."""
        if not study.sources:  # in-memory collections (MedMNIST) need no cache
            return study
        key = self.key(study)
        arr_path, meta_path = self._paths(key)
        if meta_path.exists() and arr_path.exists():
            meta = json.loads(meta_path.read_text())
            arrays = np.load(arr_path)
        else:
            meta, arrays = self._process(study)
            arr_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(arr_path, arrays)
            _atomic_write(meta_path, json.dumps(meta))
        names, mask_keys = meta["modalities"], meta["masks"]
        images = {m: arrays[i] for i, m in enumerate(names)}
        labels = dict(study.labels)
        for j, k in enumerate(mask_keys):
            labels[k] = arrays[len(names) + j].astype(np.int64)
        return study.with_images(
            images,
            labels=labels,
            spacing=tuple(meta["spacing"]),
            metadata={**study.metadata, **{k: meta[k] for k in PLACEMENT if k in meta}},
        )

    def _process(self, study: Study) -> tuple[dict, np.ndarray]:
        images = {m: self.reader(src) for m, src in study.sources.items()}
        masks = {k: self.reader(src) for k, src in _mask_sources(study).items()}
        out, segs, meta = self.preprocessor(images, masks)
        stacked = np.stack([*out.values(), *(s.astype(np.float32) for s in segs.values())])
        meta = {**meta, "modalities": list(out), "masks": list(segs), "id": study.id}
        return meta, stacked

    def prepare(
        self, collection: Collection, skip_bad: bool = False, progress: bool = True
    ) -> tuple[Collection, list[Skipped]]:
        """Preprocess every study of a collection once (filling the cache) and validate it.

        Bad studies raise a DataError naming the file, or with ``skip_bad`` are left out and listed.
        """
        good: list[Study] = []
        skipped: list[Skipped] = []
        bar = tqdm(
            collection.studies, desc=f"preprocess {collection.name}", unit="study", disable=not progress
        )
        for study in bar:
            try:
                loaded = self(study)
                loaded.validate(collection.ndim, collection.tasks)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(Skipped(study.id, e.path or study.where(), e.problem))
                continue
            good.append(study)
        if not good:
            raise DataError(
                collection.root, f"collection {collection.name!r}: every study is bad ({len(skipped)})"
            )
        return collection.subset(good), skipped


def _mask_sources(study: Study) -> dict[str, str | Path]:
    """Labels whose value is a file path are segmentation masks to preprocess with the images."""
    return {k: v for k, v in study.labels.items() if isinstance(v, (str, Path))}


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
