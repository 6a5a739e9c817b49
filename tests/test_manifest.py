"""Collections from files: CSV manifests, Decathlon datalists, subject folders, and telling them apart."""

import json

import numpy as np
import pytest

from _files import MEDMNIST_DIR, write_dicom_series, write_nifti, write_picture
from medformer.data.discover import hash_split, load_folder
from medformer.data.manifest import (
    detect_format,
    infer_task,
    load_datalist,
    load_manifest,
    open_collection,
    open_collections,
)
from medformer.data.readers import load_study, load_study_arrays, split_source
from medformer.errors import DataError

RNG = np.random.default_rng(0)


def _volume(path, shape=(6, 5, 4), value=None):
    data = RNG.random(shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
    return write_nifti(path, data)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- CSV manifest


def _manifest_data(root):
    for sid in ("a", "b", "c"):
        _volume(root / sid / "t1.nii.gz")
        _volume(root / sid / "flair.nii.gz")
        write_nifti(root / sid / "seg.nii.gz", (RNG.random((6, 5, 4)) * 3).astype(np.uint8))


def test_manifest_with_inferred_tasks(tmp_path):
    _manifest_data(tmp_path)
    csv = _write(
        tmp_path / "manifest.csv",
        "id,split,image:t1,image:flair,label:grade,label:sick,label:age,label:dx,mask:tumour,site\n"
        "a,train,a/t1.nii.gz,a/flair.nii.gz,2,1,63.5,benign,a/seg.nii.gz,x\n"
        "b,validation,b/t1.nii.gz,,0,0,70,malignant,,y\n"
        f"c,,{tmp_path}/c/t1.nii.gz,c/flair.nii.gz,,1,55,benign,c/seg.nii.gz,\n",
    )
    col = load_manifest(csv)
    assert col.name == tmp_path.name and col.ndim == 3 and col.modalities == ["t1", "flair"]
    assert col.split_counts() == {"train": 2, "val": 1}
    kinds = {t.name: (t.kind, t.num_classes, t.classes) for t in col.tasks}
    assert kinds == {
        "grade": ("multiclass", 3, None),
        "sick": ("binary", 2, None),
        "age": ("regression", 1, None),
        "dx": ("binary", 2, ("benign", "malignant")),
        "tumour": ("segmentation", 3, None),
    }
    a, b, c = col.studies
    assert a.images == {} and a.sources["t1"] == tmp_path / "a" / "t1.nii.gz"
    assert b.modalities == ["t1"]  # empty cell: flair missing
    assert a.labels["grade"] == 2 and b.labels["dx"] == 1 and a.labels["age"] == 63.5
    assert "grade" not in c.labels and c.labels["tumour"] == tmp_path / "c" / "seg.nii.gz"
    assert a.metadata == {"site": "x"} and col.metadata["skipped"] == []
    loaded = load_study(a)
    loaded.validate(col.ndim, col.tasks)


def test_manifest_missing_files_are_all_listed_or_skipped(tmp_path):
    _manifest_data(tmp_path)
    csv = _write(
        tmp_path / "study.csv",
        "id,image:t1,image:flair\na,a/t1.nii.gz,a/flair.nii.gz\nb,b/t1.nii.gz,b/nope.nii.gz\nc,c/gone.nii.gz,\n",
    )
    with pytest.raises(DataError) as info:
        load_manifest(csv)
    err = info.value
    assert err.path == str(csv)
    assert "2 problem(s)" in err.problem
    assert "line 3 (id 'b')" in err.problem and str(tmp_path / "b" / "nope.nii.gz") in err.problem
    assert "line 4 (id 'c')" in err.problem and str(tmp_path / "c" / "gone.nii.gz") in err.problem
    col = load_manifest(csv, skip_bad=True)
    assert [s.id for s in col.studies] == ["a"] and col.name == "study"
    assert [s.study for s in col.metadata["skipped"]] == ["b", "c"]
    assert col.metadata["skipped"][0].where == f"{csv} line 3 (id 'b')"
    assert "nope.nii.gz is missing" in col.metadata["skipped"][0].problem


def test_manifest_out_of_range_label_with_sidecar(tmp_path):
    _manifest_data(tmp_path)
    _write(
        tmp_path / "collection.yaml",
        "name: gliomas\nndim: 3\ntasks:\n"
        "  - {name: grade, kind: multiclass, num_classes: 3, classes: [lo, mid, hi]}\n",
    )
    csv = _write(tmp_path / "m.csv", "id,image:t1,label:grade\na,a/t1.nii.gz,hi\nb,b/t1.nii.gz,5\n")
    with pytest.raises(
        DataError, match=r"line 3 \(id 'b'\): label 'grade' = 5 is out of the declared range 0..2"
    ):
        load_manifest(csv)
    _write(csv, "id,image:t1,label:grade\na,a/t1.nii.gz,hi\nb,b/t1.nii.gz,1\n")
    col = load_manifest(csv)
    assert col.name == "gliomas" and [s.labels["grade"] for s in col.studies] == [2, 1]


def test_sidecar_kind_must_fit_its_column(tmp_path):
    _volume(tmp_path / "x.nii.gz")
    _write(tmp_path / "collection.yaml", "tasks:\n  - {name: tumour, kind: segmentation, num_classes: 3}\n")
    with pytest.raises(DataError, match=r"task 'tumour' as segmentation, but its column is label:tumour"):
        load_manifest(_write(tmp_path / "m.csv", "id,image:ct,label:tumour\nx,x.nii.gz,1\n"))
    _write(tmp_path / "collection.yaml", "tasks:\n  - {name: tumour, kind: segmentaton}\n")
    with pytest.raises(DataError, match=r"collection.yaml: tasks\[0\]: .*segmentaton"):
        load_manifest(tmp_path / "m.csv")


def test_manifest_structural_errors(tmp_path):
    with pytest.raises(DataError, match=r"has no 'id' column"):
        load_manifest(_write(tmp_path / "a.csv", "name,image:t1\nx,y.nii\n"))
    with pytest.raises(DataError, match=r"has no image:<modality> column"):
        load_manifest(_write(tmp_path / "b.csv", "id,label:y\nx,1\n"))
    with pytest.raises(DataError, match=r"column 'img:t1' is not image:<modality>"):
        load_manifest(_write(tmp_path / "c.csv", "id,img:t1\nx,y.nii\n"))
    _volume(tmp_path / "x.nii.gz")
    with pytest.raises(DataError, match=r"split 'dev' is not one of train, val, test"):
        load_manifest(_write(tmp_path / "d.csv", "id,split,image:t1\nx,dev,x.nii.gz\n"))
    with pytest.raises(DataError, match=r"id 'x' is also on line 2"):
        load_manifest(_write(tmp_path / "e.csv", "id,image:t1\nx,x.nii.gz\nx,x.nii.gz\n"))


def test_rgb_pictures_become_one_modality_per_channel(tmp_path):
    for i in range(2):
        write_picture(tmp_path / f"{i}.png", RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8))
    col = load_manifest(
        _write(tmp_path / "derm.csv", "id,image:dermoscopy,label:melanoma\n0,0.png,1\n1,1.png,0\n")
    )
    assert col.ndim == 2 and col.modalities == ["dermoscopy_r", "dermoscopy_g", "dermoscopy_b"]
    arrays = load_study_arrays(col.studies[0])
    assert {a.shape for a in arrays.values()} == {(8, 9)}


