"""CNN baselines: the same batch in and the same {task key: output} dict out as Medformer."""

from __future__ import annotations

import pytest
import torch

from medformer.data.study import TaskSpec
from medformer.models import Medformer, MedformerConfig, ResNetBaseline, UNetBaseline

CLASSIFY = [
    TaskSpec("label", "multiclass", 4),
    TaskSpec("finding", "binary"),
    TaskSpec("grade", "ordinal", 5),
]


def batch(ndim: int, size: int, modalities: tuple[str, ...] = ("T1", "T2")) -> dict:
    return {
        "images": torch.randn(2, len(modalities), *[size] * ndim),
        "present": torch.tensor([[True] * len(modalities), [True] + [False] * (len(modalities) - 1)]),
        "modalities": modalities,
        "collection": "demo",
        "ndim": ndim,
    }


def medformer_keys(tasks: list[TaskSpec], ndim: int) -> dict[str, torch.Size]:
    model = Medformer(MedformerConfig(dim=32, depth=1, heads=2, patch_size_3d=4), modalities=["T1", "T2"])
    model.add_collection("demo", ndim=ndim)
    for spec in tasks:
        model.add_task(spec, collection="demo")
    with torch.no_grad():
        return {k: v.shape for k, v in model.eval()(batch(ndim, 12)).items()}


@pytest.mark.parametrize(
    ("ndim", "depth", "stem", "size"),
    [(2, 18, "medmnist", 28), (2, 50, "imagenet", 32), (3, 18, "medmnist", 12)],
)
def test_resnet_same_dict_as_medformer(ndim: int, depth: int, stem: str, size: int) -> None:
    model = ResNetBaseline(ndim, ["T1", "T2"], CLASSIFY, depth=depth, stem=stem, collection="demo").eval()
    with torch.no_grad():
        out = model(batch(ndim, size))
    assert {k: v.shape for k, v in out.items()} == medformer_keys(CLASSIFY, ndim)


def test_resnet_stem_default_is_medmnist() -> None:
    model = ResNetBaseline(2, ["T1"], CLASSIFY[:1])
    conv1 = model.backbone.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and model.backbone.no_max_pool


def test_resnet_modality_order_and_absent_channels() -> None:
    model = ResNetBaseline(2, ["T1", "T2"], CLASSIFY[:1]).eval()
    b = batch(2, 16)
    swapped = {
        **b,
        "images": b["images"].flip(1),
        "present": b["present"].flip(1),
        "modalities": ("T2", "T1"),
    }
    noisy = {**b, "images": b["images"].clone()}
    noisy["images"][1, 1] = 1e3  # absent in sample 1
    with torch.no_grad():
        ref = model(b)["label"]
        torch.testing.assert_close(model(swapped)["label"], ref)
        torch.testing.assert_close(model(noisy)["label"], ref)


def test_unet_segments_with_padding() -> None:
    tasks = [TaskSpec("tumour", "segmentation", 4), TaskSpec("organ", "segmentation", 2)]
    model = UNetBaseline(
        ["T1", "T2"], tasks, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, collection="demo"
    )
    with torch.no_grad():
        out = model.eval()(batch(3, 13))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "demo/tumour": (2, 4, 13, 13, 13),
        "demo/organ": (2, 2, 13, 13, 13),
    }
    assert medformer_keys(tasks, 3).keys() == out.keys()


def test_baselines_reject_wrong_task_kinds() -> None:
    with pytest.raises(ValueError, match="UNetBaseline"):
        ResNetBaseline(3, ["CT"], [TaskSpec("seg", "segmentation", 2)])
    with pytest.raises(ValueError, match="ResNetBaseline"):
        UNetBaseline(["CT"], [TaskSpec("label", "binary")])
