"""Preprocessing: reorientation, resampling, foreground crop, intensity scaling, resize; clear errors."""

import numpy as np
import pytest

from medformer.config import PreprocessConfig
from medformer.data.transforms import Preprocessor, Volume
from medformer.errors import DataError


def _head(shape=(40, 30, 20)):
    a = np.zeros(shape, np.float32)
    a[5:35, 4:26, 3:17] = 1.0 + np.random.default_rng(0).random((30, 22, 14))
    return a


def test_pipeline_outputs_one_grid_scaled_and_sized():
    a = _head()
    aff = np.diag([2.0, 1.5, 1.0, 1.0])
    seg = (a > 1.5).astype(np.uint8)
    pre = Preprocessor(PreprocessConfig(spacing=[2.0, 2.0, 2.0], size=[16, 16, 16]))
    out, masks, meta = pre(
        {"T1": Volume(a, aff, "t1"), "T2": Volume(3 * a, aff, "t2")}, {"tumour": Volume(seg, aff, "s")}
    )
    assert set(out) == {"T1", "T2"}
    for arr in out.values():
        assert arr.shape == (16, 16, 16) and arr.dtype == np.float32
        assert arr.min() >= 0 and arr.max() <= 1
    assert masks["tumour"].shape == (16, 16, 16) and set(np.unique(masks["tumour"])) <= {0, 1}
    assert meta["spacing"] == pytest.approx((2.0, 2.0, 2.0))


def test_foreground_crop_removes_air():
    a = _head()
    out, _, meta = Preprocessor(PreprocessConfig(orientation=None))({"x": Volume(a, np.eye(4), "x")})
    # cropped to the box of non-background voxels, then transposed to (z, y, x)
    assert out["x"].shape == (14, 22, 30)
    assert meta["crop_box"] == [[5, 4, 3], [35, 26, 17]]


def test_reorientation_to_ras_flips_axes():
    a = np.zeros((4, 5, 6), np.float32)
    a[0, 0, 0] = 1.0  # first voxel; with an LPS affine (x, y flipped) it must move to the far end in RAS
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    cfg = PreprocessConfig(crop_foreground=False, intensity="none")
    out, _, _ = Preprocessor(cfg)({"x": Volume(a, lps, "x")})
    arr = out["x"]  # (z, y, x)
    assert arr.shape == (6, 5, 4)
    assert arr[0, 4, 3] == 1.0 and arr.sum() == 1.0


def test_ct_window_clips_to_unit_range():
    a = np.linspace(-2000, 2000, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    cfg = PreprocessConfig(intensity="ct_window", ct_window=(-1000, 1000), crop_foreground=False)
    out, _, _ = Preprocessor(cfg)({"ct": Volume(a, np.eye(4), "ct")})
    assert out["ct"].min() == 0.0 and out["ct"].max() == 1.0
    assert 0.4 < np.median(out["ct"]) < 0.6


def test_different_grids_error_names_file_and_modalities():
    a = _head()
    with pytest.raises(DataError) as e:
        Preprocessor()(
            {"T1": Volume(a, np.eye(4), "sub/T1.nii.gz"), "T2": Volume(a[:30], np.eye(4), "sub/T2.nii.gz")}
        )
    assert "sub/T1.nii.gz" in str(e.value) and "T2" in str(e.value) and "resample_to_first" in str(e.value)
    out, _, _ = Preprocessor(PreprocessConfig(resample_to_first=True, crop_foreground=False))(
        {"T1": Volume(a, np.eye(4), "t1"), "T2": Volume(a[:30], np.eye(4), "t2")}
    )
    assert out["T1"].shape == out["T2"].shape


def test_nan_voxels_error_names_file():
    a = _head()
    a[10, 10, 10] = np.nan
    with pytest.raises(DataError, match=r"t1\.nii\.gz: modality 'T1' has 1 NaN/Inf"):
        Preprocessor()({"T1": Volume(a, np.eye(4), "t1.nii.gz")})


def test_fingerprint_changes_with_settings():
    assert Preprocessor().fingerprint() == Preprocessor(PreprocessConfig()).fingerprint()
    assert Preprocessor().fingerprint() != Preprocessor(PreprocessConfig(size=[32, 32, 32])).fingerprint()


def test_2d_images_keep_their_layout():
    img = np.zeros((28, 28), np.float32)
    img[4:20, 6:26] = 1 + np.arange(16 * 20).reshape(16, 20)
    out, _, _ = Preprocessor(PreprocessConfig(size=[28, 28]))({"xray": Volume(img, np.eye(4), "a.png")})
    assert out["xray"].shape == (28, 28)
    assert out["xray"][0].max() == 0  # padded rows stay background
