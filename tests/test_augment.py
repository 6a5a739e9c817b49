"""Batch augmentation: exact flips, masks that follow the warp, absent modalities left empty."""

import pytest
import torch

from medformer.config import AugmentConfig, build_config
from medformer.data.augment import Augment, gaussian_blur, random_affine, warp
from medformer.errors import ConfigError
from medformer.finetune import FinetuneConfig


def _batch(spatial: tuple[int, ...], b: int = 4, m: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, m, *spatial, generator=g)
    present = torch.ones(b, m, dtype=torch.bool)
    present[1, 1] = False
    images[1, 1] = 0
    mask = (images[:, 0] > 0.5).long()
    return {"images": images, "present": present, "labels": {"seg": mask, "cls": torch.arange(b)}}


@pytest.mark.parametrize("spatial", [(12, 10), (6, 8, 10)])
def test_flip_probability_one_flips_every_axis_exactly(spatial):
    batch = _batch(spatial)
    out = Augment(AugmentConfig(flip=1.0))(batch)
    dims = tuple(range(2, 2 + len(spatial)))
    assert torch.allclose(out["images"], batch["images"].flip(dims), atol=1e-5)
    assert torch.equal(out["labels"]["seg"], batch["labels"]["seg"].flip(tuple(d - 1 for d in dims)))
    assert torch.equal(out["labels"]["cls"], batch["labels"]["cls"])  # non-spatial labels untouched


def test_flip_axes_minus_one_is_left_right_only():
    batch = _batch((8, 8))
    out = Augment(AugmentConfig(flip=1.0, flip_axes=[-1]))(batch)
    assert torch.allclose(out["images"], batch["images"].flip(3), atol=1e-5)


def test_inactive_config_returns_the_batch_unchanged_and_input_is_not_modified():
    batch = _batch((8, 8))
    before = batch["images"].clone()
    assert torch.equal(Augment()(batch)["images"], before)
    Augment(AugmentConfig(rotate=30, noise=0.2))(batch)
    assert torch.equal(batch["images"], before)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_segmentation_masks_follow_the_spatial_warp(spatial):
    torch.manual_seed(1)
    mask = torch.zeros(3, *spatial, dtype=torch.long)
    sl = tuple(slice(s // 4, 3 * s // 4) for s in spatial)
    mask[(slice(None), *sl)] = 1
    batch = {"images": mask[:, None].float(), "present": torch.ones(3, 1, dtype=torch.bool),
             "labels": {"seg": mask}}  # fmt: skip
    out = Augment(AugmentConfig(rotate=30, zoom=0.2, shift=0.1, flip=0.5))(batch)
    agree = ((out["images"][:, 0] > 0.5).long() == out["labels"]["seg"]).float().mean()
    assert agree > 0.97
    assert not torch.equal(out["labels"]["seg"], mask)  # something moved


def test_absent_modalities_stay_zero_under_intensity_changes():
    out = Augment(AugmentConfig(intensity_shift=0.5, noise=0.1, rotate=10))(_batch((8, 8)))
    assert out["images"][1, 1].abs().max() == 0
    assert out["images"][0, 1].abs().max() > 0


def test_same_seed_same_draws():
    aug = Augment(AugmentConfig(rotate=20, zoom=0.1, noise=0.1, gamma=0.2, blur=1.0))
    torch.manual_seed(3)
    a = aug(_batch((10, 10)))["images"]
    torch.manual_seed(3)
    b = aug(_batch((10, 10)))["images"]
    assert torch.equal(a, b)


def test_identity_affine_warp_is_lossless():
    x = torch.rand(2, 1, 9, 7)
    theta = random_affine(AugmentConfig(), 2, 2, x.device)
    assert torch.allclose(warp(x, theta, "bilinear"), x, atol=1e-5)


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    const = torch.full((2, 1, 12, 12, 12), 3.0)
    assert torch.allclose(gaussian_blur(const, torch.tensor([1.0, 2.0])), const, atol=1e-5)
    noise = torch.randn(2, 1, 32, 32)
    blurred = gaussian_blur(noise, torch.tensor([0.0, 2.0]))
    assert torch.allclose(blurred[0], noise[0], atol=1e-5)  # sigma 0: unchanged
    assert blurred[1].std() < 0.5 * noise[1].std()


def test_augment_is_part_of_the_finetune_config():
    cfg = build_config(FinetuneConfig, {"augment": {"flip": 0.5, "rotate": 10}}, "test")
    assert cfg.augment.flip == 0.5 and cfg.augment.spatial
    with pytest.raises(ConfigError, match="rotate"):
        build_config(FinetuneConfig, {"augment": {"rotat": 10}}, "test")
