"""Image file readers: NIfTI, DICOM (a series folder or one file), PNG/JPEG/TIFF, NumPy.

Every reader returns a `LoadedImage`: the raw array plus a 4x4 voxel->world affine (RAS+, mm), so that
preprocessing (reorientation, resampling) has the geometry it needs. Every failure is a `DataError`
naming the file and the problem in one sentence, never a library traceback from deep inside.

One axis convention for every format, so preprocessing treats them alike (the affine always says where
each index lies):

- 3D arrays are ``(x, y, z)``: nibabel's index order (i, j, k). A DICOM series comes back as
  (column, row, slice), like a NIfTI converted from it. Stacks without geometry (3D ``.npy``/``.npz``,
  multi-page TIFF) are taken to be stored ``(z, y, x)`` = ``(D, H, W)``, as NumPy/SimpleITK/torch code
  writes them, and come back as a transposed view, so preprocessing's ``(x, y, z) -> (z, y, x)`` gives
  back the stored order.
- 2D arrays are ``(row, column)`` as a picture is shown (a 2D NIfTI is transposed to match, with its
  affine).
- Channels (RGB, the modalities of a 4D NIfTI) are the last axis, ``channels`` says how many. A study
  source ``file#c`` names channel ``c`` of a multi-channel file (see `read_volume`).

Reading is raw: no resampling and no intensity change beyond what the format itself defines (NIfTI
scl_slope/scl_inter, DICOM RescaleSlope/Intercept, MONOCHROME1 inverted so that bright is high).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medformer.data.study import Study
from medformer.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NUMPY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + PICTURE_SUFFIXES + DICOM_SUFFIXES + NUMPY_SUFFIXES

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_CHANNEL_SOURCE = re.compile(r"^(?P<path>.+)#(?P<channel>\d+)$")


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A raw image and where its voxels lie.

    ``array`` is float32 or the file's integer dtype. ``channels > 1`` means the last axis holds
    channels. ``affine`` maps a voxel index to RAS+ mm (identity for formats without geometry).
    It has the fields of ``transforms.Volume`` (array, affine, path), so preprocessing takes it as is.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    channels: int = 1

    @property
    def ndim(self) -> int:
        """Spatial dimensions (2 or 3), not counting the channel axis."""
        return self.array.ndim - (1 if self.channels > 1 else 0)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[: self.ndim])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (the lengths of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, : self.ndim], axis=0))

    def channel(self, index: int) -> LoadedImage:
        """One channel as a single-channel image (its path becomes ``file#index``)."""
        if self.channels == 1:
            raise DataError(self.path, f"has one channel, so it has no channel {index} to select")
        if not 0 <= index < self.channels:
            raise DataError(self.path, f"has {self.channels} channels, so channel {index} does not exist")
        array = np.ascontiguousarray(self.array[..., index])
        return LoadedImage(array, self.affine, channel_source(self.path, index))


@dataclass(frozen=True)
class ImageInfo:
    """What `peek_image` learns from a file's header without reading its voxels."""

    path: Path
    shape: tuple[int, ...]
    channels: int = 1

    @property
    def ndim(self) -> int:
        return len(self.shape) - (1 if self.channels > 1 else 0)


# --------------------------------------------------------------------------- names and sources


def image_suffix(path: str | Path) -> str:
    """The lower-case extension, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def image_stem(path: str | Path) -> str:
    """The file name without its image extension (``t1.nii.gz`` -> ``t1``)."""
    name = Path(path).name
    suffix = image_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def is_image_file(path: str | Path) -> bool:
    """A file whose extension one of the readers handles (DICOM folders: `is_dicom_folder`)."""
    return image_suffix(path) in IMAGE_SUFFIXES


def has_dicom_magic(path: str | Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then ``DICM``."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """A folder holding at least one DICOM file (stops at the first one found)."""
    path = Path(path)
    return path.is_dir() and any(has_dicom_magic(f) for f in _visible_files(path))


def channel_source(path: str | Path, channel: int) -> Path:
    """The source naming one channel of a multi-channel file: ``file#channel``."""
    return Path(f"{path}#{int(channel)}")


def split_source(source: str | Path) -> tuple[Path, int | None]:
    """``file#c`` -> (file, c); a plain path (or an existing file whose name ends in #c) -> (path, None)."""
    text = str(source)
    match = _CHANNEL_SOURCE.match(text)
    if match and not Path(text).exists():
        return Path(match["path"]), int(match["channel"])
    return Path(text), None


# --------------------------------------------------------------------------- public readers


def read_image(path: str | Path, *, key: str | None = None, channel: int | None = None) -> LoadedImage:
    """Read one image: a file, or a folder holding one DICOM series.

    ``key`` names the array of an ``.npz`` holding several; ``channel`` returns that channel only (a
    4D NIfTI then decodes just that volume).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if channel is not None and image_suffix(path) in NIFTI_SUFFIXES:
        return _guarded(path, "NIfTI", _read_nifti, path, channel)
    image = _read_any(path, key)
    return image if channel is None else image.channel(channel)


def read_volume(source: str | Path) -> LoadedImage:
    """One single-channel image for a modality: ``source`` is a file (or DICOM folder), or ``file#c``.

    A multi-channel file named without ``#c`` is an error: a Study holds one channel per modality.
    """
    path, channel = split_source(source)
    image = read_image(path, channel=channel)
    return image if channel is not None else _one_channel(image)


def _one_channel(image: LoadedImage) -> LoadedImage:
    """The image itself when it has one channel; a multi-channel file needs ``#c`` to say which."""
    if image.channels > 1:
        name = image.path.name
        raise DataError(
            image.path, f"has {image.channels} channels; name one as '{name}#<channel>' (one modality each)"
        )
    return image


def peek_image(path: str | Path, *, key: str | None = None) -> ImageInfo:
    """Shape and channel count from the header only (cheap: used to infer a collection's layout)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        return _peek_dicom_series(path)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _guarded(path, "NIfTI", _peek_nifti, path)
    if suffix in PICTURE_SUFFIXES:
        return _guarded(path, suffix[1:].upper(), _peek_picture, path)
    if suffix in NUMPY_SUFFIXES:
        return _guarded(path, "NumPy", _peek_numpy, path, key)
    if suffix in DICOM_SUFFIXES or has_dicom_magic(path):
        return _guarded(path, "DICOM", _peek_dicom_file, path)
    raise DataError(path, f"unknown image format {suffix or '(no extension)'!r}; {_supported()}")


def read_study_images(sources: Mapping[str, str | Path]) -> dict[str, LoadedImage]:
    """Read each modality's source (see `read_volume`); a file shared by several channel sources (a
    4D NIfTI) is read once and split."""
    by_file: dict[Path, list[tuple[str, int | None]]] = defaultdict(list)
    for modality, source in sources.items():
        path, channel = split_source(source)
        by_file[path].append((modality, channel))
    out: dict[str, LoadedImage] = {}
    for path, users in by_file.items():
        if len(users) == 1:
            modality, channel = users[0]
            out[modality] = read_volume(path if channel is None else channel_source(path, channel))
            continue
        whole = read_image(path)
        for modality, channel in users:
            out[modality] = _one_channel(whole) if channel is None else whole.channel(channel)
    return {m: out[m] for m in sources}


def load_study_arrays(study: Study) -> dict[str, np.ndarray]:
    """Raw single-channel arrays of a lazy study, one per modality (``file#c`` sources split)."""
    return {m: image.array for m, image in read_study_images(study.sources).items()}


def load_study(study: Study) -> Study:
    """The study with its images read raw, its spacing set and its mask files read into arrays.

    No preprocessing: arrays keep each file's own grid (use this to look at files; training reads
    the preprocessing cache).
    """
    images = read_study_images(study.sources)
    labels = dict(study.labels)
    for key, value in study.labels.items():
        if isinstance(value, Path):
            labels[key] = read_volume(value).array
    spacing = next(iter(images.values())).spacing if images else study.spacing
    arrays = {m: image.array for m, image in images.items()}
    return replace(study, images=arrays, labels=labels, spacing=spacing)


def _read_any(path: Path, key: str | None) -> LoadedImage:
    if path.is_dir():
        return _read_dicom_series(path)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _guarded(path, "NIfTI", _read_nifti, path, None)
    if suffix in PICTURE_SUFFIXES:
        return _guarded(path, suffix[1:].upper(), _read_picture, path)
    if suffix in NUMPY_SUFFIXES:
        return _guarded(path, "NumPy", _read_numpy, path, key)
    if suffix in DICOM_SUFFIXES or has_dicom_magic(path):
        return _guarded(path, "DICOM", _read_dicom_file, path)
    raise DataError(path, f"unknown image format {suffix or '(no extension)'!r}; {_supported()}")


# --------------------------------------------------------------------------- errors


def _supported() -> str:
    return "supported: " + ", ".join(IMAGE_SUFFIXES) + ", or a folder holding one DICOM series"


def _guarded(path: Path, kind: str, reader: Any, *args: Any) -> Any:
    with _reading(path, kind):
        return reader(*args)


@contextlib.contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Turn whatever nibabel, pydicom, Pillow or NumPy raise into one DataError naming the file.

    Those libraries raise a zoo of types (EOFError, zlib.error, struct.error, OSError, ValueError,
    KeyError, ...), so the boundary catches Exception on purpose.
    """
    try:
        yield
    except (DataError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise DataError(path, _describe(exc, kind)) from exc


_TRUNCATED = re.compile(r"truncated|ended before|end of file|expected \d+ bytes")


def _describe(exc: BaseException, kind: str) -> str:
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, EOFError) or _TRUNCATED.search(lowered):
        return f"{kind} file is truncated: it ends before its data does ({text}); copy or download it again"
    if type(exc).__name__ == "InvalidDicomError":
        return "is not a DICOM file: it has no 'DICM' marker after its 128-byte preamble"
    if "cannot work out file type" in lowered:
        return f"is not a readable {kind} file: its header cannot be parsed (corrupt or cut short)"
    return f"cannot be read as a {kind} file: {text}"


# --------------------------------------------------------------------------- NIfTI


def _nifti_layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Drop NIfTI's padding axes: (x,y,z,1,c) vectors -> (x,y,z,c); (x,y,z,1) -> 3D; (x,y,1) -> 2D.

    Returns the shape in nibabel order (before the 2D transpose) and the number of channels.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 5 and shape[3] == 1:
        shape = (*shape[:3], shape[4])
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    if len(shape) == 4 and shape[2] == 1:  # one slice, several channels
        return (shape[0], shape[1], shape[3]), shape[3]
    if len(shape) not in (2, 3, 4):
        raise DataError(None, f"has shape {shape}; expected a 2D or 3D image, or 4D with channels last")
    return shape, (shape[3] if len(shape) == 4 else 1)


def _read_nifti(path: Path, channel: int | None) -> LoadedImage:
    import nibabel as nib

    img = nib.load(path, mmap=False)
    try:
        shape, channels = _nifti_layout(img.shape)
    except DataError as err:
        raise DataError(path, err.problem) from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if channel is None:
        data = np.asarray(img.dataobj).reshape(shape)
    else:
        if channels == 1:
            raise DataError(path, f"has one channel, so it has no channel {channel} to select")
        if not 0 <= channel < channels:
            raise DataError(path, f"has {channels} channels, so channel {channel} does not exist")
        # the channel is the last axis on disk: slicing decodes only up to that volume
        index = (slice(None),) * (len(img.shape) - 1) + (channel,)
        data = np.asarray(img.dataobj[index]).reshape(shape[:-1])
        shape, channels, path = shape[:-1], 1, channel_source(path, channel)
    spatial = len(shape) - (1 if channels > 1 else 0)
    if spatial == 2:  # (i, j) -> (row, column) = (j, i), as pictures are
        data = np.swapaxes(data, 0, 1)
        affine = affine[:, [1, 0, 2, 3]]
    return LoadedImage(_native(data), affine, path, channels)


def _peek_nifti(path: Path) -> ImageInfo:
    import nibabel as nib

    try:
        shape, channels = _nifti_layout(nib.load(path).shape)
    except DataError as err:
        raise DataError(path, err.problem) from None
    if len(shape) - (1 if channels > 1 else 0) == 2:
        shape = (shape[1], shape[0], *shape[2:])
    return ImageInfo(path, shape, channels)


# --------------------------------------------------------------------------- pictures (Pillow)


def _xyz(stack: np.ndarray) -> np.ndarray:
    """A ``(z, y, x[, c])`` stack as an ``(x, y, z[, c])`` view (the 3D convention above)."""
    return stack.transpose(2, 1, 0, *range(3, stack.ndim))


def _picture_array(im: Any) -> np.ndarray:
    """One frame: grayscale stays 2D, colour (palette, RGBA, CMYK, ...) becomes RGB, bilevel 0/1."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("LA", "La"):
        im = im.convert("L")
    elif mode not in ("L", "I", "F", "RGB") and not mode.startswith("I;16"):
        im = im.convert("RGB")
    return np.asarray(im)


def _read_picture(path: Path) -> LoadedImage:
    from PIL import Image

    with Image.open(path) as im:
        frames = []
        for index in range(getattr(im, "n_frames", 1)):
            im.seek(index)
            im.load()
            frames.append(_native(_picture_array(im)))
    if len({f.shape for f in frames}) > 1:
        raise DataError(path, f"pages have different sizes ({sorted({f.shape for f in frames})})")
    array = frames[0] if len(frames) == 1 else _xyz(np.stack(frames))
    channels = 3 if frames[0].ndim == 3 else 1
    return LoadedImage(array, np.eye(4), path, channels)


def _peek_picture(path: Path) -> ImageInfo:
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        frames = getattr(im, "n_frames", 1)
        colour = im.mode not in ("1", "L", "LA", "La", "I", "F") and not im.mode.startswith("I;16")
    shape = (height, width) if frames == 1 else (width, height, frames)
    return ImageInfo(path, (*shape, 3) if colour else shape, 3 if colour else 1)


# --------------------------------------------------------------------------- NumPy


def _npz_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise DataError(path, f"has no array {key!r}; its arrays are {keys}")
        return key
    if len(keys) != 1:
        raise DataError(path, f"holds {len(keys)} arrays ({', '.join(keys)}); name one with key=")
    return keys[0]


def _check_numpy_magic(path: Path) -> None:
    """np.load falls back to unpickling unknown bytes, whose error would only confuse: check first."""
    npy = image_suffix(path) == ".npy"
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(b"\x93NUMPY" if npy else b"PK"):
        what = "a NumPy .npy file" if npy else "a NumPy .npz archive"
        raise DataError(path, f"is not {what}: it does not start with the format's magic bytes")


def _read_numpy(path: Path, key: str | None) -> LoadedImage:
    _check_numpy_magic(path)
    if image_suffix(path) == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as archive:
            array = archive[_npz_key(path, list(archive.files), key)]
    if array.dtype.kind not in "biuf":
        raise DataError(path, f"holds a {array.dtype} array; images must be numbers")
    if array.ndim not in (2, 3):
        raise DataError(path, f"holds an array of shape {array.shape}; expected a 2D or 3D image")
    array = _native(array)
    return LoadedImage(_xyz(array) if array.ndim == 3 else array, np.eye(4), path)


def _peek_numpy(path: Path, key: str | None) -> ImageInfo:
    _check_numpy_magic(path)
    if image_suffix(path) != ".npy":
        return ImageInfo(path, _read_numpy(path, key).array.shape)
    shape = tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    return ImageInfo(path, shape[::-1] if len(shape) == 3 else shape)


def _native(array: np.ndarray) -> np.ndarray:
    """float32 for floats, native byte order, uint8 for booleans: what torch and MONAI expect."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


# --------------------------------------------------------------------------- DICOM


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _floats(ds: Any, name: str, count: int) -> np.ndarray | None:
    value = ds.get(name)
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size == count else None


def _orientation(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal (LPS); axial when the tag is absent."""
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if iop is None:
        iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    row, col = iop[:3], iop[3:]
    return row, col, np.cross(row, col)


def _pixel_spacing(ds: Any) -> np.ndarray:
    """(distance between rows, distance between columns) in mm."""
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _floats(ds, name, 2)
        if value is not None and np.all(value > 0):
            return value
    return np.ones(2)


def _slice_step(ds: Any) -> float:
    """Distance between slices when positions cannot tell it (one slice, or no positions)."""
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        with contextlib.suppress(TypeError, ValueError):
            value = float(ds.get(name))
            if value > 0:
                return value
    return 1.0


def _pixels(ds: Any) -> np.ndarray:
    """Stored values made meaningful: MONOCHROME1 inverted (bright = high), then Rescale applied."""
    array = ds.pixel_array
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 8 * array.dtype.itemsize))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        array = (low + high - array.astype(np.int64)).astype(array.dtype)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        array = array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return _native(array)


