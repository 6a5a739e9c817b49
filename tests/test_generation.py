"""Cross-modal generation: translators, filling missing modalities (pretext only), `medformer generate`."""

from __future__ import annotations

import json
from pathlib import Path

import monai.networks.nets  # noqa: F401  (MONAI's import takes seconds: paid at collection, not in a test)
import numpy as np
import pytest
import torch
import yaml

from medformer.cli import main
from medformer.errors import ConfigError
from medformer.generate import ModalityFiller, Translator, fill_missing, strip_synthetic
from medformer.generate.train import GenerateConfig, image_quality, psnr, random_crop, run_generate, ssim
from medformer.pretext.puzzle import JigsawPuzzle

pytestmark = pytest.mark.usefixtures("one_thread")


def small(source: str = "a", target: str = "b", ndim: int = 2) -> Translator:
    return Translator(source, target, ndim, channels=(4, 8), strides=(2,), num_res_units=0)


def test_translator_keeps_any_size_and_saves_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    t = small().eval()
    x = torch.rand(2, 1, 13, 17)
    y = t(x)
    assert y.shape == x.shape
    t.info["note"] = "kept"
    loaded = Translator.from_pretrained(t.save(tmp_path / "tr"))
    torch.testing.assert_close(loaded(x), y)
    assert (loaded.source, loaded.target, loaded.ndim, loaded.info["note"]) == ("a", "b", 2, "kept")
    assert small(ndim=3)(torch.rand(1, 1, 6, 9, 5)).shape == (1, 1, 6, 9, 5)
    with pytest.raises(ConfigError, match="not a translator folder"):
        Translator.from_pretrained(tmp_path)


def test_fill_missing_synthesises_only_what_is_missing_and_never_marks_it_present() -> None:
    torch.manual_seed(0)
    translator = small().eval()
    filler = ModalityFiller([translator])
    images = torch.rand(3, 2, 8, 8)
    images[0, 1] = 0.0  # absent modalities are zeros in a batch
    images[2, 0] = 0.0
    present = torch.tensor([[True, False], [True, True], [False, True]])
    batch = {"images": images, "present": present, "modalities": ("a", "b"), "collection": "c"}
    out = fill_missing(batch, filler)
    assert torch.equal(out["present"], present)  # untouched: downstream code reads `present`
    assert out["synthetic"].tolist() == [[False, True], [False, False], [False, False]]
    with torch.no_grad():
        expected = translator(images[0:1, 0:1])[0, 0]
    torch.testing.assert_close(out["images"][0, 1], expected)
    torch.testing.assert_close(out["images"][1:], images[1:])  # real images unchanged
    assert batch["images"][0, 1].eq(0).all()  # the caller's batch is not modified
    assert not any(p.requires_grad for p in filler.parameters())
    # the synthetic image can be taken out again: what downstream code must see
    stripped = strip_synthetic(out)
    assert "synthetic" not in stripped and stripped["images"][0, 1].eq(0).all()
    torch.testing.assert_close(stripped["images"][1], images[1])


def test_fill_missing_tries_translators_in_order_and_skips_other_dimensionalities() -> None:
    filler = ModalityFiller([small("a", "c"), small("b", "c")])
    images = torch.rand(2, 3, 8, 8)
    present = torch.tensor([[False, True, False], [True, True, False]])
    out = fill_missing({"images": images, "present": present, "modalities": ("a", "b", "c")}, filler)
    assert out["synthetic"][:, 2].all()  # sample 0 from b (no a), sample 1 from a
    with torch.no_grad():
        torch.testing.assert_close(out["images"][0, 2], filler.translators["b_to_c"](images[0:1, 1:2])[0, 0])
        torch.testing.assert_close(out["images"][1, 2], filler.translators["a_to_c"](images[1:2, 0:1])[0, 0])
    volume = {"images": torch.rand(1, 3, 4, 4, 4), "present": present[:1], "modalities": ("a", "b", "c")}
    with pytest.raises(ValueError, match="2D, the batch is 3D"):
        fill_missing(volume, filler)
    with pytest.raises(ValueError, match="two translators"):
        ModalityFiller([small(), small()])


def test_puzzle_tiles_from_synthetic_modalities_only_when_allowed() -> None:
    torch.manual_seed(0)
    filler = ModalityFiller([small()])
    batch = {
        "images": torch.rand(4, 2, 12, 12),
        "present": torch.tensor([[True, False]] * 4),
        "modalities": ("a", "b"),
        "collection": "c",
    }
    puzzles = JigsawPuzzle(grid_2d=4, synthetic=True, filler=filler).views(batch)["puzzles"]
    assert puzzles.modality.eq(1).any()  # b exists only as a synthetic image
    assert torch.equal(puzzles.synthetic, puzzles.modality.eq(1))
    assert (
        JigsawPuzzle(grid_2d=4, synthetic=False, filler=filler).views(batch)["puzzles"].modality.eq(0).all()
    )