def test_infer_task_rules():
    assert infer_task("y", ["0", "1", "", "1"], "x").kind == "binary"
    assert infer_task("y", ["0;1;0", "1;1;0"], "x").num_classes == 3
    assert infer_task("y", ["cat", "dog", "eel"], "x").classes == ("cat", "dog", "eel")
    assert infer_task("y", ["-1", "2"], "x").kind == "regression"


# --------------------------------------------------------------------------- datalists


def test_decathlon_datalist_splits_4d_images_into_modalities(tmp_path):
    names = ["FLAIR", "T1w", "t1gd", "T2w"]
    data = {}
    for sid in ("BRATS_001", "BRATS_002", "BRATS_003"):
        data[sid] = RNG.random((6, 5, 4, 4)).astype(np.float32)
        write_nifti(tmp_path / "imagesTr" / f"{sid}.nii.gz", data[sid])
        write_nifti(tmp_path / "labelsTr" / f"{sid}.nii.gz", (data[sid][..., 0] * 4).astype(np.uint8))
    spec = {
        "name": "BrainTumour",
        "tensorImageSize": "4D",
        "modality": {str(i): n for i, n in enumerate(names)},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [
            {"image": f"./imagesTr/{s}.nii.gz", "label": f"./labelsTr/{s}.nii.gz"}
            for s in ("BRATS_001", "BRATS_002")
        ],
        "test": ["./imagesTr/BRATS_003.nii.gz"],
    }
    _write(tmp_path / "dataset.json", json.dumps(spec))
    col = open_collection(tmp_path)
    assert col.name == "BrainTumour" and col.ndim == 3 and col.modalities == names
    assert col.split_counts() == {"train": 2, "test": 1}
    (task,) = col.tasks
    assert task.kind == "segmentation" and task.num_classes == 4 and task.classes[1] == "edema"
    study = col.studies[0]
    assert study.id == "BRATS_001"
    assert split_source(study.sources["t1gd"]) == (tmp_path / "imagesTr" / "BRATS_001.nii.gz", 2)
    arrays = load_study_arrays(study)
    for c, name in enumerate(names):
        np.testing.assert_array_equal(arrays[name], data["BRATS_001"][..., c])
    load_study(study).validate(col.ndim, col.tasks)
    assert "segmentation" not in col.studies[2].labels