def _dicom_affine(ds: Any, step: np.ndarray | None, origin: np.ndarray | None, volume: bool) -> np.ndarray:
    """Voxel -> RAS affine for (column, row, slice) indices (``volume``) or (row, column) ones.

    Moving one column right goes along the row direction (IOP[:3]) by PixelSpacing[1]; one row down
    along the column direction (IOP[3:]) by PixelSpacing[0]; one slice by ``step`` (LPS mm).
    """
    row, col, normal = _orientation(ds)
    spacing = _pixel_spacing(ds)
    if step is None:
        step = normal * _slice_step(ds)
    if origin is None:
        origin = _floats(ds, "ImagePositionPatient", 3)
    along_row, along_col = row * spacing[1], col * spacing[0]
    axes = [along_row, along_col, step] if volume else [along_col, along_row, step]
    affine = np.eye(4)
    affine[:3, :3] = np.stack(axes, axis=1)
    affine[:3, 3] = origin if origin is not None else 0.0
    return _LPS_TO_RAS @ affine


def _read_dicom_file(path: Path) -> LoadedImage:
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise DataError(path, "is a DICOM file without pixel data (e.g. a report or a DICOMDIR)")
    array = _pixels(ds)
    volume = int(ds.get("NumberOfFrames", 1) or 1) > 1
    channels = int(ds.get("SamplesPerPixel", 1) or 1)
    if volume:
        array = _xyz(array)
    return LoadedImage(array, _dicom_affine(ds, None, None, volume), path, channels if channels > 1 else 1)


