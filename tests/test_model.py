"""Medformer: shapes for every task kind in 2D/3D, missing modalities, MAE-style subsets, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medformer.data.study import Collection, Study, TaskSpec
from medformer.models import Medformer, MedformerConfig
from medformer.models.heads import DenseHead, cumulative_to_class_probs
from medformer.models.tokenizers import (
    patchify,
    scatter_tokens,
    sincos_position_embedding,
    unpatchify,
)

MODALITIES = ["T1", "T2", "FLAIR", "ADC"]
KINDS = [
    TaskSpec("bin", "binary"),
    TaskSpec("multi", "multiclass", 5),
    TaskSpec("labels", "multilabel", 3),
    TaskSpec("grade", "ordinal", 4),
    TaskSpec("age", "regression", 2),
    TaskSpec("seg", "segmentation", 3),
]


def tiny_config(**kw) -> MedformerConfig:
    return MedformerConfig(
        **{
            "dim": 32,
            "depth": 2,
            "heads": 2,
            "patch_size_2d": 4,
            "patch_size_3d": 4,
            "dense_channels": 4,
            **kw,
        }
    )


def tiny_model(seed: int = 0, **kw) -> Medformer:
    torch.manual_seed(seed)
    model = Medformer(tiny_config(**kw), modalities=MODALITIES)
    model.add_collection("c2d", ndim=2)
    model.add_collection("c3d", ndim=3)
    for spec in KINDS:
        model.add_task(spec, collection="c2d")
        model.add_task(spec, collection="c3d")
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Medformer:
    return tiny_model()


def expected_shape(spec: TaskSpec, batch: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    if spec.kind == "segmentation":
        return (batch, spec.num_classes, *spatial)
    return (batch, spec.out_channels)


@pytest.mark.parametrize(
    "spatial",
    [(28, 28), (30, 29), (8, 8), (16, 12, 12), (13, 14, 15)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("num_modalities", [1, 2, 4])
def test_output_shapes_every_task_kind(
    model: Medformer, spatial: tuple[int, ...], num_modalities: int
) -> None:
    collection = "c2d" if len(spatial) == 2 else "c3d"
    images = torch.randn(2, num_modalities, *spatial)
    with torch.no_grad():
        out = model(images, MODALITIES[:num_modalities], collection=collection)
    assert set(out) == {f"{collection}/{spec.name}" for spec in KINDS}
    for spec in KINDS:
        y = out[f"{collection}/{spec.name}"]
        assert y.shape == expected_shape(spec, 2, spatial)
        assert torch.isfinite(y).all()


def test_batch_dict_input(model: Medformer) -> None:
    batch = {
        "images": torch.randn(3, 2, 12, 12),
        "present": torch.tensor([[True, True], [True, False], [False, True]]),
        "modalities": ("T2", "ADC"),
        "collection": "c2d",
        "ndim": 2,
    }
    with torch.no_grad():
        out = model(batch, tasks=["c2d/multi", "c2d/seg"])
    assert out["c2d/multi"].shape == (3, 5)
    assert out["c2d/seg"].shape == (3, 3, 12, 12)


def test_one_model_many_grid_sizes() -> None:
    """28x28, 64x64, 224x224, 28^3, 64^3 and 96^3 through one model, no retraining (patch 8 in 3D)."""
    model = tiny_model(patch_size_3d=8)
    with torch.no_grad():
        for spatial in [(28, 28), (64, 64), (224, 224), (28, 28, 28), (64, 64, 64), (96, 96, 96)]:
            collection = "c2d" if len(spatial) == 2 else "c3d"
            out = model(
                torch.randn(1, 1, *spatial), ["T1"], collection=collection, tasks=[f"{collection}/multi"]
            )
            assert out[f"{collection}/multi"].shape == (1, 5)


@pytest.mark.parametrize("spatial", [(20, 18), (8, 9, 8)], ids=["2d", "3d"])
def test_mixed_missing_modalities_match_single_sample_runs(
    model: Medformer, spatial: tuple[int, ...]
) -> None:
    """In a batch whose studies have different modality sets, each study's outputs equal those of the
    study run alone with only its own modalities: absent tokens reach no other token, in any sample."""
    collection = "c2d" if len(spatial) == 2 else "c3d"
    present = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1], [1, 1, 0, 1]], dtype=torch.bool)
    images = torch.randn(4, 4, *spatial)
    with torch.no_grad():
        batched = model(images, MODALITIES, present, collection)
        for i in range(4):
            idx = torch.nonzero(present[i]).flatten()
            alone = model(images[i : i + 1, idx], [MODALITIES[j] for j in idx], collection=collection)
            for key, y in alone.items():
                torch.testing.assert_close(batched[key][i : i + 1], y, atol=2e-5, rtol=1e-4)


def test_absent_modality_pixels_do_not_matter(model: Medformer) -> None:
    present = torch.tensor([[True, False, True], [True, True, True]])
    images = torch.randn(2, 3, 16, 16)
    changed = images.clone()
    changed[0, 1] = torch.randn(16, 16) * 100
    changed[0, 1, :3] = float("nan")  # even garbage in an absent channel stays out
    with torch.no_grad():
        a = model(images, MODALITIES[:3], present, "c2d")
        b = model(changed, MODALITIES[:3], present, "c2d")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_eval_forward_is_deterministic(model: Medformer) -> None:
    images = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        a = model(images, MODALITIES[:2], collection="c3d")
        b = model(images, MODALITIES[:2], collection="c3d")
    for key in a:
        assert torch.equal(a[key], b[key])


def test_requested_tasks_do_not_influence_each_other(model: Medformer) -> None:
    images = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        alone = model(images, ["T1"], collection="c2d", tasks=["c2d/bin"])["c2d/bin"]
        together = model(images, ["T1"], collection="c2d")["c2d/bin"]
    torch.testing.assert_close(alone, together, atol=1e-6, rtol=1e-5)


def test_visible_subset_equals_encoding_only_those_tokens(model: Medformer) -> None:
    """MAE path: encode(tokens, visible) == the body run on [latents | the visible tokens | readers]."""
    images = torch.randn(3, 2, 16, 16)
    tokens = model.tokenize(images, MODALITIES[:2], collection="c2d")
    n = len(tokens)
    visible = torch.stack([torch.randperm(n)[: n // 4] for _ in range(3)])
    with torch.no_grad():
        enc = model.encode(tokens, visible, tasks=["c2d/bin"])
        for i in range(3):
            seq = torch.cat(
                [
                    model.input_adaptformer.collection_embed["c2d"],
                    tokens.tokens[i, visible[i]],
                    model.input_adaptformer.task_embed["c2d/bin"][None],
                ]
            )[None]
            ref = model.body(seq, None, num_readers=1)
            torch.testing.assert_close(enc.tokens[i], ref[0, :-1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(enc.task_token("c2d/bin")[i], ref[0, -1], atol=1e-5, rtol=1e-4)
        full = model.encode(tokens)
    assert enc.patches.shape == (3, n // 4, 32)
    assert torch.equal(enc.tokenset.position, torch.gather(tokens.position, 1, visible))
    assert torch.equal(enc.tokenset.modality, torch.gather(tokens.modality, 1, visible))
    assert not torch.allclose(enc.patches[0, 0], full.patches[0, visible[0, 0]], atol=1e-4)
    head = model.heads["c2d/bin"]
    assert head(enc).shape == (3, 1)  # classification heads work on a subset
    with pytest.raises(ValueError, match="dense decoding needs a token for every grid cell"):
        model.heads["c2d/seg"](model.encode(tokens, visible, tasks=["c2d/seg"]))


def test_masked_pixels_do_not_reach_visible_encoding(model: Medformer) -> None:
    images = torch.randn(1, 1, 16, 16)
    tokens = model.tokenize(images, ["T1"])
    visible = torch.tensor([[0, 5, 10, 15]])  # 4x4 grid: the diagonal cells
    other = images.clone()
    other[..., 0:4, 4:16] = 7.0  # cells (0, 1..3): none visible
    with torch.no_grad():
        a = model.encode(tokens, visible).tokens
        b = model.encode(model.tokenize(other, ["T1"]), visible).tokens
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)], ids=["2d", "3d"])
def test_conv_tokenizer_keeps_patches_apart_and_round_trips(spatial, tmp_path) -> None:
    """The conv stem sees one patch at a time: masked patches still cannot reach visible tokens."""
    conv = tiny_model(tokenizer="conv")
    images = torch.randn(1, 1, *spatial)
    other = images.clone()
    other[(..., *[slice(0, 4)] * (len(spatial) - 1), slice(4, None))] = 7.0  # every cell but the first
    visible = torch.tensor([[0]])
    with torch.no_grad():
        a = conv.encode(conv.tokenize(images, ["T1"]), visible).tokens
        b = conv.encode(conv.tokenize(other, ["T1"]), visible).tokens
        c = conv.encode(conv.tokenize(other, ["T1"])).tokens
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c[:, : a.shape[1]])
    loaded = Medformer.from_pretrained(conv.save(tmp_path / "m")).eval()
    assert loaded.config.tokenizer == "conv"
    x = torch.randn(2, 1, *spatial)
    col = "c2d" if len(spatial) == 2 else "c3d"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ["T1"], collection=col), conv(x, ["T1"], collection=col))


@pytest.mark.parametrize("spatial", [(16, 16), (9, 9, 9)], ids=["2d", "3d"])
def test_hybrid_tokenizer_keeps_the_patch_grid_and_hides_masked_patches(spatial, tmp_path) -> None:
    """The CNN stem lands on the patch tokenizer's grid; its tokens see neighbouring patches, so a
    visible subset is encoded from images whose hidden patches are zeroed."""
    hybrid = tiny_model(tokenizer="hybrid")
    linear = tiny_model(tokenizer="linear")
    images = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        a = hybrid.tokenize(images, ["T1"])
        assert a.grid == linear.tokenize(images, ["T1"]).grid
        other = images.clone()
        other[(..., *[slice(0, 4)] * (len(spatial) - 1), slice(4, 8))] = 7.0  # the second cell only
        b = hybrid.tokenize(other, ["T1"])
    changed = (a.tokens - b.tokens).abs().amax(dim=(0, 2)) > 0
    assert changed[1] and changed[0], "the first cell's token should see its neighbour through the stem"
    with torch.no_grad():  # only the first cell visible: its neighbour's change no longer reaches it
        seen_a, seen_b = (hybrid.encode(t, torch.tensor([[0], [0]])).tokens for t in (a, b))
        assert torch.equal(seen_a, seen_b)
        assert not torch.equal(seen_a, hybrid.encode(a, torch.tensor([[1], [1]])).tokens)
    loaded = Medformer.from_pretrained(hybrid.save(tmp_path / "m")).eval()
    assert loaded.config.tokenizer == "hybrid"
    col = "c2d" if len(spatial) == 2 else "c3d"
    with torch.no_grad():
        out, ref = loaded(images, ["T1"], collection=col), hybrid(images, ["T1"], collection=col)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])
    with pytest.raises(ValueError, match="power-of-two"):
        tiny_model(tokenizer="hybrid", patch_size_2d=6)


def test_hybrid_3d_stem_width_is_a_saved_setting(tmp_path) -> None:
    """``stem_width_3d`` widens only the 3D stem, and a saved model comes back with the same stem."""
    from medformer.config import ModelConfig
    from medformer.finetune import build_model

    model = tiny_model(tokenizer="hybrid", stem_width_3d=4)
    stems = model.input_adaptformer.tokenizers
    assert stems["3d"].widths[:3] == [4, 8, 8] and stems["2d"].widths[0] == 32
    images = torch.randn(2, 1, 9, 9, 9)
    loaded = Medformer.from_pretrained(model.save(tmp_path / "m")).eval()
    with torch.no_grad():
        out, ref = loaded(images, ["T1"], collection="c3d"), model(images, ["T1"], collection="c3d")
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])
    built = build_model(ModelConfig(tokenizer="hybrid", depth=1, stem_width_3d=16), [])
    assert built.input_adaptformer.tokenizers["3d"].convs[0].out_channels == 16
    with pytest.raises(ValueError, match="stem_width_3d"):
        tiny_model(tokenizer="hybrid", stem_width_3d=0)


def test_collection_stems_give_each_collection_its_own_trained_and_saved_stem(tmp_path) -> None:
    """With ``collection_stems`` a batch trains only its own collection's convolutions (the projection onto
    the tokens stays shared), and a saved model comes back with every stem."""
    from medformer.config import ModelConfig
    from medformer.finetune import build_model

    model = tiny_model(tokenizer="hybrid", collection_stems=True)
    model.add_collection("other", ndim=2)
    tok = model.input_adaptformer.tokenizers["2d"]
    assert set(tok.stems) == {"c2d", "c3d", "other"} and set(
        model.input_adaptformer.tokenizers["3d"].stems
    ) == {"c3d"}
    images = torch.randn(4, 1, 8, 8)
    model.train()
    out = model(images, ["T1"], collection="c2d")
    out["c2d/bin"].sum().backward()
    assert tok.stems["c2d"].convs[0].weight.grad.abs().sum() > 0
    assert tok.stems["other"].convs[0].weight.grad is None and tok.convs[0].weight.grad is None
    assert tok.proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # same image, same statistics at init: only the stems tell the collections apart
        a = model.tokenize(images, ["T1"], collection="c2d").tokens
        b = model.tokenize(images, ["T1"], collection="other").tokens
    assert not torch.allclose(a, b)
    loaded = Medformer.from_pretrained(model.save(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.tokenize(images, ["T1"], collection="other").tokens, b)
    assert not tiny_model(tokenizer="hybrid").input_adaptformer.tokenizers["2d"].stems
    built = build_model(ModelConfig(tokenizer="hybrid", depth=1, collection_stems=True), [])
    assert built.config.collection_stems


def test_hybrid_tokenizer_normalises_each_collection_with_its_own_statistics(tmp_path) -> None:
    """Batch-norm statistics are kept per collection (and saved); a frozen stem still estimates them."""
    model = tiny_model(tokenizer="hybrid")
    model.add_collection("bright", ndim=2)
    stem = model.input_adaptformer.tokenizers["2d"]
    assert "c2d" not in model.input_adaptformer.tokenizers["3d"].stats  # a 2D collection has no 3D stats
    assert "c3d" in stem.stats  # a 3D collection's slices are 2D images of it
    with pytest.raises(KeyError, match="no 3D tokenizer statistics"):
        model.tokenize(torch.randn(2, 1, 8, 8, 8), ["T1"], collection="c2d")
    images = torch.rand(4, 1, 16, 16)
    model.train()
    for _ in range(20):
        model.tokenize(images, ["T1"], collection="c2d")
        model.tokenize(images * 10 + 5, ["T1"], collection="bright")
    means = {k: stem.stats[k][0].running_mean for k in ("c2d", "bright")}
    assert means["bright"].abs().mean() > 5 * means["c2d"].abs().mean()
    assert torch.equal(stem.shared[0].running_mean, torch.zeros_like(stem.shared[0].running_mean))
    model.eval()
    with torch.no_grad():
        same = [model.tokenize(images, ["T1"], collection=c).tokens for c in ("c2d", "bright")]
    assert not torch.allclose(*same)
    loaded = Medformer.from_pretrained(model.save(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.tokenize(images, ["T1"], collection="bright").tokens, same[1])
    for p in model.parameters():
        p.requires_grad_(False)  # what linear / attentive probing does
    model.add_collection("new", ndim=2)
    model.train()
    model.tokenize(images * 3, ["T1"], collection="new")
    assert stem.stats["new"][0].running_mean.abs().sum() > 0, "a frozen stem still learns new statistics"


def test_scatter_inverts_select_and_dense_decoding_after_fill(model: Medformer) -> None:
    tokens = model.tokenize(torch.randn(2, 1, 8, 8, 8), ["T1"], collection="c3d")
    n = len(tokens)
    visible = torch.stack([torch.randperm(n)[:3] for _ in range(2)])
    fill = torch.zeros(32)
    full = scatter_tokens(tokens.select(visible).tokens, visible, n, fill)
    picked = torch.gather(full, 1, visible[..., None].expand(-1, -1, 32))
    assert torch.equal(picked, tokens.select(visible).tokens)
    assert (full.abs().sum(-1) == 0).sum() == 2 * (n - 3)
    head = DenseHead(None, 32, 1, ndim=3, patch_size=4, channels=4, skip=False, per_modality=True)
    with torch.no_grad():
        tokens.tokens = full
        assert head(model.encode(tokens)).shape == (2, 1, 1, 8, 8, 8)


def test_patchify_roundtrip_and_positions() -> None:
    x = torch.randn(2, 3, 8, 12, 16)
    patches = patchify(x, 4)
    assert patches.shape == (2, 3, 2 * 3 * 4, 64)
    assert torch.equal(unpatchify(patches, (2, 3, 4), 4), x)
    assert torch.equal(
        patches[0, 0, 1], x[0, 0, :4, :4, 4:8].reshape(-1)
    )  # row-major grid, last axis fastest
    for grid in [(7, 7), (4, 4, 4), (12, 12, 12)]:
        pe = sincos_position_embedding(grid, 48)
        assert pe.shape == (torch.Size(grid).numel(), 48)
        assert torch.cdist(pe, pe).add(torch.eye(len(pe)) * 1e3).min() > 1e-3  # every cell distinct


def test_unknown_names_fail_clearly(model: Medformer) -> None:
    with pytest.raises(KeyError, match="add_modality"):
        model(torch.randn(1, 1, 8, 8), ["PET"], collection="c2d")
    with pytest.raises(KeyError, match="add_collection"):
        model(torch.randn(1, 1, 8, 8), ["T1"], collection="nowhere")
    with pytest.raises(KeyError, match="unknown tasks"):
        model(torch.randn(1, 1, 8, 8), ["T1"], collection="c2d", tasks=["nope"])
    with pytest.raises(ValueError, match="no modality present"):
        model(torch.randn(2, 1, 8, 8), ["T1"], torch.tensor([[True], [False]]), "c2d")
    with pytest.raises(ValueError, match=r"without '\.'"):
        model.add_modality("a.b")


def test_ordinal_heads() -> None:
    torch.manual_seed(0)
    model = Medformer(tiny_config(), modalities=["T1"])
    spec = TaskSpec("grade", "ordinal", 5)
    classes = model.add_task(spec, key="classes")
    cumulative = model.add_task(spec, key="cumulative", ordinal="cumulative")
    out = model(torch.randn(3, 1, 8, 8), ["T1"])
    assert out[classes].shape == (3, 5)  # MedMNIST convention: one logit per class
    assert out[cumulative].shape == (3, 4)
    probs = cumulative_to_class_probs(out[cumulative])
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_add_collection_object_registers_modalities_and_tasks() -> None:
    study = Study("s0", images={"CT": torch.zeros(8, 8, 8).numpy()})
    coll = Collection("organ", 3, ["CT"], [study], tasks=[TaskSpec("organ", "multiclass", 11)])
    model = Medformer(tiny_config())
    model.add_collection(coll)
    assert model.modalities == ["CT"] and model.collections == {"organ": 3}
    assert model.tasks_for("organ", 3) == ["organ/organ"]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8, 8), ["CT"], collection="organ")["organ/organ"].shape == (2, 11)


def _fit(
    model: Medformer, images: torch.Tensor, target: torch.Tensor, key: str, steps: int, lr: float
) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(images, ["T1"], collection="c2d", tasks=[key])[key]
        loss = F.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_overfits_tiny_classification_batch() -> None:
    torch.manual_seed(1)
    model = tiny_model(seed=1)
    images = torch.randn(8, 1, 16, 16)
    labels = torch.arange(8) % 5
    losses = _fit(model, images, labels, "c2d/multi", steps=80, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_overfits_tiny_segmentation_batch() -> None:
    torch.manual_seed(2)
    model = tiny_model(seed=2)
    masks = torch.zeros(4, 16, 16, dtype=torch.long)
    for i in range(4):
        r, c = torch.randint(0, 10, (2,)).tolist()
        masks[i, r : r + 6, c : c + 6] = 1 + i % 2
    images = (masks.float() + 0.1 * torch.randn(4, 16, 16))[:, None]
    losses = _fit(model, images, masks, "c2d/seg", steps=120, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_stochastic_depth_and_checkpointing() -> None:
    images = torch.randn(2, 1, 12, 12)
    plain = tiny_model(seed=3, drop_path=0.0).train()
    ckpt = tiny_model(seed=3, drop_path=0.0, checkpointing=True).train()
    grads = []
    for m in (plain, ckpt):
        m(images, ["T1"], collection="c2d", tasks=["c2d/multi"])["c2d/multi"].sum().backward()
        grads.append(m.body.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    dropped = tiny_model(seed=3, drop_path=0.5).train()
    a = dropped(images, ["T1"], collection="c2d", tasks=["c2d/multi"])["c2d/multi"]
    torch.manual_seed(123)
    b = dropped(images, ["T1"], collection="c2d", tasks=["c2d/multi"])["c2d/multi"]
    assert not torch.allclose(a, b)
    dropped.eval()
    with torch.no_grad():
        a = dropped(images, ["T1"], collection="c2d", tasks=["c2d/multi"])["c2d/multi"]
        b = dropped(images, ["T1"], collection="c2d", tasks=["c2d/multi"])["c2d/multi"]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("preset", "low", "high"), [("tiny", 3e6, 8e6), ("small", 15e6, 30e6), ("base", 70e6, 100e6)]
)
def test_preset_parameter_counts(preset: str, low: float, high: float) -> None:
    with torch.device("meta"):  # no memory, no init time
        model = Medformer(MedformerConfig.from_preset(preset), modalities=["T1"], collections=["c"])
    counts = model.parameter_counts()
    assert low <= counts["total"] <= high, counts


def test_readers_equal_masked_attention_reference() -> None:
    """Readers (task tokens) attend to the unpadded context and themselves; nobody attends to them."""
    from medformer.models.body import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    b, c, r = 2, 7, 3
    x, readers = torch.randn(b, c, 16), torch.randn(b, r, 16)
    pad = torch.zeros(b, c, dtype=torch.bool)
    pad[0, 4:] = True
    out, out_r = attn(x, readers, ~pad[:, None, None, :])
    allowed = torch.zeros(b, c + r, c + r, dtype=torch.bool)
    allowed[:, :, :c] = ~pad[:, None, :]
    allowed[:, c:, c:] = torch.eye(r, dtype=torch.bool)
    q, k, v = attn.split_heads(torch.cat([x, readers], 1))
    ref = attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]))
    torch.testing.assert_close(out, ref[:, :c], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_r, ref[:, c:], atol=1e-5, rtol=1e-5)
