"""Readers: every format gives the right array and geometry, and every broken file a DataError naming it."""

import numpy as np
import pytest

from _files import write_dicom_series, write_nifti, write_picture
from medformer.data.readers import (
    channel_source,
    load_study,
    load_study_arrays,
    peek_image,
    read_image,
    read_study_images,
    read_volume,
    split_source,
)
from medformer.data.study import Study
from medformer.errors import DataError

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- NIfTI


def test_nifti_keeps_array_dtype_and_geometry(tmp_path):
    data = RNG.integers(-100, 100, (5, 6, 7)).astype(np.int16)
    img = read_image(write_nifti(tmp_path / "ct.nii.gz", data, spacing=(0.5, 1.0, 2.0)))
    assert img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, data)
    assert img.spacing == (0.5, 1.0, 2.0)
    np.testing.assert_allclose(img.affine[:3, 3], [-10, 20, 5])
    assert img.ndim == 3 and img.channels == 1
    assert peek_image(tmp_path / "ct.nii.gz").shape == (5, 6, 7)


def test_uncompressed_nifti_float64_comes_back_float32(tmp_path):
    data = RNG.random((4, 4, 3))
    img = read_image(write_nifti(tmp_path / "x.nii", data))
    assert img.array.dtype == np.float32
    np.testing.assert_allclose(img.array, data, rtol=1e-6)


def test_4d_nifti_has_channels_last_and_sources_select_one(tmp_path):
    data = RNG.random((5, 6, 7, 4)).astype(np.float32)
    path = write_nifti(tmp_path / "brats.nii.gz", data)
    img = read_image(path)
    assert img.array.shape == (5, 6, 7, 4) and img.channels == 4 and img.ndim == 3
    assert peek_image(path).channels == 4
    t2 = read_volume(channel_source(path, 2))
    np.testing.assert_array_equal(t2.array, data[..., 2])
    assert t2.channels == 1 and str(t2.path).endswith("brats.nii.gz#2")
    with pytest.raises(DataError, match=r"has 4 channels; name one as 'brats.nii.gz#<channel>'"):
        read_volume(path)
    with pytest.raises(DataError, match=r"channel 9 does not exist"):
        read_volume(f"{path}#9")


def test_single_slice_nifti_is_2d_in_row_column_order(tmp_path):
    data = RNG.random((5, 8, 1)).astype(np.float32)  # (i, j, 1): i runs along columns
    img = read_image(write_nifti(tmp_path / "slice.nii.gz", data, spacing=(0.5, 2.0, 1.0)))
    assert img.array.shape == (8, 5)
    np.testing.assert_array_equal(img.array, data[:, :, 0].T)
    assert img.spacing == (2.0, 0.5)
    assert peek_image(tmp_path / "slice.nii.gz").shape == (8, 5)


def test_truncated_nifti_gz_names_the_file(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", RNG.random((20, 20, 20)).astype(np.float32))
    blob = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"truncated") as info:
        read_image(cut)
    assert info.value.path == str(cut)
    tiny = tmp_path / "tiny.nii.gz"
    tiny.write_bytes(blob[:40])  # even the header is cut
    with pytest.raises(DataError, match=r"tiny.nii.gz: .*(truncated|cannot be parsed)"):
        read_image(tiny)


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_is_sorted_by_position_with_geometry(tmp_path):
    volume = RNG.integers(0, 1000, (5, 4, 6)).astype(np.int16)  # (slice, row, column)
    folder = write_dicom_series(tmp_path / "ct", volume, order=[3, 0, 4, 1, 2], slope=2.0, intercept=-1024.0)
    img = read_image(folder)
    assert img.array.shape == (6, 4, 5)  # (column, row, slice), like the NIfTI of it
    np.testing.assert_array_equal(img.array, (volume * 2.0 - 1024).transpose(2, 1, 0))
    assert img.array.dtype == np.float32
    np.testing.assert_allclose(img.spacing, (0.7, 0.8, 2.5))
    # every slice's origin is its ImagePositionPatient, converted from LPS to RAS
    for k in range(5):
        np.testing.assert_allclose(img.affine @ [0, 0, k, 1], [50.0, 60.0, 100.0 + 2.5 * k, 1])
    np.testing.assert_allclose(img.affine @ [1, 2, 0, 1], [50.0 - 0.7, 60.0 - 1.6, 100.0, 1])
    assert peek_image(folder).shape == (6, 4, 5)


def test_dicom_series_without_positions_uses_instance_number(tmp_path):
    volume = RNG.integers(0, 100, (3, 4, 4)).astype(np.int16)
    folder = write_dicom_series(tmp_path / "s", volume, order=[2, 0, 1], positions=False, implicit=True)
    img = read_image(folder)
    assert img.array.dtype == np.int16  # no rescale: native integers kept
    np.testing.assert_array_equal(img.array, volume.transpose(2, 1, 0))
    assert img.spacing[2] == 2.5  # SliceThickness


def test_single_dicom_file_is_2d(tmp_path):
    volume = RNG.integers(0, 100, (1, 4, 6)).astype(np.int16)
    write_dicom_series(tmp_path / "one", volume)
    img = read_image(next((tmp_path / "one").iterdir()))
    assert img.array.shape == (4, 6) and img.ndim == 2
    np.testing.assert_array_equal(img.array, volume[0])
    np.testing.assert_allclose(img.spacing, (0.8, 0.7))
    assert read_image(tmp_path / "one").array.shape == (4, 6)  # a folder with one slice, too


