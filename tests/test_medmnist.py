"""MedMNIST: the real files load with the official counts; damaged or foreign files fail clearly."""

import io
import time

import numpy as np
import pytest

from _files import MEDMNIST_DIR, fake_medmnist
from medformer.data import medmnist
from medformer.data.medmnist import (
    MEDMNIST_FLAGS,
    is_medmnist_file,
    load_medmnist,
    medmnist_info,
    medmnist_sizes,
    parse_medmnist_filename,
    to_float,
)
from medformer.errors import ConfigError, DataError

real = pytest.mark.skipif(not (MEDMNIST_DIR / "breastmnist.npz").exists(), reason="MedMNIST files absent")


@real
@pytest.mark.parametrize("flag", ["breastmnist", "pneumoniamnist", "adrenalmnist3d"])
def test_real_files_match_the_official_facts(flag):
    info = medmnist_info(flag)
    col = load_medmnist(flag, root=MEDMNIST_DIR)
    assert col.name == flag and col.ndim == info["ndim"]
    assert col.split_counts() == info["n_samples"]
    assert col.modalities == [info["modality"]]
    (task,) = col.tasks
    assert task.name == "label" and task.kind == "binary" and task.classes == tuple(info["labels"].values())
    study = col.split("test")[0]
    assert study.id == f"{flag}/test/0000000"
    image = study.images[info["modality"]]
    assert image.shape == (28,) * info["ndim"] and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    labels = np.array([s.labels["label"] for s in col.studies])
    assert set(np.unique(labels)) <= {0, 1}
    for s in col.studies[:50]:
        s.validate(col.ndim, col.tasks)


@real
def test_pneumonia_loads_fast_and_studies_share_one_array():
    start = time.perf_counter()
    col = load_medmnist("pneumoniamnist", root=MEDMNIST_DIR)
    assert time.perf_counter() - start < 1.5
    assert len(col) == 5856
    a, b = col.studies[0].images["xray"], col.studies[1].images["xray"]
    assert a.base is not None and a.base is b.base  # views into the split's array, not copies


@real
def test_env_var_root_and_file_recognition(monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(MEDMNIST_DIR))
    assert len(load_medmnist("breastmnist")) == 780
    assert is_medmnist_file(MEDMNIST_DIR / "breastmnist.npz")
    assert parse_medmnist_filename("organmnist3d_64.npz") == ("organmnist3d", 64)
    assert not is_medmnist_file("breastmnist_28.npz")  # size 28 has no suffix
    assert not is_medmnist_file("organmnist3d_128.npz")  # 3D sets stop at 64
    assert not is_medmnist_file("mydata.npz")


@real
def test_wrong_md5_names_file_and_both_sums(tmp_path):
    copy = tmp_path / "breastmnist.npz"
    blob = bytearray((MEDMNIST_DIR / "breastmnist.npz").read_bytes())
    blob[1000] ^= 0xFF
    copy.write_bytes(bytes(blob))
    with pytest.raises(DataError) as info:
        load_medmnist("breastmnist", root=tmp_path)
    assert info.value.path == str(copy)
    assert "expected 750601b1f35ba3300ea97c75c52ff8f6" in info.value.problem
    assert "MD5 is " in info.value.problem


def test_missing_keys_are_listed(tmp_path):
    path = tmp_path / "breastmnist.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(
        DataError, match=r"is missing key\(s\) val_images, val_labels, test_images, test_labels"
    ) as info:
        load_medmnist("breastmnist", root=tmp_path, check_md5=False)
    assert info.value.path == str(path)


def test_out_of_range_labels_name_file_and_value(tmp_path):
    path = fake_medmnist(tmp_path / "breastmnist.npz")
    arrays = dict(np.load(path))
    arrays["val_labels"][1, 0] = 7
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"val_labels\[1\] = 7 is out of the declared range 0..1") as info:
        load_medmnist("breastmnist", root=tmp_path, check_md5=False)
    assert info.value.path == str(path)


def test_rgb_sets_give_one_modality_per_channel(tmp_path):
    path = fake_medmnist(tmp_path / "dermamnist_64.npz", shape=(64, 64, 3), classes=7)
    col = load_medmnist("dermamnist", size=64, root=tmp_path, check_md5=False)
    assert col.name == "dermamnist_64" and col.modalities == [
        "dermatoscope_r",
        "dermatoscope_g",
        "dermatoscope_b",
    ]
    raw = np.load(path)["train_images"][2]
    study = col.studies[2]
    for c, m in enumerate(col.modalities):
        np.testing.assert_allclose(study.images[m], raw[..., c] / 255, rtol=1e-6)
        assert study.images[m].flags.c_contiguous
    assert col.tasks[0].kind == "multiclass" and col.tasks[0].num_classes == 7


def test_multilabel_and_uint8_mode(tmp_path):
    arrays = _fake_file(tmp_path / "chestmnist.npz", (4, 2, 2), labels=14)
    col = load_medmnist("chestmnist", root=tmp_path, check_md5=False, as_uint8=True)
    task = col.tasks[0]
    assert task.kind == "multilabel" and task.num_classes == 14
    study = col.studies[0]
    assert study.labels["label"].shape == (14,)
    assert study.images["xray"].dtype == np.uint8 and col.metadata["image_scale"] == 1 / 255
    np.testing.assert_allclose(to_float(study).images["xray"], arrays["train_images"][0] / 255, rtol=1e-6)


def test_bad_flag_and_size_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean breastmnist"):
        load_medmnist("breastmnst", root=tmp_path)
    with pytest.raises(ConfigError, match=r"3D sets come in sizes 28, 64"):
        load_medmnist("adrenalmnist3d", size=128, root=tmp_path)
    assert medmnist_sizes("pathmnist") == (28, 64, 128, 224)
    assert len(MEDMNIST_FLAGS) == 18
    with pytest.raises(DataError, match=r"MedMNIST file not found; pass download=True"):
        load_medmnist("breastmnist", root=tmp_path)


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@real
def test_download_is_checked_and_atomic(tmp_path, monkeypatch):
    good = (MEDMNIST_DIR / "breastmnist.npz").read_bytes()
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return _Response(payload)

    monkeypatch.setattr(medmnist.urllib.request, "urlopen", fake_urlopen)
    payload = good[:-10] + b"0123456789"  # damaged in transit
    with pytest.raises(DataError, match=r"downloaded data has MD5"):
        load_medmnist("breastmnist", root=tmp_path / "cache", download=True)
    assert list((tmp_path / "cache").iterdir()) == []  # no half file left behind
    payload = good
    col = load_medmnist("breastmnist", root=tmp_path / "cache", download=True)
    assert len(col) == 780
    assert urls[-1] == "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["breastmnist.npz"]


def test_uint8_images_reach_the_batch_scaled_to_unit_range(tmp_path):
    from medformer.data.dataset import CollectionDataset

    arrays = _fake_file(tmp_path / "breastmnist.npz", (3, 1, 1), labels=1)
    col = load_medmnist("breastmnist", root=tmp_path, check_md5=False, as_uint8=True)
    item = CollectionDataset(col, "train")[0]
    np.testing.assert_allclose(item["images"][0].numpy(), arrays["train_images"][0] / 255, rtol=1e-6)


def _fake_file(path, counts, labels):
    """A MedMNIST-format file of random 28x28 uint8 images and 0/1 labels (``labels`` columns)."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, labels), dtype=np.uint8)
    np.savez(path, **arrays)
    return arrays
