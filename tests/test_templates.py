"""Modality templates: placement through preprocessing, cropping, filling, channel mixing, saving, export."""

import nibabel as nib
import numpy as np
import pytest
import torch

from medformer.cli import main
from medformer.config import PreprocessConfig, build_config
from medformer.data.cache import PreprocessCache
from medformer.data.dataset import CollectionDataset, collate
from medformer.data.study import Collection, Study, TaskSpec
from medformer.data.transforms import Preprocessor, Volume
from medformer.errors import ConfigError
from medformer.finetune import FinetuneConfig
from medformer.models import Medformer, MedformerConfig
from medformer.models.templates import (
    ModalityTemplates,
    Placement,
    TemplateMix,
    export_templates,
    templates_for_finetuning,
    window,
)

MODS = ("T1", "T2", "FLAIR")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**templates) -> Medformer:
    torch.manual_seed(0)
    model = Medformer(MedformerConfig(dim=32, depth=1, heads=2, patch_size_3d=4), modalities=MODS)
    model.add_collection("c", ndim=3)
    model.add_task(TaskSpec("grade", "binary"), collection="c")
    if templates:
        model.add_templates(**templates)
    return model


def test_window_cuts_at_the_origin_and_pads_zeros_outside():
    vol = torch.arange(6 * 5 * 4, dtype=torch.float32).view(6, 5, 4) + 1
    origin = torch.tensor([[1, 2, 0], [-2, 3, 2]])
    out = window(vol, origin, (3, 2, 3))
    assert torch.equal(out[0], vol[1:4, 2:4, 0:3])
    # second window: rows -2, -1 and column 4 lie outside the volume
    assert torch.equal(out[1, 2:, :, :2], vol[0:1, 3:5, 2:4])
    assert (out[1, :2] == 0).all() and (out[1, :, :, 2] == 0).all()


def test_preprocessing_records_where_the_output_sits():
    rng = np.random.default_rng(0)
    grid = np.zeros((30, 26, 20), np.float32)  # (x, y, z) as in a file
    grid[6:24, 0:16, 3:15] = rng.random((18, 16, 12)) + 1
    cfg = PreprocessConfig(intensity="none", size=[10, 20, 12])  # (x, y, z): crop x by 8, pad y by 4
    out, _, meta = Preprocessor(cfg)({"T1": Volume(grid, np.eye(4), "t1")})
    zyx = grid.transpose(2, 1, 0)
    assert meta["grid"] == list(zyx.shape)
    assert meta["foreground"] == [[3, 0, 6], [15, 16, 24]]
    o = np.array(meta["origin"])
    assert o.tolist() == [3, -2, 10]  # (z, y, x): centred crop of x starts 4 in, y padded by 2 before
    # every output voxel inside the grid is the grid's voxel at origin + index
    idx = np.indices(out["T1"].shape).reshape(3, -1).T
    src = idx + o
    inside = ((src >= 0) & (src < np.array(zyx.shape))).all(1)
    np.testing.assert_array_equal(out["T1"][tuple(idx[inside].T)], zyx[tuple(src[inside].T)])
    # 2D (no reorientation): the same record, in the image's own axis order
    image = grid[:, :, 8]
    out, _, meta = Preprocessor(PreprocessConfig(intensity="none", size=[16, 20]))(
        {"x": Volume(image, np.eye(3), "x")}
    )
    assert meta["origin"] == [7, -2] and meta["grid"] == [30, 26]
    np.testing.assert_array_equal(out["x"][:, 2:18], image[7:23, 0:16])


