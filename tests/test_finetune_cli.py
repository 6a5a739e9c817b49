"""`medformer finetune` / `evaluate` end to end on a tiny budget (real BreastMNIST, and the brain cohort)."""

import json
from pathlib import Path

import pytest

from medformer.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
TINY = [
    "--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=2",
    "--set", "train.steps=12", "--set", "train.batch_size=32", "--set", "train.eval_every=6",
    "--set", "train.progress=false", "--set", "train.lr=1e-3",
]  # fmt: skip


@pytest.mark.skipif(not SHARED.exists(), reason="shared MedMNIST files not present")
def test_finetune_then_evaluate_reproduces_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(SHARED))
    out = tmp_path / "run"
    args = ["finetune", "--set", "data=[{path: breastmnist}]", "--output", str(out), "--device", "cpu", *TINY]
    assert main([*args, "--label-fraction", "0.2", "--label-seed", "1"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"val", "test"}
    assert 0 <= results["test"]["breastmnist/label/auc"] <= 1
    for name in ("report.md", "report.html", "metrics.jsonl", "config.yaml"):
        assert (out / name).exists()
    assert (out / "best" / "model.safetensors").exists()
    html = (out / "report.html").read_text()
    assert "breastmnist/label" in html and "data:image/png;base64" in html
    # evaluate scores the same saved model on the same data: identical numbers
    assert main(["evaluate", "--run", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["results"]
    assert again == results
    # the label fraction reached the run: 20% of 546 training studies, stratified
    assert (
        "finetune:\n  mode: full\n  layer_decay: 0.75\n  label_fraction: 0.2"
        in (out / "config.yaml").read_text()
    )
    # a second run into the same folder is refused unless resumed
    assert main(args) == 2
    assert "resume" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.exists(), reason="shared MedMNIST files not present")
def test_resnet_baseline_through_the_same_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(SHARED))
    out = tmp_path / "resnet"
    steps = ["--set", "train.steps=3", "--set", "train.batch_size=16", "--set", "train.progress=false"]
    argv = ["finetune", "--set", "data=[{path: breastmnist}]", "--set", "model.arch=resnet18", *steps]
    assert main([*argv, "--output", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert "breastmnist/label/acc" in results["test"]


def test_segmentation_on_the_brain_cohort(tmp_path):
    from medformer.data.phantom import PhantomConfig, write_cohort

    manifest = write_cohort(
        tmp_path / "cohort",
        PhantomConfig(n_subjects=6, voxel_size_mm=6.0, shape=(16, 16, 16)),
        progress=False,
    )
    out = tmp_path / "seg"
    argv = ["finetune", "--set", f"data=[{{path: {manifest}}}]", "--set", "preprocess.crop_foreground=false"]
    argv += ["--set", "finetune.tasks=[tumour, enhancing]", "--set", "eval.batch_size=2", *TINY]
    assert main([*argv, "--set", "train.batch_size=2", "--output", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert "brain_phantom/tumour/dice_mean" in results["val"]
    assert "brain_phantom/enhancing/auc" in results["val"]
    assert not any(k.startswith("brain_phantom/survival") for k in results["val"])
    # test-time adaptation as an evaluation option: its own report, the saved model untouched
    saved = (out / "model" / "model.safetensors").read_bytes()
    assert main(["evaluate", "--run", str(out), "--tent", "--device", "cpu"]) == 0
    adapted = json.loads((out / "tent" / "results.json").read_text())
    assert set(adapted["results"]["test"]) == set(
        json.loads((out / "results.json").read_text())["results"]["test"]
    )
    assert "TENT" in (out / "tent" / "report.md").read_text()
    assert (out / "model" / "model.safetensors").read_bytes() == saved


@pytest.mark.skipif(not SHARED.exists(), reason="shared MedMNIST files not present")
def test_same_command_under_torchrun_with_two_processes(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    cmd += ["-m", "medformer", "finetune", "--set", "data=[{path: breastmnist}]", "--output", str(out), *TINY]
    cmd += ["--set", "train.steps=4", "--device", "cpu"]
    env = {**os.environ, "MEDMNIST_ROOT": str(SHARED), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["results"]["test"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # one log stream (rank 0), not two


def test_skip_bad_trains_past_a_broken_study_and_reports_it(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from medformer.data.phantom import PhantomConfig, write_cohort

    manifest = write_cohort(
        tmp_path / "cohort",
        PhantomConfig(n_subjects=6, voxel_size_mm=6.0, shape=(16, 16, 16)),
        progress=False,
    )
    victim = sorted((tmp_path / "cohort").glob("sub-*/T1w.nii.gz"))[0]
    img = nib.load(victim)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), victim)
    out = tmp_path / "run"
    argv = ["finetune", "--set", f"data=[{{path: {manifest}}}]", "--set", "finetune.tasks=[enhancing]"]
    argv += ["--set", "preprocess.crop_foreground=false", *TINY, "--set", "train.steps=2", "--device", "cpu"]
    assert main([*argv, "--output", str(out)]) == 2  # without --skip-bad: one clear error naming the file
    assert str(victim) in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "run2"), "--set", "data.0.skip_bad=true"]) == 0
    assert "skipped bad study" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run2" / "results.json").read_text())["summary"]
    assert victim.parent.name in summary["skipped studies"] and "NaN" in summary["skipped studies"]