def _peek_dicom_file(path: Path) -> ImageInfo:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    channels = int(ds.get("SamplesPerPixel", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    shape = (cols, rows, frames) if frames > 1 else (rows, cols)
    return ImageInfo(path, (*shape, channels) if channels > 1 else shape, channels if channels > 1 else 1)


def _dicom_datasets(folder: Path, pixels: bool) -> list[tuple[Path, Any]]:
    """The DICOM images of a folder; other files (notes, DICOMDIR, reports) are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    files = _visible_files(folder)
    for file in files:
        try:
            with _reading(file, "DICOM"):
                ds = pydicom.dcmread(file, stop_before_pixels=not pixels)
        except DataError as err:
            if isinstance(err.__cause__, InvalidDicomError):
                continue
            raise
        if "Rows" in ds and (not pixels or "PixelData" in ds):
            found.append((file, ds))
    if not found:
        others = f" ({len(files)} other file(s))" if files else ""
        raise DataError(folder, f"no DICOM files found in folder{others}")
    return found


def _check_one_series(folder: Path, found: list[tuple[Path, Any]]) -> None:
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in found)
    if len(series) > 1:
        raise DataError(
            folder,
            f"folder holds {len(series)} DICOM series ({', '.join(f'{n} slices' for n in series.values())}); "
            "put each series in its own folder",
        )
    sizes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in found)
    if len(sizes) > 1:
        desc = ", ".join(f"{n} of {r}x{c}" for (r, c), n in sizes.most_common())
        raise DataError(folder, f"DICOM slices have different sizes ({desc}); a series needs one slice size")


def _sorted_slices(
    folder: Path, found: list[tuple[Path, Any]]
) -> tuple[list[tuple[Path, Any]], np.ndarray | None]:
    """Slices in spatial order: by position along the slice normal, else InstanceNumber, else name.

    Returns the sorted slices and the step between consecutive slices (LPS mm) when positions are known.
    """
    positions = [_floats(ds, "ImagePositionPatient", 3) for _, ds in found]
    oriented = all(_floats(ds, "ImageOrientationPatient", 6) is not None for _, ds in found)
    if oriented and all(p is not None for p in positions):
        _, _, normal = _orientation(found[0][1])
        depth = np.array([float(p @ normal) for p in positions])
        order = np.argsort(depth, kind="stable")
        gaps = np.diff(depth[order])
        if gaps.min() < 1e-4:
            raise DataError(
                folder,
                f"{int((gaps < 1e-4).sum()) + 1} DICOM slices share a position: the folder seems to hold "
                "several volumes (echoes, phases or time points); put each volume in its own folder",
            )
        if gaps.max() - gaps.min() > 0.1 * np.median(gaps):
            raise DataError(
                folder,
                f"DICOM slice gaps are uneven ({gaps.min():.3g} to {gaps.max():.3g} mm): "
                "a slice may be missing",
            )
        step = (positions[order[-1]] - positions[order[0]]) / (len(found) - 1)
        return [found[i] for i in order], step
    if all(ds.get("InstanceNumber") is not None for _, ds in found):
        return sorted(found, key=lambda item: int(item[1].InstanceNumber)), None
    return found, None


def _read_dicom_series(folder: Path) -> LoadedImage:
    found = _dicom_datasets(folder, pixels=True)
    if len(found) == 1:
        return _guarded(found[0][0], "DICOM", _read_dicom_file, found[0][0])
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in found):
        raise DataError(folder, "folder holds several multi-frame DICOM files; put each in its own folder")
    _check_one_series(folder, found)
    ordered, step = _sorted_slices(folder, found)
    slices = []
    for file, ds in ordered:
        with _reading(file, "DICOM"):
            slices.append(_pixels(ds))
    if len({a.dtype for a in slices}) > 1:  # rescaled and raw slices mixed: all float
        slices = [a.astype(np.float32) for a in slices]
    first = ordered[0][1]
    channels = int(first.get("SamplesPerPixel", 1) or 1)
    array = np.ascontiguousarray(_xyz(np.stack(slices)))
    affine = _dicom_affine(first, step, _floats(first, "ImagePositionPatient", 3), volume=True)
    return LoadedImage(array, affine, folder, channels if channels > 1 else 1)


def _peek_dicom_series(folder: Path) -> ImageInfo:
    found = _dicom_datasets(folder, pixels=False)
    if len(found) == 1:
        return _guarded(found[0][0], "DICOM", _peek_dicom_file, found[0][0])
    ds = found[0][1]
    channels = int(ds.get("SamplesPerPixel", 1) or 1)
    shape = (int(ds.Columns), int(ds.Rows), len(found))
    return ImageInfo(folder, (*shape, channels) if channels > 1 else shape, channels if channels > 1 else 1)
