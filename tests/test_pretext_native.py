"""Medformer-native pretext tasks: source prediction (collection and modality withheld, then predicted)
and cross-dimensional consistency (a 2D slice's embedding agrees with its volume's)."""

from __future__ import annotations

import pytest
import torch

from _pretext_helpers import batch, mean_loss, single_thread, tiny_model, train
from medformer.pretext import CrossDimensional, Pretrainer, SourcePrediction
from medformer.pretext.cross_dimensional import random_slices


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_source_prediction_withholds_what_it_predicts():
    """No gradient reaches the collection latents or the modality embeddings: the body never saw them,
    so the answer can only come from the pixels."""
    model = tiny_model()
    task = SourcePrediction(keep_ratio=0.5)
    Pretrainer(model, [task])
    assert task.collections == ["c2d", "c3d"] and task.modalities == ["T1", "T2"]
    loss, logs = task(model, batch(2))
    loss.backward()
    embeds = model.input_adaptformer
    assert all(p.grad is None for p in embeds.collection_embed.values())
    for p in embeds.modality_embed.values():  # added by the tokenizer, subtracted again: zero in total
        assert p.grad is None or p.grad.abs().max() < 1e-6
    assert model.body.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert {"collection_acc", "modality_acc", "collection_loss", "modality_loss"} <= set(logs)


def test_source_prediction_learns_to_tell_sources_apart():
    model = tiny_model()
    task = SourcePrediction(keep_ratio=0.5)
    Pretrainer(model, [task])
    present = torch.tensor([[True, False], [False, True]] * 3)  # one modality per study: a real question
    batches = [batch(2, seed=1, present=present), batch(3, seed=2, present=present)]
    before = mean_loss(task, model, batches)
    train(task, model, batches, steps=30)
    after = mean_loss(task, model, batches)
    assert after < 0.5 * before, (before, after)


def test_source_prediction_needs_registered_collections():
    model = tiny_model()
    task = SourcePrediction()
    Pretrainer(model, [task])
    model.add_collection("late", 2)
    with pytest.raises(ValueError, match="'late' was not registered"):
        task(model, {**batch(2), "collection": "late"})
    single = tiny_model()
    single_task = SourcePrediction(modality_weight=0.0)
    Pretrainer(single, [single_task])
    single_task.collections = ["c2d"]  # one collection, modality part off: nothing to learn
    assert single_task(single, batch(2))[0] is None


def test_random_slices_cut_the_drawn_slice():
    volumes = torch.rand(5, 2, 6, 7, 8)
    for axis in range(3):
        slices, index = random_slices(volumes, axis, central=0.5)
        for i in range(5):
            expected = volumes[i].select(1 + axis, int(index[i]))
            assert torch.equal(slices[i], expected)
        size = volumes.shape[2 + axis]
        assert index.min() >= round(size * 0.25) and index.max() < size - round(size * 0.25)


@pytest.mark.parametrize("tokenizer", ["linear", "hybrid"])  # hybrid: slices use the 3D collection's 2D stats
def test_cross_dimensional_skips_2d_batches_and_scores_3d_ones(tokenizer):
    model = tiny_model(tokenizer=tokenizer)
    task = CrossDimensional(axis=0)
    Pretrainer(model, [task])
    assert task(model, batch(2)) == (None, {})
    views = task.views(batch(3))
    assert views["slices"].shape == (6, 2, 8, 8) and views["slice_axis"] == 0
    loss, logs = task.loss(model, views)
    assert loss.ndim == 0 and {"top1", "cosine"} <= set(logs)
    fig = task.visualise(model, batch(3, n=3))
    assert fig is not None and task.visualise(model, batch(2)) is None


def test_cross_dimensional_loss_decreases_on_a_tiny_batch():
    model = tiny_model()
    task = CrossDimensional(temperature=0.2, hidden_dim=64, proj_dim=32, axis=0, central=0.25)
    Pretrainer(model, [task])
    batches = [batch(3, n=8, size=8, seed=1), batch(3, n=8, size=8, seed=2)]
    before = mean_loss(task, model, batches)
    assert before == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=0.05)  # chance: 1 in 8
    train(task, model, batches, steps=60)
    after = mean_loss(task, model, batches)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("task", [SourcePrediction, CrossDimensional])
def test_options_are_checked(task):
    with pytest.raises(ValueError):
        task(**({"keep_ratio": 0.0} if task is SourcePrediction else {"axis": 3}))