def test_template_crop_follows_a_known_offset_through_cache_and_batch(tmp_path):
    """A study that is the atlas shifted by (5, 3, 7) voxels: after foreground crop and pad/crop, the
    template cut at the batch's origin ("box" alignment) is exactly the preprocessed study."""
    rng = np.random.default_rng(1)
    atlas_xyz = (rng.random((14, 12, 10)) + 0.5).astype(np.float32)
    offset = (5, 3, 7)
    big = np.zeros((32, 24, 28), np.float32)
    big[tuple(slice(o, o + n) for o, n in zip(offset, atlas_xyz.shape))] = atlas_xyz
    path = tmp_path / "s1" / "T1.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(big, np.eye(4)), path)
    collection = Collection("c", 3, ["T1"], [Study("s1", sources={"T1": path})])
    cache = PreprocessCache(
        tmp_path / "cache", Preprocessor(PreprocessConfig(intensity="none", size=[8, 16, 12]))
    )
    batch = collate([CollectionDataset(collection, None, load=cache)[0]])
    assert batch["origin"].shape == (1, 3) and batch["foreground"].shape == (1, 2, 3)

    assert batch["grid"].tolist() == [list(big.shape[::-1])]
    templates = ModalityTemplates(atlas_xyz.shape[::-1], ["T1"], align="box")
    templates.set("T1", torch.from_numpy(atlas_xyz.transpose(2, 1, 0).copy()))
    crop = templates.crop(["T1"], templates.origin(batch), batch["images"].shape[2:])
    image = batch["images"][0, 0]
    inside = image > 0  # the pad/crop also padded: there the template is cut outside its grid (zeros)
    assert inside.sum() > 100
    torch.testing.assert_close(crop[0][inside], image[inside])
    assert (crop[0][~inside] == 0).all()
    # "grid" alignment with a reference grid of the study grid's shape: the same voxel
    whole = ModalityTemplates(big.shape[::-1], ["T1"], align="grid")
    whole.set("T1", torch.from_numpy(big.transpose(2, 1, 0).copy()))
    crop = whole.crop(["T1"], whole.origin(batch), batch["images"].shape[2:])
    torch.testing.assert_close(crop[0], image)


def test_reference_origin_centres_the_grid_or_the_foreground_box():
    placement = Placement(
        origin=torch.tensor([[2, 0, -1]]),
        grid=torch.tensor([[20, 12, 16]]),
        foreground=torch.tensor([[[2, 1, 0], [12, 9, 6]]]),  # a 10 x 8 x 6 box
    )
    # grid: (16 - grid) // 2 = (-2, 2, 0) added to the origin
    assert placement.reference_origin((16, 16, 16), "grid").tolist() == [[0, 2, -1]]
    # box: its start goes to (16 - size) // 2 = (3, 4, 5); the array starts (0, -1, -1) from the box start
    assert placement.reference_origin((16, 16, 16), "box").tolist() == [[3, 3, 4]]
    moved = placement.shifted(torch.tensor([[1, 2, 3]]))  # a crop's corner moves the origin along
    assert moved.reference_origin((20, 12, 16), "grid").tolist() == [[3, 2, 2]]


def batch_with_missing() -> dict:
    torch.manual_seed(0)
    present = torch.tensor([[True, False, True], [True, True, True], [False, True, False]])
    images = torch.rand(3, 3, 8, 8, 8) * present[..., None, None, None]
    return {"images": images, "present": present, "modalities": MODS, "collection": "c"}


def test_fill_puts_templates_into_missing_modalities_only():
    templates = ModalityTemplates((8, 8, 8), MODS, align="grid")
    for i, m in enumerate(MODS):
        templates.set(m, torch.tensor(10.0 + i))
    batch = batch_with_missing()
    filled = templates.fill(batch)
    assert filled["present"].all()
    assert (filled["images"][0, 1] == 11.0).all() and (filled["images"][2, 0] == 10.0).all()
    kept = batch["present"]
    assert torch.equal(filled["images"][kept], batch["images"][kept])
    assert not filled["images"].requires_grad


def test_template_mix_replaces_at_most_k_and_keeps_one_real_modality():
    templates = ModalityTemplates((8, 8, 8), MODS, align="grid")
    for m in MODS:
        templates.set(m, torch.tensor(-1.0))  # images are in [0, 1): -1 marks a template
    torch.manual_seed(0)
    batch = {**batch_with_missing(), "present": torch.ones(3, 3, dtype=torch.bool)}
    batch["images"] = torch.rand(3, 3, 8, 8, 8)
    counts = []
    for _ in range(200):
        out = TemplateMix(templates, max_mix=2)(batch)
        replaced = (out["images"] == -1).flatten(2).all(2)
        assert out["present"].all()
        assert (replaced.sum(1) <= 2).all() and (~replaced).any(1).all()
        counts += replaced.sum(1).tolist()
    assert set(counts) == {0, 1, 2}  # 0..k drawn
    assert TemplateMix(templates, max_mix=0)(batch)["images"] is batch["images"]


