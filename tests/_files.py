"""Small medical image files written on the fly for reader and collection tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MEDMNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """A NIfTI file with a diagonal affine of the given voxel size (and a small offset)."""
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def dicom_slice(
    pixels: np.ndarray,
    position: Sequence[float] | None,
    *,
    instance: int | None = None,
    spacing: Sequence[float] = (0.8, 0.7),
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str = "1.2.3.4",
    implicit: bool = False,
):
    """A minimal valid CT slice (axial, patient position given in LPS mm)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelSpacing = [float(s) for s in spacing]
    ds.SliceThickness = 2.5
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    *,
    step: float = 2.5,
    order: Sequence[int] | None = None,
    positions: bool = True,
    **kwargs,
) -> Path:
    """One file per slice of ``volume`` (slices along axis 0), written in ``order`` with scrambled names."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(volume))) if order is None else list(order)
    for n, k in enumerate(order):
        pos = (-50.0, -60.0, 100.0 + k * step) if positions else None
        ds = dicom_slice(volume[k], pos, instance=k + 1, **kwargs)
        ds.save_as(folder / f"IM{n:04d}", enforce_file_format=True)
    return folder


def write_picture(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def fake_medmnist(
    path: Path, n: Sequence[int] = (6, 2, 3), shape: Sequence[int] = (28, 28), classes: int = 2, seed: int = 0
) -> Path:
    """A file in MedMNIST's format (uint8 images, (N, 1) labels) with random content."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (count, 1), dtype=np.uint8)
    np.savez_compressed(path, **arrays)
    return path
