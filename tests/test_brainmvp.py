"""BrainMVP pre-training: block masks, cross-modal and template fills, gradients, schedule, losses."""

import math

import pytest
import torch

from medformer.config import TrainConfig
from medformer.data.dataset import CollectionDataset
from medformer.data.study import Collection, Study
from medformer.models import Medformer, MedformerConfig
from medformer.pretext import Pretrainer
from medformer.pretext.brainmvp import BrainMVP, block_mask
from medformer.pretext.registry import build_tasks
from medformer.train import fit

MODS = ("T1", "T2", "FLAIR")


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (16, 16, 16)


def tiny_model() -> Medformer:
    torch.manual_seed(0)
    cfg = MedformerConfig(dim=32, depth=2, heads=2, patch_size_3d=4)
    return Medformer(cfg, modalities=MODS, collections=["c"])


def task(**kw) -> BrainMVP:
    options = {"block_size": 4, "mcl_start": 0, "cmr_warmup": 0, **kw}
    return BrainMVP(SHAPE, **options)


def batch(present: list[list[int]], seed: int = 0, constant: bool = False) -> dict:
    """Studies with the given modalities; ``constant``: modality i is the value i + 1 everywhere."""
    torch.manual_seed(seed)
    p = torch.tensor(present, dtype=torch.bool)
    if constant:
        images = (torch.arange(3, dtype=torch.float32) + 1).view(1, 3, 1, 1, 1).expand(len(p), 3, *SHAPE)
    else:
        images = torch.rand(len(p), 3, *SHAPE)
    return {"images": images * p[..., None, None, None], "present": p, "modalities": MODS, "collection": "c"}


def test_block_mask_covers_the_requested_fraction_in_whole_blocks():
    torch.manual_seed(0)
    mask = block_mask(5, (16, 16, 16), 4, 0.8)
    n = 4**3
    expected = (n - math.floor(n * 0.2)) / n  # the official count of masked blocks
    assert mask.shape == (5, 16, 16, 16)
    assert torch.allclose(mask.float().mean((1, 2, 3)), torch.full((5,), expected))
    blocks = mask.view(5, 4, 4, 4, 4, 4, 4).permute(0, 1, 3, 5, 2, 4, 6).flatten(4)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()  # every block is all masked or all kept
    assert not torch.equal(mask[0], mask[1])  # each study its own draw
    odd = block_mask(2, (10, 12, 9), 4, 0.5)  # not a multiple of the block: cut back
    assert odd.shape == (2, 10, 12, 9) and 0.3 < odd.float().mean() < 0.7


def test_cross_modal_fill_never_copies_from_the_modality_itself():
    model = tiny_model()
    t = task(md_weight=0.0, mcl_weight=0.0)
    Pretrainer(model, [t])
    # templates hold -1: a template fill is recognisable
    for m in MODS:
        model.templates.set(m, torch.tensor(-1.0))
    b = batch([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], constant=True)
    for seed in range(20):
        torch.manual_seed(seed)
        views = t.views(b)
        filled = t.fill(model, views, md=False, cmr=True)["cmr"]
        for i in range(4):
            m = int(views["chosen"][i])
            assert b["present"][i, m]
            masked = filled[i][views["mask_cmr"][i]]
            assert (filled[i][~views["mask_cmr"][i]] == m + 1).all()
            if views["has_partner"][i]:
                partner = int(masked[0]) - 1
                assert partner != m and b["present"][i, partner] and (masked == partner + 1).all()
            else:  # a single-modality study: the template fills in
                assert i == 2 and (masked == -1).all()


def test_template_crop_matches_the_study_position_under_random_crops():
    """A template holding the study at a known offset of the reference grid: cut at the batch's origin
    (moved along by the random crop), it fills the masked blocks with exactly the study's voxels."""
    model = tiny_model()
    t = BrainMVP((24, 24, 24), block_size=4, crop_size=(8, 12, 8), mcl_start=0, cmr_warmup=0)
    Pretrainer(model, [t])
    b = batch([[1, 1, 1], [1, 1, 1]])
    b["images"] = b["images"][:1].expand(2, -1, -1, -1, -1)  # one study, twice ...
    b["origin"] = torch.tensor([[3, 2, 5], [0, 0, 0]])  # ... at its place, and at a wrong one
    b["grid"] = torch.tensor([[24, 24, 24]] * 2)  # in a grid of the reference grid's shape (registered)
    for i, m in enumerate(MODS):
        volume = torch.zeros(24, 24, 24)
        volume[3:19, 2:18, 5:21] = b["images"][0, i]
        model.templates.set(m, volume)
    for seed in range(5):
        torch.manual_seed(seed)
        views = t.views(b)
        assert views["target"].shape == (2, 8, 12, 8)
        md = t.fill(model, views, md=True, cmr=False)["md"]
        torch.testing.assert_close(md[0], views["target"][0])
        assert not torch.allclose(md[1], views["target"][1])


