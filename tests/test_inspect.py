"""`data inspect`: facts about a collection, every problem named by file, --skip-bad behaviour."""

import json

import nibabel as nib
import numpy as np
import pytest

from medformer.cli import main
from medformer.data.inspect import inspect_path
from medformer.errors import DataError

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


def _save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), path)


def _cohort(root):
    rng = np.random.default_rng(0)
    for i in range(3):
        for m in ("T1", "FLAIR"):
            _save(root / f"a{i}" / f"{m}.nii.gz", rng.random((8, 9, 10)))
    _save(root / "a0" / "seg.nii.gz", (rng.random((8, 9, 10)) > 0.5).astype(np.float32))
    _save(root / "b_flat" / "T1.nii.gz", rng.random((8, 9)))  # a 2D file where 3D is expected
    nan = rng.random((8, 9, 10))
    nan[1, 2, 3] = np.nan
    _save(root / "c_nan" / "T1.nii.gz", nan)
    _save(root / "d_grid" / "T1.nii.gz", rng.random((8, 9, 10)))
    _save(root / "d_grid" / "FLAIR.nii.gz", rng.random((8, 9, 12)))
    return root


def test_skip_bad_lists_every_problem_with_its_file(tmp_path):
    (report,) = inspect_path(_cohort(tmp_path / "cohort"), skip_bad=True, progress=False)
    assert report.ndim == 3
    assert sum(report.splits.values()) == 6
    assert report.modalities == {"FLAIR": 4, "T1": 6} or report.modalities == {"T1": 6, "FLAIR": 4}
    assert report.shapes[(8, 9, 10)] == 3
    problems = {p.study: p for p in report.problems}
    assert set(problems) == {"b_flat", "c_nan", "d_grid"}
    assert problems["b_flat"].where.endswith("b_flat/T1.nii.gz") and "2D" in problems["b_flat"].problem
    assert "NaN/Inf" in problems["c_nan"].problem
    assert "different grids" in problems["d_grid"].problem
    text = report.format()
    assert "problems (3)" in text and "c_nan/T1.nii.gz" in text


def test_without_skip_bad_the_first_problem_stops_inspection(tmp_path):
    with pytest.raises(DataError, match=r"b_flat/T1\.nii\.gz: modality 'T1' is 2D .* this collection is 3D"):
        inspect_path(_cohort(tmp_path / "cohort"), progress=False)


def test_cli_inspect_writes_report_and_exit_codes(tmp_path, capsys):
    root = _cohort(tmp_path / "cohort")
    assert main(["data", "inspect", str(root), "-q"]) == 2
    assert "b_flat/T1.nii.gz" in capsys.readouterr().err
    assert main(["data", "inspect", str(root), "-q", "--skip-bad", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "6 studies" in out and "problems (3)" in out
    saved = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert len(saved[0]["problems"]) == 3


@pytest.mark.skipif(not SHARED.exists(), reason="shared MedMNIST files not present")
def test_inspect_real_medmnist_folder():
    reports = {r.name: r for r in inspect_path(SHARED, progress=False)}
    assert reports["breastmnist"].splits == {"train": 546, "val": 78, "test": 156}
    assert reports["adrenalmnist3d"].shapes == {(28, 28, 28): 1584}
    assert sum(reports["pneumoniamnist"].labels["label"].values()) == 5856
    assert all(not r.problems for r in reports.values())