def test_templates_are_saved_loaded_and_fill_at_inference(tmp_path):
    model = tiny_model(shape=(8, 8, 8), align="grid", fill_missing=True)
    with torch.no_grad():
        model.templates.volumes["T2"].uniform_()
    model.add_modality("ADC")
    assert "ADC" in model.templates.modalities  # every modality has a template
    model.save(tmp_path / "m")
    loaded = Medformer.from_pretrained(tmp_path / "m")
    assert loaded.templates.describe() == model.templates.describe()
    torch.testing.assert_close(loaded.templates.volumes["T2"], model.templates.volumes["T2"])

    loaded.eval()
    batch = batch_with_missing()
    with torch.no_grad():
        auto = loaded(batch)  # fill_missing was saved: missing modalities come from the templates
        loaded.templates.fill_missing = False
        explicit = loaded(loaded.templates.fill(batch))
        plain = loaded(batch)
    torch.testing.assert_close(auto["c/grade"], explicit["c/grade"])
    assert not torch.allclose(auto["c/grade"], plain["c/grade"])


def test_export_writes_nifti_and_png_and_the_command_works(tmp_path, capsys):
    templates = ModalityTemplates((6, 5, 4), ["T1", "T2"])
    templates.set("T1", torch.arange(120, dtype=torch.float32).view(6, 5, 4))
    paths = export_templates(templates, tmp_path / "out", spacing=(2.0, 2.0, 2.0))
    names = sorted(p.name for p in paths)
    assert names == ["T1.nii.gz", "T2.nii.gz", "templates.png"]
    img = nib.load(tmp_path / "out" / "T1.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), templates.arrays()["T1"])
    assert np.allclose(np.diag(img.affine)[:3], 2.0)

    model = tiny_model(shape=(6, 5, 4))
    model.save(tmp_path / "model")
    assert (
        main(["templates", "export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "x")])
        == 0
    )
    assert (tmp_path / "x" / "FLAIR.nii.gz").is_file() and (tmp_path / "x" / "templates.png").is_file()
    tiny_model().save(tmp_path / "plain")
    capsys.readouterr()
    assert main(["templates", "export", "--model", str(tmp_path / "plain")]) == 2
    assert "no modality templates" in capsys.readouterr().err


def test_finetuning_fills_mixes_and_refuses_a_model_without_templates():
    cfg = build_config(FinetuneConfig, {"templates": {"fill_missing": True, "mix": 2}})
    assert (cfg.templates.fill_missing, cfg.templates.mix) == (True, 2)
    model = tiny_model(shape=(8, 8, 8), align="grid")
    for m in MODS:
        model.templates.set(m, torch.tensor(-1.0))
    seen = []
    transform = templates_for_finetuning(
        model, fill_missing=True, mix=1, augment=lambda b: seen.append(b) or b
    )
    assert model.templates.fill_missing  # saved with the fine-tuned model: inference fills too
    batch = batch_with_missing()
    out = transform(batch)
    assert out["present"].all() and seen and seen[0] is out
    assert (out["images"][~batch["present"]] == -1).all()  # the missing ones: templates
    assert ((out["images"] == -1).flatten(2).all(2) & batch["present"]).sum() <= 3  # mixing: <= 1 each
    assert templates_for_finetuning(tiny_model(), False, 0) is None
    with pytest.raises(ConfigError, match="brainmvp"):
        templates_for_finetuning(tiny_model(), True, 0)


def test_invalid_settings_are_clear_errors():
    with pytest.raises(ValueError, match="align"):
        ModalityTemplates((4, 4, 4), align="middle")
    with pytest.raises(KeyError, match="no template"):
        ModalityTemplates((4, 4, 4), ["T1"]).crop(["T2"], torch.zeros(1, 3, dtype=torch.long), (4, 4, 4))
