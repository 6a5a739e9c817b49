"""Preprocessing cache: second read comes from disk, keys follow files and settings, bad studies skip."""

import os

import nibabel as nib
import numpy as np
import pytest

from medformer.config import PreprocessConfig
from medformer.data.cache import PreprocessCache
from medformer.data.study import Collection, Study, TaskSpec
from medformer.data.transforms import Preprocessor
from medformer.errors import DataError


def _nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), path)
    return path


def _study(root, name, value=1.0, shape=(12, 10, 8), seg=False):
    a = np.zeros(shape, np.float32)
    a[2:-2, 2:-2, 2:-2] = value + np.random.default_rng(0).random((shape[0] - 4, shape[1] - 4, shape[2] - 4))
    sources = {m: _nifti(root / name / f"{m}.nii.gz", a * (i + 1)) for i, m in enumerate(["T1", "T2"])}
    labels = {}
    if seg:
        labels["tumour"] = _nifti(root / name / "seg.nii.gz", (a > value + 0.5).astype(np.float32))
    return Study(name, sources=sources, labels=labels)


class CountingPreprocessor(Preprocessor):
    calls = 0

    def __call__(self, images, masks=None):
        CountingPreprocessor.calls += 1
        return super().__call__(images, masks)


def test_second_load_reads_the_cache(tmp_path):
    study = _study(tmp_path / "data", "s1", seg=True)
    CountingPreprocessor.calls = 0
    cache = PreprocessCache(tmp_path / "cache", CountingPreprocessor(PreprocessConfig(size=[8, 8, 8])))
    a = cache(study)
    b = cache(study)
    assert CountingPreprocessor.calls == 1
    assert set(a.images) == {"T1", "T2"} and a.images["T1"].shape == (8, 8, 8)
    np.testing.assert_array_equal(a.images["T2"], b.images["T2"])
    np.testing.assert_array_equal(a.labels["tumour"], b.labels["tumour"])
    assert a.labels["tumour"].max() == 1


def test_changed_setting_or_file_misses_the_cache(tmp_path):
    study = _study(tmp_path / "data", "s1")
    c1 = PreprocessCache(tmp_path / "cache", Preprocessor(PreprocessConfig(size=[8, 8, 8])))
    c2 = PreprocessCache(tmp_path / "cache", Preprocessor(PreprocessConfig(size=[6, 6, 6])))
    assert c1.key(study) != c2.key(study)
    assert c2(study).images["T1"].shape == (6, 6, 6)
    before = c1.key(study)
    path = study.sources["T1"]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert c1.key(study) != before


def test_prepare_skips_bad_studies_and_reports_them(tmp_path):
    good = _study(tmp_path / "data", "good")
    bad = _study(tmp_path / "data", "bad")
    broken = np.ones((12, 10, 8), np.float32)
    broken[3, 3, 3] = np.inf
    _nifti(bad.sources["T2"], broken)
    col = Collection("c", 3, ["T1", "T2"], [good, bad], [TaskSpec("y", "binary")])
    cache = PreprocessCache(tmp_path / "cache", Preprocessor())
    with pytest.raises(DataError, match=r"T2\.nii\.gz: modality 'T2' has 1 NaN/Inf"):
        cache.prepare(col, progress=False)
    kept, skipped = cache.prepare(col, skip_bad=True, progress=False)
    assert [s.id for s in kept.studies] == ["good"]
    assert len(skipped) == 1 and skipped[0].study == "bad" and "NaN/Inf" in skipped[0].problem
    assert skipped[0].where.endswith("T2.nii.gz")


def test_missing_file_is_named(tmp_path):
    study = _study(tmp_path / "data", "s1")
    os.remove(study.sources["T2"])
    with pytest.raises(DataError, match=r"T2\.nii\.gz: file of 'T2' for study 's1' does not exist"):
        PreprocessCache(tmp_path / "cache")(study)