def test_gradients_reach_the_templates_of_the_encoded_modalities():
    model = tiny_model()
    t = task()
    Pretrainer(model, [t])
    b = batch([[1, 0, 0], [1, 0, 0]])  # only T1 is ever encoded
    loss, logs = t(model, b)
    loss.backward()
    grads = {m: model.templates.volumes[m].grad for m in MODS}
    assert grads["T1"] is not None and grads["T1"].abs().sum() > 0
    assert all(grads[m] is None or grads[m].abs().sum() == 0 for m in ("T2", "FLAIR"))
    assert set(logs) == {"md", "cmr", "mcl", "mcl_top1"}


def test_losses_fall_on_a_tiny_multimodal_batch():
    """MD, CMR and MCL all fall within 15 steps. As in the paper, MCL is meant for templates that
    already hold the modality's typical intensity (it starts late): they start at the images' mean."""
    model = tiny_model()
    t = task(mask_ratio=0.5)
    pretrainer = Pretrainer(model, [t])
    b = batch([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], seed=1)
    level = torch.tensor([0.1, 0.3, 0.5, 0.7]).view(4, 1, 1, 1, 1)  # studies differ in brightness
    b["images"] = (b["images"] * 0.3 + level) * b["present"][..., None, None, None]
    for m in MODS:
        model.templates.set(m, torch.tensor(0.55))
    before = model.templates.volumes["T1"].detach().clone()
    opt = torch.optim.AdamW(pretrainer.parameters(), lr=2e-3)
    history = []
    for step in range(15):
        torch.manual_seed(100 + step)
        loss, logs = t(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs)
    for part, factor in (("md", 0.7), ("cmr", 0.7), ("mcl", 0.7)):
        first = sum(h[part] for h in history[:3]) / 3
        last = sum(h[part] for h in history[-3:]) / 3
        assert last < factor * first, (part, first, last)
    assert not torch.equal(model.templates.volumes["T1"], before)  # the templates learn too


def test_schedule_switches_and_ablation_weights():
    model = tiny_model()
    t = task(mcl_start=5, cmr_warmup=3)
    Pretrainer(model, [t])
    b = batch([[1, 1, 1], [1, 1, 0]])
    t.active(0)
    assert "mcl" not in t(model, b)[1]
    views = t.views(b)
    cmr = t.fill(model, views, md=False, cmr=True)["cmr"]
    assert (cmr[views["mask_cmr"]] == 0).all()  # warm-up: the (zero) template, not the partner
    t.active(3)
    cmr = t.fill(model, views, md=False, cmr=True)["cmr"]
    assert (cmr[views["mask_cmr"]] > 0).all()  # after it: the partner modality
    t.active(5)
    assert "mcl" in t(model, b)[1]
    figure = t.visualise(model, b)  # what medformer pretrain draws into visuals/
    assert len(figure.axes) == 2 * 6

    plain = tiny_model()
    ablation = task(md_weight=0.0, mcl_weight=0.0)  # the paper's "CMR" row; "+MD": mcl_weight=0
    Pretrainer(plain, [ablation])
    assert set(ablation(plain, b)[1]) == {"cmr"}
    with pytest.raises(ValueError):
        BrainMVP(SHAPE, md_weight=0.0, cmr_weight=0.0)
    assert t(model, {**b, "images": torch.rand(2, 3, 8, 8)})[0] is None  # a 2D batch: nothing to do


def test_registry_builds_it_with_the_papers_schedule():
    tasks, weights = build_tasks([{"task": "brainmvp", "template_shape": [16, 16, 16], "total_steps": 1500}])
    t = tasks[0]
    assert isinstance(t, BrainMVP) and weights == {"brainmvp": 1.0}
    assert (t.cmr_warmup, t.mcl_start) == (300, 1000)
    assert t.weights == {"md": 10.0, "cmr": 1.0, "mcl": 1.0}
    assert (t.block_size, t.mask_ratio) == (8, 0.8)


def test_engine_trains_it_and_the_saved_model_keeps_the_templates(tmp_path):
    torch.manual_seed(0)
    studies = [
        Study(f"s{i}", images={m: torch.rand(*SHAPE).numpy() for m in MODS[: 1 + i % 3]}) for i in range(6)
    ]
    data = {"c": CollectionDataset(Collection("c", 3, list(MODS), studies), split=None)}
    model = tiny_model()
    pretrainer = Pretrainer(model, [task(mcl_start=2)])
    cfg = TrainConfig(steps=3, batch_size=2, progress=False, log_every=1, checkpoint_every=None, device="cpu")
    result = fit(pretrainer, pretrainer.objectives(), data, cfg, tmp_path / "run")
    assert result.step == 3 and "brainmvp/mcl" in result.history[-1]
    model.save(tmp_path / "model")
    loaded = Medformer.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(loaded.templates.volumes["T1"], model.templates.volumes["T1"])
    assert loaded.templates.volumes["T1"].abs().sum() > 0
