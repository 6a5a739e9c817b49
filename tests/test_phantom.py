"""The simulated brain MRI cohort: determinism, physics of the contrasts, lesion labels, files."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn")
yaml = pytest.importorskip("yaml")

from medformer.data.phantom import (  # noqa: E402
    ED,
    ET,
    MODALITIES,
    NCR,
    SCANNER_15T,
    PhantomConfig,
    assign_splits,
    brats_regions,
    generate_subject,
    plot_subject,
    subject_parameters,
    write_cohort,
)
from medformer.errors import ConfigError  # noqa: E402

# 3 mm keeps the enhancing rim a few voxels thick while staying fast; every subject has an enhancing
# tumour and all four contrasts, so the physics tests always have something to look at.
SMALL = PhantomConfig(
    n_subjects=4,
    seed=7,
    voxel_size_mm=3.0,
    shape=(48, 56, 48),
    tumour_fraction=1.0,
    enhancing_fraction=1.0,
    missing_fraction=0.0,
    tumour_radius_mm=(20.0, 26.0),
)


@pytest.fixture(scope="module")
def subjects() -> list[dict]:
    return [generate_subject(i, SMALL) for i in range(3)]


def _normal(s: dict, tissue: str, threshold: float = 0.75) -> np.ndarray:
    """Voxels of nearly pure normal tissue, away from the lesion."""
    return (s["tissues"][tissue] > threshold) & (s["label"] == 0)


def _surrounding_wm(s: dict, mm: float = 20.0) -> np.ndarray:
    """Normal white matter within `mm` of the tumour: the local reference, free of the bias field's
    slow drift across the brain."""
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(s["label"] == 0, sampling=s["spacing"])
    return _normal(s, "wm", 0.75) & (distance < mm)


def _mean(s: dict, modality: str, mask: np.ndarray) -> float:
    assert mask.sum() >= 10, f"too few voxels to compare ({mask.sum()})"
    return float(s["images"][modality][mask].mean())


def test_same_seed_same_subject_whatever_the_cohort_size(subjects):
    again = generate_subject(1, replace(SMALL, n_subjects=50))
    first = subjects[1]
    assert set(again["images"]) == set(first["images"])
    for m in first["images"]:
        np.testing.assert_array_equal(again["images"][m], first["images"][m])
    np.testing.assert_array_equal(again["label"], first["label"])
    assert again["survival"] == first["survival"] and again["enhancing"] == first["enhancing"]


def test_different_index_or_seed_differs(subjects):
    a, b = subjects[0], subjects[1]
    assert not np.allclose(a["images"]["T1w"], b["images"]["T1w"])
    assert not np.array_equal(a["label"], b["label"])
    other = generate_subject(0, replace(SMALL, seed=8))
    assert not np.allclose(a["images"]["T1w"], other["images"]["T1w"])


def test_arrays_are_zyx_float32_and_uint8(subjects):
    s = subjects[0]
    for img in s["images"].values():
        assert img.shape == SMALL.shape and img.dtype == np.float32 and np.isfinite(img).all()
        assert img.min() >= 0
    assert s["label"].dtype == np.uint8 and set(np.unique(s["label"])) <= {0, NCR, ED, ET}
    assert s["spacing"] == (3.0, 3.0, 3.0)


def test_tissue_contrast_is_physically_ordered(subjects):
    for s in subjects:
        gm, wm, csf = _normal(s, "gm", 0.7), _normal(s, "wm", 0.85), _normal(s, "csf", 0.8)
        t1 = {k: _mean(s, "T1w", v) for k, v in (("gm", gm), ("wm", wm), ("csf", csf))}
        t2 = {k: _mean(s, "T2w", v) for k, v in (("gm", gm), ("wm", wm), ("csf", csf))}
        flair = {k: _mean(s, "FLAIR", v) for k, v in (("gm", gm), ("wm", wm), ("csf", csf))}
        assert t1["wm"] > t1["gm"] > t1["csf"], t1
        assert t2["csf"] > t2["gm"] > t2["wm"], t2
        assert flair["csf"] < 0.5 * min(flair["gm"], flair["wm"]), flair  # CSF suppressed


def test_enhancing_rim_is_bright_on_t1c_only(subjects):
    for s in subjects:
        rim, wm = s["label"] == ET, _surrounding_wm(s)
        rel_t1c = _mean(s, "T1c", rim) / _mean(s, "T1c", wm)
        rel_t1w = _mean(s, "T1w", rim) / _mean(s, "T1w", wm)
        assert rel_t1c > 1.1 and rel_t1c > 1.5 * rel_t1w, (rel_t1c, rel_t1w)


def test_oedema_is_bright_on_flair_and_t2w(subjects):
    for s in subjects:
        oedema, wm = s["label"] == ED, _surrounding_wm(s)
        assert _mean(s, "FLAIR", oedema) > 1.2 * _mean(s, "FLAIR", wm)
        assert _mean(s, "T2w", oedema) > 1.2 * _mean(s, "T2w", wm)


def test_labels_only_in_the_brain_and_background_is_zero(subjects):
    for s in subjects:
        assert (s["label"] > 0).any()
        assert not (s["label"][~s["brain"]]).any()
        for img in s["images"].values():
            assert not img[~s["brain"]].any()  # skull-stripped, as BraTS


def test_brats_regions_are_nested(subjects):
    hand = np.array([0, 1, 2, 3, 3, 2])
    r = brats_regions(hand)
    assert r["ET"].tolist() == [0, 0, 0, 1, 1, 0]
    assert r["TC"].tolist() == [0, 1, 0, 1, 1, 0]
    assert r["WT"].tolist() == [0, 1, 1, 1, 1, 1]
    for s in subjects:
        r = brats_regions(s["label"])
        assert r["ET"].any()
        assert not (r["ET"] & ~r["TC"]).any() and not (r["TC"] & ~r["WT"]).any()
        assert r["TC"].sum() < r["WT"].sum()


def test_non_enhancing_tumours_have_no_et_and_no_tumour_means_no_label():
    cfg = replace(SMALL, enhancing_fraction=0.0)
    s = generate_subject(0, cfg)
    assert s["enhancing"] == 0 and not (s["label"] == ET).any() and (s["label"] == NCR).any()
    none = generate_subject(0, replace(SMALL, tumour_fraction=0.0))
    assert not none["label"].any() and none["enhancing"] == 0 and none["survival"] > 0


def test_missing_modalities_at_the_configured_rate_never_all():
    cfg = replace(SMALL, missing_fraction=0.3)
    missing = [subject_parameters(i, cfg).missing for i in range(600)]
    rate = np.mean([len(m) > 0 for m in missing])
    assert abs(rate - 0.3) < 0.06, rate  # 3.3 binomial SDs
    assert max(len(m) for m in missing) <= 2
    assert {len(m) for m in missing} == {0, 1, 2}
    assert all(subject_parameters(i, replace(cfg, missing_fraction=1.0)).missing for i in range(50))
    assert not any(subject_parameters(i, SMALL).missing for i in range(50))
    index = next(i for i, m in enumerate(missing) if m)
    s = generate_subject(index, cfg)
    assert set(s["images"]) == set(MODALITIES) - set(missing[index]) and s["missing"] == list(missing[index])


def test_missing_fraction_does_not_change_the_anatomy(subjects):
    other = generate_subject(0, replace(SMALL, missing_fraction=0.9))
    np.testing.assert_array_equal(other["label"], subjects[0]["label"])
    for m in other["images"]:
        np.testing.assert_array_equal(other["images"][m], subjects[0]["images"][m])


def test_splits_deterministic_and_proportional():
    splits = assign_splits(40, seed=0)
    assert splits == assign_splits(40, seed=0)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (28, 6, 6)
    assert sorted(set(assign_splits(4, seed=1))) == ["test", "train", "val"]


def test_second_scanner_changes_contrast_not_anatomy(subjects):
    """A domain shift: the same subjects rescanned at 1.5 T with other timings, bias and noise."""
    other = generate_subject(0, replace(SMALL, scanner=SCANNER_15T))
    np.testing.assert_array_equal(other["label"], subjects[0]["label"])
    assert other["survival"] == subjects[0]["survival"]
    assert not np.allclose(other["images"]["FLAIR"], subjects[0]["images"]["FLAIR"])
    gm, wm, csf = _normal(other, "gm", 0.7), _normal(other, "wm", 0.85), _normal(other, "csf", 0.8)
    assert _mean(other, "T1w", wm) > _mean(other, "T1w", gm) > _mean(other, "T1w", csf)
    assert _mean(other, "FLAIR", csf) < 0.5 * _mean(other, "FLAIR", wm)


def test_config_round_trips_through_dict():
    cfg = replace(SMALL, scanner=SCANNER_15T)
    assert PhantomConfig.from_dict(cfg.to_dict()) == cfg
    assert PhantomConfig.from_dict({"scanner": "1.5T", "shape": [32, 32, 32]}).scanner == SCANNER_15T
    with pytest.raises(ConfigError, match="unknown"):
        PhantomConfig.from_dict({"voxel_size": 2})


def test_invalid_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="missing_fraction"):
        PhantomConfig(missing_fraction=1.5)
    with pytest.raises(ConfigError, match="shape"):
        PhantomConfig(shape=(64, 64))


def test_write_cohort_files_manifest_and_idempotence(tmp_path):
    cfg = replace(SMALL, missing_fraction=0.5, tumour_fraction=0.75, enhancing_fraction=0.5)
    root = tmp_path / "phantom"
    manifest = write_cohort(root, cfg, progress=False)
    assert manifest == root / "manifest.csv"
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == [
        "id",
        "split",
        "image:T1w",
        "image:T1c",
        "image:T2w",
        "image:FLAIR",
        "label:enhancing",
        "label:survival",
        "mask:tumour",
    ]
    assert [r["id"] for r in rows] == [f"sub-{i:04d}" for i in range(4)]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    for i, row in enumerate(rows):
        s = generate_subject(i, cfg)
        present = [m for m in MODALITIES if row[f"image:{m}"]]
        assert present == list(s["images"]) and 2 <= len(present) <= 4
        assert int(row["label:enhancing"]) == s["enhancing"] and float(row["label:survival"]) == s["survival"]
        for m in present:
            img = nib.load(root / row[f"image:{m}"])
            assert img.get_data_dtype() == np.float32 and nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms(), (3.0, 3.0, 3.0))
            np.testing.assert_allclose(img.affine, s["affine"])
            np.testing.assert_array_equal(np.asarray(img.dataobj), s["images"][m].transpose(2, 1, 0))
        seg = nib.load(root / row["mask:tumour"])
        assert seg.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(seg.dataobj), s["label"].transpose(2, 1, 0))
        assert json.loads((root / row["id"] / "subject.json").read_text())["id"] == row["id"]
    collection = yaml.safe_load((root / "collection.yaml").read_text())
    assert collection["name"] == "brain_phantom" and collection["ndim"] == 3
    assert [(t["name"], t["kind"], t["num_classes"]) for t in collection["tasks"]] == [
        ("tumour", "segmentation", 4),
        ("enhancing", "binary", 2),
        ("survival", "regression", 1),
    ]
    assert collection["tasks"][0]["classes"] == ["background", "necrosis", "oedema", "enhancing"]

    stamp = (root / "cohort.json").stat().st_mtime_ns
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    assert write_cohort(root, cfg, progress=False) == manifest  # same config: nothing rewritten
    assert (root / "cohort.json").stat().st_mtime_ns == stamp
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())

    write_cohort(root, replace(cfg, n_subjects=3), progress=False)  # another config: rewritten
    assert not (root / "sub-0003").exists()
    with open(manifest, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_nifti_geometry_matches_the_mni_template(tmp_path):
    """Without jitter the written T1w lies on the MNI template: affine and axis order are right."""
    from nilearn.datasets import load_mni152_template
    from nilearn.image import resample_to_img

    still = replace(
        SMALL,
        n_subjects=1,
        deformation_mm=0.0,
        rotation_deg=0.0,
        scale_sd=0.0,
        translation_mm=0.0,
        tumour_fraction=0.0,
    )
    write_cohort(tmp_path, still, progress=False)
    img = nib.load(tmp_path / "sub-0000" / "T1w.nii.gz")
    reference = resample_to_img(
        load_mni152_template(resolution=1), img, interpolation="linear", force_resample=True, copy_header=True
    ).get_fdata()
    data = img.get_fdata()
    brain = data > 0

    def corr(a: np.ndarray) -> float:
        return float(np.corrcoef(a[brain], reference[brain])[0, 1])

    assert corr(data) > 0.8
    assert corr(data) > corr(data[:, ::-1, :]) + 0.2 and corr(data) > corr(data[:, :, ::-1]) + 0.2


def test_plot_subject_writes_png(subjects, tmp_path):
    path = plot_subject(subjects[0], tmp_path / "preview.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_through_medformer_readers_give_back_the_arrays(tmp_path):
    """Reader + preprocessing (RAS, no crop, no scaling) return generate_subject's (z, y, x) arrays."""
    from medformer.config import PreprocessConfig
    from medformer.data.manifest import load_manifest
    from medformer.data.readers import read_image
    from medformer.data.transforms import Preprocessor, Volume

    cfg = replace(SMALL, n_subjects=1)
    collection = load_manifest(write_cohort(tmp_path, cfg, progress=False))
    assert collection.name == "brain_phantom" and collection.ndim == 3
    assert [t.name for t in collection.tasks] == ["tumour", "enhancing", "survival"]
    study = collection.studies[0]

    def volume(path) -> Volume:
        image = read_image(path)
        return Volume(image.array, image.affine, str(path))

    images = {m: volume(p) for m, p in study.sources.items()}
    out, masks, _ = Preprocessor(PreprocessConfig(crop_foreground=False, intensity="none"))(
        images, {"tumour": volume(study.labels["tumour"])}
    )
    s = generate_subject(0, cfg)
    for m, array in out.items():
        np.testing.assert_allclose(array, s["images"][m], rtol=1e-6)
    np.testing.assert_array_equal(masks["tumour"], s["label"])
    assert study.labels["enhancing"] == s["enhancing"] and study.labels["survival"] == s["survival"]