def test_datalist_with_classification_labels_and_missing_file(tmp_path):
    for i in range(3):
        _volume(tmp_path / f"img{i}.nii.gz")
    entries = [{"image": f"img{i}.nii.gz", "label": i % 2} for i in range(3)]
    entries.append({"image": "absent.nii.gz", "label": 1})
    path = _write(tmp_path / "list.json", json.dumps({"training": entries[:2], "validation": entries[2:]}))
    with pytest.raises(
        DataError, match=r"validation\[1\] \(id 'absent'\): missing file\(s\): .*absent.nii.gz"
    ):
        load_datalist(path)
    col = load_datalist(path, skip_bad=True)
    assert col.modalities == ["image"] and col.tasks[0].kind == "binary"
    assert [s.labels["label"] for s in col.studies] == [0, 1, 0] and len(col.metadata["skipped"]) == 1


def test_datalist_channel_count_must_match(tmp_path):
    write_nifti(tmp_path / "x.nii.gz", RNG.random((4, 4, 4, 2)).astype(np.float32))
    _write(
        tmp_path / "dataset.json",
        json.dumps({"modality": {"0": "a", "1": "b", "2": "c"}, "training": ["x.nii.gz"]}),
    )
    with pytest.raises(DataError, match=r"'modality' names 3 channels"):
        load_datalist(tmp_path / "dataset.json")


# --------------------------------------------------------------------------- folder layout


def test_folder_layout_with_missing_modality_masks_and_dicom(tmp_path):
    root = tmp_path / "brains"
    for sid in ("sub-01", "sub-02", "sub-03"):
        _volume(root / sid / "t1.nii.gz")
        write_nifti(root / sid / "seg.nii.gz", np.zeros((6, 5, 4), np.uint8) + (sid == "sub-01"))
    _volume(root / "sub-01" / "flair.nii.gz")
    _volume(root / "sub-03" / "flair.nii.gz")  # sub-02 lacks flair
    write_dicom_series(root / "sub-03" / "ct", RNG.integers(0, 9, (4, 5, 6)).astype(np.int16))
    (root / "sub-01" / "notes.txt").write_text("ignored")
    (root / "empty-dir").mkdir()
    col = open_collection(root)
    assert col.name == "brains" and col.ndim == 3 and col.modalities == ["ct", "flair", "t1"]
    assert col.modality_counts() == {"ct": 1, "flair": 2, "t1": 3}
    assert [s.modalities for s in col.studies][1] == ["t1"]
    (task,) = col.tasks
    assert task.name == "segmentation" and task.num_classes == 2
    assert col.studies[0].labels["segmentation"] == root / "sub-01" / "seg.nii.gz"
    assert {s.split for s in col.studies} <= {"train", "val", "test"}
    assert [s.split for s in col.studies] == [hash_split(s.id) for s in col.studies]
    assert [s.study for s in col.metadata["skipped"]] == ["empty-dir"]
    assert load_study_arrays(col.studies[2])["ct"].shape == (6, 5, 4)


def test_folder_splits_file_and_hash_split_proportions(tmp_path):
    for sid in ("p1", "p2", "p3"):
        write_picture(tmp_path / sid / "xray.png", RNG.integers(0, 256, (6, 6), dtype=np.uint8))
    _write(tmp_path / "splits.csv", "id,split\np2,val\np3,test\n")
    col = load_folder(tmp_path)
    assert [s.split for s in col.studies] == ["train", "val", "test"] and col.ndim == 2
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(2000):
        counts[hash_split(f"subject-{i}")] += 1
    assert 1500 < counts["train"] < 1700 and 140 < counts["val"] < 260 and 140 < counts["test"] < 260


def test_empty_and_unknown_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no studies found"):
        open_collection(empty)
    with pytest.raises(DataError, match=r"does not exist"):
        open_collection(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no collection found"):
        open_collection(_write(tmp_path / "notes.txt", "hi"))
    np.savez(tmp_path / "mine.npz", x=np.zeros(3))
    with pytest.raises(DataError, match=r"not named like a MedMNIST file"):
        open_collection(tmp_path / "mine.npz")


@pytest.mark.skipif(not (MEDMNIST_DIR / "breastmnist.npz").exists(), reason="MedMNIST files absent")
def test_detection_of_medmnist_files_and_folders(tmp_path):
    assert detect_format(MEDMNIST_DIR / "breastmnist.npz") == "medmnist"
    assert detect_format(MEDMNIST_DIR) == "medmnist_folder"
    assert open_collection(MEDMNIST_DIR / "breastmnist.npz").name == "breastmnist"
    cols = open_collections(MEDMNIST_DIR, skip_bad=True, size=28)
    assert [c.name for c in cols] == ["adrenalmnist3d", "breastmnist", "pneumoniamnist"]
    with pytest.raises(DataError, match=r"holds 3 MedMNIST files .*use open_collections"):
        open_collection(MEDMNIST_DIR)
    _volume(tmp_path / "a.nii.gz")
    _write(tmp_path / "m.csv", "id,image:ct\na,a.nii.gz\n")
    assert detect_format(tmp_path) == "manifest" and open_collection(tmp_path).name == "m"
    assert [c.name for c in open_collections(tmp_path / "m.csv")] == ["m"]
