"""Medformer checkpoints: save/load round trip, growing a trained model, strict and non-strict loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import medformer
from medformer.data.study import TaskSpec
from medformer.models import CheckpointError, Medformer, MedformerConfig


def small_model(tasks: list[TaskSpec], seed: int = 0) -> Medformer:
    torch.manual_seed(seed)
    config = MedformerConfig(dim=32, depth=2, heads=2, patch_size_2d=4, patch_size_3d=4, dense_channels=4)
    model = Medformer(config, modalities=["T1", "T2"])
    model.add_collection("brain", ndim=3)
    for spec in tasks:
        model.add_task(spec, collection="brain")
    return model.eval()


GRADE = TaskSpec("grade", "multiclass", 3)
SEG = TaskSpec("tumour", "segmentation", 4)
AGE = TaskSpec("age", "regression", 1)


def outputs(
    model: Medformer, images: torch.Tensor, tasks: list[str] | None = None
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(images, ["T1", "T2"], collection="brain", tasks=tasks)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 2, 8, 8, 8)


def test_save_load_round_trip(tmp_path: Path, images: torch.Tensor) -> None:
    model = small_model([GRADE, SEG])
    model.save(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["medformer_version"] == medformer.__version__
    assert meta["architecture"]["dim"] == 32
    assert meta["modalities"] == ["T1", "T2"]
    assert meta["collections"] == {"brain": {"ndim": 3}}
    assert meta["tasks"]["brain/tumour"]["spec"]["kind"] == "segmentation"

    loaded = Medformer.from_pretrained(tmp_path).eval()
    assert loaded.load_report.exact
    assert list(loaded.tasks) == list(model.tasks)
    before, after = outputs(model, images), outputs(loaded, images)
    for key in before:
        assert torch.equal(before[key], after[key])


def test_adding_a_task_keeps_old_outputs(tmp_path: Path, images: torch.Tensor) -> None:
    model = small_model([GRADE])
    model.save(tmp_path)
    grown = Medformer.from_pretrained(tmp_path).eval()
    grown.add_collection("other", ndim=2)
    grown.add_modality("FLAIR")
    grown.add_task(AGE, collection="brain")
    assert set(outputs(grown, images)) == {"brain/grade", "brain/age"}
    torch.testing.assert_close(outputs(grown, images)["brain/grade"], outputs(model, images)["brain/grade"])


def test_strict_load_names_missing_and_extra_heads(tmp_path: Path) -> None:
    small_model([GRADE, SEG]).save(tmp_path)
    target = small_model([GRADE, AGE], seed=1)
    with pytest.raises(CheckpointError) as err:
        target.load_pretrained(tmp_path, strict=True)
    message = str(err.value)
    assert "task 'brain/age'" in message and "freshly initialised" in message
    assert "task 'brain/tumour'" in message and "skipped" in message
    assert "strict=False" in message


def test_non_strict_load_reports_what_it_did(tmp_path: Path, images: torch.Tensor, caplog) -> None:
    source = small_model([GRADE, SEG])
    source.save(tmp_path)
    target = small_model([GRADE, AGE], seed=1)
    age_before = target.heads["brain/age"].out.weight.clone()
    with caplog.at_level(logging.WARNING, logger="medformer.models.medformer"):
        report = target.load_pretrained(tmp_path, strict=False)
    assert report.added == ["task 'brain/age'"]
    assert report.skipped == ["task 'brain/tumour'"]
    assert "brain/age" in caplog.text and "brain/tumour" in caplog.text
    assert torch.equal(target.heads["brain/age"].out.weight, age_before)  # new head untouched
    torch.testing.assert_close(
        outputs(target, images, ["brain/grade"]), outputs(source, images, ["brain/grade"])
    )


def test_from_pretrained_strict_on_inconsistent_files(tmp_path: Path) -> None:
    small_model([GRADE, SEG]).save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["tasks"]["brain/tumour"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="brain/tumour"):
        Medformer.from_pretrained(tmp_path)
    model = Medformer.from_pretrained(tmp_path, strict=False)
    assert model.load_report.skipped == ["task 'brain/tumour'"]


def test_architecture_mismatch_and_bad_directory(tmp_path: Path) -> None:
    small_model([GRADE]).save(tmp_path)
    other = Medformer(MedformerConfig(dim=64, depth=2, heads=2), modalities=["T1", "T2"])
    with pytest.raises(CheckpointError, match="dim: checkpoint 32, model 64"):
        other.load_pretrained(tmp_path, strict=False)
    with pytest.raises(CheckpointError, match="no Medformer config"):
        Medformer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="architecture"):
        Medformer.from_pretrained(tmp_path, dim=64)
    model = Medformer.from_pretrained(tmp_path, drop_path=0.1, checkpointing=True)
    assert model.config.checkpointing and model.body.checkpointing


def test_remove_task_then_load_strict_is_explicit(tmp_path: Path) -> None:
    model = small_model([GRADE, SEG])
    model.save(tmp_path)
    finetune = Medformer.from_pretrained(tmp_path)
    finetune.remove_task("brain/tumour")
    finetune.add_task(AGE, collection="brain")
    assert sorted(finetune.tasks) == ["brain/age", "brain/grade"]
    report = finetune.load_pretrained(tmp_path, strict=False)
    assert report.added == ["task 'brain/age'"] and report.skipped == ["task 'brain/tumour'"]
