"""Multi-collection sampling: strategies, one collection per batch, disjoint ranks, exact resume."""

from collections import Counter

import numpy as np
import pytest
import torch

from medformer.data.dataset import CollectionDataset
from medformer.data.sampling import MultiCollectionSampler, multi_collection_loader
from medformer.data.study import Collection, Study, TaskSpec

SIZES = {"big": 900, "small": 100}


def _fractions(strategy, **kw):
    s = MultiCollectionSampler(SIZES, batch_size=4, strategy=strategy, num_batches=4000, **kw)
    counts = Counter(name for name, _ in s)
    return counts["big"] / 4000


def test_strategies_draw_collections_as_specified():
    assert _fractions("proportional") == pytest.approx(0.9, abs=0.03)
    assert _fractions("uniform") == pytest.approx(0.5, abs=0.03)
    expected = 900**0.5 / (900**0.5 + 100**0.5)  # temperature 2
    assert _fractions("temperature", temperature=2.0) == pytest.approx(expected, abs=0.03)
    assert _fractions({"big": 1.0, "small": 3.0}) == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize(
    ("shares", "problem"),
    [
        ({"big": 1.0}, "must name every collection"),
        ({"big": 1, "small": 1, "x": 1}, "must name every collection"),
        ({"big": 1.0, "small": 0.0}, "> 0 in some epoch"),
        ({"big": 1.0, "small": [0.5, -0.1]}, "must be >= 0"),
        ({"big": [0, 1], "small": [0, 1]}, "leave epoch 0 with no collection"),
    ],
)
def test_shares_must_cover_each_collection_with_a_positive_share(shares, problem):
    with pytest.raises(ValueError, match=problem):
        MultiCollectionSampler(SIZES, batch_size=4, strategy=shares)


def test_share_schedule_changes_the_draws_epoch_by_epoch_and_survives_resume():
    shares = {"big": [1.0, 1.0, 3.0], "small": [0.0, 1.0, 1.0]}  # small joins in epoch 1; epoch 2 holds
    s = MultiCollectionSampler(SIZES, batch_size=4, strategy=shares, num_batches=2000, seed=5)
    fractions = [Counter(name for name, _ in s)["big"] / 2000 for _ in range(4)]
    assert fractions[0] == 1.0
    assert fractions[1] == pytest.approx(0.5, abs=0.04)
    assert fractions[2] == pytest.approx(0.75, abs=0.04) and fractions[3] == pytest.approx(0.75, abs=0.04)
    # a sampler restored mid-epoch 1 draws the rest of that epoch exactly as the first one did
    ref = MultiCollectionSampler(SIZES, batch_size=4, strategy=shares, num_batches=2000, seed=5)
    ref.set_epoch(1)
    expected = [n for n, _ in ref]
    resumed = MultiCollectionSampler(SIZES, batch_size=4, strategy=shares, num_batches=2000, seed=5)
    resumed.load_state_dict({"epoch": 1, "start": 700, "seed": 5})
    assert [n for n, _ in resumed] == expected[700:]


def test_proportional_epoch_covers_each_study_once():
    s = MultiCollectionSampler({"a": 40, "b": 24}, batch_size=8)
    seen = {"a": [], "b": []}
    for name, idx in s:
        assert len(idx) == 8
        seen[name].extend(idx)
    # proportional draws are random, so the batch count per collection varies; no index repeats
    # within a collection until it has been used up
    for name, n in {"a": 40, "b": 24}.items():
        first = seen[name][:n]
        assert len(set(first)) == len(first)


def test_ranks_get_disjoint_shares_of_the_same_collection():
    ranks = [MultiCollectionSampler(SIZES, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for (n0, i0), (n1, i1) in zip(*[list(s) for s in ranks], strict=True):
        assert n0 == n1
        assert not set(i0) & set(i1)
        assert len(i0) == len(i1) == 4


def test_resume_continues_exactly():
    full = list(MultiCollectionSampler(SIZES, 4, seed=3))
    s = MultiCollectionSampler(SIZES, 4, seed=3)
    it = iter(s)
    head = [next(it) for _ in range(10)]
    state = s.state_dict()
    resumed = MultiCollectionSampler(SIZES, 4, seed=0)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert [(n, list(i)) for n, i in head + tail] == [(n, list(i)) for n, i in full]


def test_epochs_differ_and_are_reproducible():
    s = MultiCollectionSampler(SIZES, 4, seed=3)
    e0, e1 = list(s), list(s)
    assert e0 != e1
    s.set_epoch(0)
    assert list(s) == e0


def _collection(name, n, shape):
    studies = [
        Study(f"{name}{i}", images={"x": np.full(shape, i, np.float32)}, labels={"y": i % 2})
        for i in range(n)
    ]
    return Collection(name, len(shape), ["x"], studies, [TaskSpec("y", "binary")])


def test_loader_batches_hold_one_collection_each():
    cols = {"flat": _collection("flat", 12, (8, 8)), "vol": _collection("vol", 6, (4, 4, 4))}
    datasets = {k: CollectionDataset(c, split=None) for k, c in cols.items()}
    sampler = MultiCollectionSampler(
        {k: len(d) for k, d in datasets.items()}, batch_size=3, strategy="uniform"
    )
    batches = list(multi_collection_loader(datasets, sampler))
    assert len(batches) == len(sampler)
    for b in batches:
        spatial = b["images"].shape[2:]
        assert len(spatial) == (2 if b["collection"] == "flat" else 3)
        assert b["labels"]["y"].shape == (3, 1) and b["present"].all()
        ids = [int(i[len(b["collection"]) :]) for i in b["ids"]]
        # the image values identify the study: the loader returned the studies the sampler chose
        assert torch.equal(b["images"].flatten(1)[:, 0], torch.tensor(ids, dtype=torch.float32))