def test_image_quality_measures() -> None:
    target = torch.rand(2, 1, 16, 16)
    assert psnr(target + 0.1, target).allclose(torch.full((2,), 20.0), atol=1e-3)  # MSE 0.01 -> 20 dB
    assert ssim(target, target).allclose(torch.ones(2), atol=1e-5)
    assert (ssim(torch.rand(2, 1, 16, 16), target) < 0.5).all()
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., :8] = True
    pred = target.clone()
    pred[..., 8:] += 0.5  # errors only outside the mask
    assert psnr(pred, target, mask=mask).min() > 100
    q = image_quality(target + 0.1, target)
    assert set(q) == {"psnr", "ssim", "mae", "psnr_foreground"} and q["mae"].allclose(torch.full((2,), 0.1))


def test_random_crop_pads_small_images() -> None:
    images = torch.rand(3, 2, 10, 20)
    crops = random_crop(images, [8, 8], torch.Generator().manual_seed(0))
    assert crops.shape == (3, 2, 8, 8)
    assert random_crop(images, [12, 8]).shape == (3, 2, 12, 8)
    assert random_crop(images, None) is images
    with pytest.raises(ConfigError, match="patch_size"):
        random_crop(images, [8, 8, 8])


def write_pairs(root: Path, n: int = 12) -> Path:
    """A toy collection with a known mapping: b = 1 - a on smooth random 2D images (and two studies
    without b)."""
    rng = np.random.default_rng(0)
    rows = ["id,split,image:a,image:b"]
    for i in range(n):
        a = rng.random((4, 4))
        a = np.kron(a, np.ones((4, 4)))  # 16x16, blocky
        np.save(root / f"s{i}_a.npy", a.astype(np.float32))
        np.save(root / f"s{i}_b.npy", (1.0 - a).astype(np.float32))
        split = "train" if i < n - 4 else "val" if i < n - 2 else "test"
        b = f"s{i}_b.npy" if i not in (0, 1) else ""
        rows.append(f"s{i},{split},s{i}_a.npy,{b}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def generate_config(tmp_path: Path, mode: str, steps: int) -> dict:
    return {
        "data": [{"path": str(write_pairs(tmp_path))}],
        "preprocess": {"crop_foreground": False, "intensity": "none"},
        "output": str(tmp_path / f"run_{mode}"),
        "device": "cpu",
        "generate": {
            "source": "a", "target": "b", "mode": mode, "channels": [8, 16], "strides": [2],
            "num_res_units": 0, "disc_channels": 4, "disc_layers": 1, "patch_size": [12, 12], "examples": 2,
        },
        "train": {"steps": steps, "batch_size": 4, "lr": 0.01, "betas": [0.5, 0.999], "log_every": 10,
                  "progress": False},
    }  # fmt: skip


def test_paired_translation_learns_a_known_mapping(tmp_path: Path) -> None:
    config = GenerateConfig.model_validate(generate_config(tmp_path, "paired", 30))
    results = run_generate(config, progress=False)
    out = Path(config.output)
    for name in ("results.json", "report.md", "examples.png", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    loaded = Translator.from_pretrained(out / "translator")
    assert loaded.info["mode"] == "paired" and "test" in loaded.info["metrics"]
    assert json.loads((out / "results.json").read_text())["test_studies"] == 2
    # b = 1 - a: copying the source is bad; the translator does far better after 30 steps
    assert results["test"]["psnr"] > results["test_copy_source"]["psnr"] + 5
    assert results["test"]["mae"] < 0.5 * results["test_copy_source"]["mae"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/psnr" in r for r in records) and any("loss_d" in r for r in records)


def test_unpaired_mode_trains_both_directions_through_the_cli(tmp_path: Path) -> None:
    config = generate_config(tmp_path, "unpaired", 4)
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["generate", "--config", str(path), "--set", "generate.lambda_identity=0.25"]) == 0
    out = Path(config["output"])
    reverse = Translator.from_pretrained(out / "translator_reverse")
    assert (reverse.source, reverse.target) == ("b", "a")
    assert "cycle" in (out / "metrics.jsonl").read_text()
    assert main(["generate", "--config", str(path), "--set", "generate.target=T9"]) == 2  # a clear error