def test_dicom_folder_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no DICOM files found in folder"):
        read_image(empty)
    (empty / "notes.txt").write_text("not a slice")
    with pytest.raises(DataError, match=r"no DICOM files found in folder \(1 other file"):
        read_image(empty)
    mixed = write_dicom_series(tmp_path / "mixed", RNG.integers(0, 9, (2, 4, 4)).astype(np.int16))
    small = write_dicom_series(tmp_path / "small", RNG.integers(0, 9, (1, 3, 3)).astype(np.int16))
    next(small.iterdir()).rename(mixed / "IM9999")
    with pytest.raises(DataError, match=r"DICOM slices have different sizes") as info:
        read_image(mixed)
    assert info.value.path == str(mixed)


# --------------------------------------------------------------------------- pictures and NumPy


def test_png_gray_rgb_and_16bit_tiff(tmp_path):
    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    img = read_image(write_picture(tmp_path / "g.png", gray))
    np.testing.assert_array_equal(img.array, gray)
    assert img.ndim == 2 and img.channels == 1 and img.spacing == (1.0, 1.0)
    rgb = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    img = read_image(write_picture(tmp_path / "c.png", rgb))
    assert img.channels == 3 and img.ndim == 2
    np.testing.assert_array_equal(img.array, rgb)
    np.testing.assert_array_equal(read_volume(f"{tmp_path / 'c.png'}#1").array, rgb[..., 1])
    assert peek_image(tmp_path / "c.png").shape == (10, 12, 3)
    deep = RNG.integers(0, 60000, (9, 7)).astype(np.uint16)
    img = read_image(write_picture(tmp_path / "d.tif", deep))
    np.testing.assert_array_equal(img.array, deep)


def test_multipage_tiff_is_a_3d_stack_in_xyz_order(tmp_path):
    from PIL import Image

    pages = RNG.integers(0, 256, (3, 5, 7), dtype=np.uint8)  # (z, y, x)
    frames = [Image.fromarray(p) for p in pages]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    img = read_image(tmp_path / "stack.tif")
    assert img.array.shape == (7, 5, 3) and img.ndim == 3
    np.testing.assert_array_equal(img.array.transpose(2, 1, 0), pages)
    assert peek_image(tmp_path / "stack.tif").shape == (7, 5, 3)


def test_jpeg_reads(tmp_path):
    gray = np.tile(np.arange(16, dtype=np.uint8) * 16, (8, 1))
    img = read_image(write_picture(tmp_path / "x.jpg", gray))
    assert img.array.shape == (8, 16)
    assert np.abs(img.array.astype(int) - gray).max() < 16


def test_garbage_png_names_the_file(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(DataError, match=r"scan.png: PNG"):
        read_image(bad)
    noise = tmp_path / "noise.png"
    noise.write_bytes(b"hello" * 30)
    with pytest.raises(DataError, match=r"noise.png: cannot be read as a PNG file"):
        read_image(noise)


def test_numpy_files(tmp_path):
    volume = RNG.random((3, 4, 5))  # stored (z, y, x)
    np.save(tmp_path / "v.npy", volume)
    img = read_image(tmp_path / "v.npy")
    assert img.array.dtype == np.float32 and img.array.shape == (5, 4, 3)
    np.testing.assert_allclose(img.array.transpose(2, 1, 0), volume, rtol=1e-6)
    assert peek_image(tmp_path / "v.npy").shape == (5, 4, 3)
    np.savez(tmp_path / "one.npz", image=np.ones((4, 4), np.uint8))
    assert read_image(tmp_path / "one.npz").array.shape == (4, 4)
    np.savez(tmp_path / "two.npz", a=np.ones((4, 4)), b=np.zeros((2, 2)))
    assert read_image(tmp_path / "two.npz", key="b").array.shape == (2, 2)
    with pytest.raises(DataError, match=r"two.npz: holds 2 arrays \(a, b\); name one with key="):
        read_image(tmp_path / "two.npz")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=r"junk.npy: is not a NumPy .npy file"):
        read_image(tmp_path / "junk.npy")


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "scan.xyz").write_text("?")
    with pytest.raises(DataError, match=r"scan.xyz: unknown image format '.xyz'; supported: .nii"):
        read_image(tmp_path / "scan.xyz")
    with pytest.raises(DataError, match=r"gone.nii.gz: file not found"):
        read_image(tmp_path / "gone.nii.gz")


# --------------------------------------------------------------------------- studies


def test_study_sources_split_4d_channels_and_read_the_file_once(tmp_path):
    data = RNG.random((4, 5, 6, 3)).astype(np.float32)
    path = write_nifti(tmp_path / "mri.nii.gz", data)
    mask = write_nifti(tmp_path / "seg.nii.gz", (data[..., 0] > 0.5).astype(np.uint8))
    sources = {m: channel_source(path, c) for c, m in enumerate(["flair", "t1", "t2"])}
    images = read_study_images(sources)
    assert list(images) == ["flair", "t1", "t2"]
    for c, m in enumerate(images):
        np.testing.assert_array_equal(images[m].array, data[..., c])
    study = Study("s1", sources=sources, labels={"tumour": mask})
    arrays = load_study_arrays(study)
    assert {a.shape for a in arrays.values()} == {(4, 5, 6)}
    loaded = load_study(study)
    assert loaded.loaded and loaded.labels["tumour"].dtype == np.uint8 and loaded.spacing == (1.0, 1.0, 1.0)
    assert split_source(sources["t2"]) == (path, 2)
    assert split_source(path) == (path, None)
