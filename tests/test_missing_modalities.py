"""Segmentation with modalities withheld at test time: drop, zero-fill, template-fill."""

import pytest
import torch

from medformer.data.study import TaskSpec
from medformer.evaluate.missing import fill_absent, missing_modality_scores, withheld_sets
from medformer.models import Medformer, MedformerConfig

MODS = ("T1", "T2", "FLAIR")


pytestmark = pytest.mark.usefixtures("one_thread")


def seg_model() -> Medformer:
    torch.manual_seed(0)
    model = Medformer(MedformerConfig(dim=32, depth=1, heads=2, patch_size_3d=4), modalities=MODS)
    model.add_collection("c", ndim=3)
    model.add_task(TaskSpec("seg", "segmentation", 3), collection="c")
    with torch.no_grad():  # an untrained head predicts background everywhere: make the maps vary
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.add_templates(shape=(8, 8, 8), align="grid")  # zero templates, as BrainMVP starts
    return model.eval()


def study(i: int, present=(True, True, True)) -> dict:
    g = torch.Generator().manual_seed(i)
    present = torch.tensor(present)
    images = torch.rand(3, 8, 8, 8, generator=g)
    images[~present] = float("nan")  # an absent modality may hold anything
    return {
        "images": images,
        "present": present,
        "labels": {"seg": torch.randint(0, 3, (8, 8, 8), generator=g)},
        "has_label": {"seg": True},
        "id": f"s{i}",
        "collection": "c",
        "modalities": MODS,
        "ndim": 3,
    }


def foreground_fraction(pred, truth) -> dict[str, float]:
    """A score that shows what the model predicted, not only how well (a mean over the batch's studies,
    like `brats_dice`)."""
    return {"fg": float((pred > 0).mean()), "sum": float(pred.sum()) / len(pred)}


def test_withheld_sets_are_every_choice_of_k():
    assert withheld_sets(MODS, 0) == [()]
    assert len(withheld_sets(("a", "b", "c", "d"), 2)) == 6
    assert set(withheld_sets(MODS, 1)) == {("T1",), ("T2",), ("FLAIR",)}


def test_zero_fill_zeroes_absent_modalities_even_nan_and_marks_them_present():
    batch = {k: torch.stack([study(0, (True, False, True))[k]]) for k in ("images", "present")}
    out = fill_absent(batch, "zero")
    assert out["present"].all()
    assert (out["images"][0, 1] == 0).all()
    assert torch.equal(out["images"][0, [0, 2]], batch["images"][0, [0, 2]])
    assert fill_absent(batch, "drop")["images"] is batch["images"]
    with pytest.raises(ValueError, match="templates"):
        fill_absent(batch, "template", None)
    with pytest.raises(ValueError, match="fill must be"):
        fill_absent(batch, "mean")  # type: ignore[arg-type]


def test_nothing_withheld_scores_the_plain_prediction():
    model, data = seg_model(), [study(i) for i in range(3)]
    got = missing_modality_scores(model, data, "c/seg", [()], "drop", score=foreground_fraction)
    with torch.no_grad():
        batch = {"images": torch.stack([d["images"] for d in data]), "modalities": MODS,
                 "present": torch.ones(3, 3, dtype=torch.bool), "collection": "c"}  # fmt: skip
        pred = model(batch, tasks=["c/seg"])["c/seg"].argmax(1)
    assert got["n"] == 3
    assert got["sum"] == pytest.approx(float(pred.sum()) / 3)


def test_a_dropped_modality_cannot_change_the_prediction_but_a_kept_one_does():
    model = seg_model()
    data = [study(i) for i in range(3)]
    other = [{**d, "images": d["images"].clone()} for d in data]
    for d in other:
        d["images"][1] = torch.rand(8, 8, 8)  # T2 changed
    score = lambda m, d, w, f: missing_modality_scores(m, d, "c/seg", w, f, score=foreground_fraction)  # noqa: E731
    assert score(model, data, [("T2",)], "drop") == score(model, other, [("T2",)], "drop")
    assert score(model, data, [("T2",)], "zero") == score(model, other, [("T2",)], "zero")
    assert score(model, data, [()], "drop") != score(model, other, [()], "drop")


def test_template_fill_uses_the_templates_and_equals_zero_fill_for_zero_templates():
    model, data = seg_model(), [study(i) for i in range(4)]
    withheld = withheld_sets(MODS, 1)
    zero = missing_modality_scores(model, data, "c/seg", withheld, "zero", score=foreground_fraction)
    same = missing_modality_scores(model, data, "c/seg", withheld, "template", score=foreground_fraction)
    assert same == zero  # templates start at zero
    with torch.no_grad():
        for v in model.templates.volumes.values():
            v.fill_(0.5)
    moved = missing_modality_scores(model, data, "c/seg", withheld, "template", score=foreground_fraction)
    assert moved != zero
    assert moved["n"] == 12  # 4 studies x 3 choices


def test_studies_left_without_modalities_are_skipped_and_fill_missing_is_restored():
    model = seg_model()
    model.templates.fill_missing = True
    data = [study(0, (True, False, False)), study(1)]
    got = missing_modality_scores(model, data, "c/seg", [("T1",)], "drop")
    assert got["n"] == 1 and set(got) == {"dice_ET", "dice_TC", "dice_WT", "n"}
    assert model.templates.fill_missing  # switched off only while scoring
    with pytest.raises(ValueError, match="no study"):
        missing_modality_scores(model, data, "c/seg", [MODS], "drop")
