"""Mixup: the mixed batch is the convex combination it claims, and the objective's loss is the mixup loss."""

from __future__ import annotations

import pytest
import torch

from _engine_helpers import datasets, medformer
from medformer.config import ConfigError, FinetuneSection
from medformer.data.dataset import collate
from medformer.data.mixup import mixup
from medformer.losses import SupervisedObjective, task_loss, task_spec


def batch_of(images: torch.Tensor, present: torch.Tensor) -> dict:
    return {"images": images, "present": present, "labels": {}, "has_label": {}}


def test_mixup_is_a_convex_combination_of_pairs() -> None:
    torch.manual_seed(0)
    images = torch.randn(6, 1, 8, 8)
    mixed, perm, lam = mixup(batch_of(images, torch.ones(6, 1, dtype=torch.bool)), alpha=0.4)
    assert 0.0 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed["images"], lam * images + (1 - lam) * images[perm])
    assert not torch.equal(mixed["images"], images)  # a random permutation of 6 moves some studies


def test_mixup_keeps_only_modalities_both_studies_have() -> None:
    torch.manual_seed(1)
    images = torch.randn(4, 2, 8, 8) + 5
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    for _ in range(20):
        mixed, perm, _lam = mixup(batch_of(images * present[..., None, None], present), alpha=1.0)
        both = present & present[perm]
        assert torch.equal(mixed["present"], both)
        assert bool(mixed["present"].any(dim=1).all())  # no study loses every modality
        assert torch.all(mixed["images"][~both] == 0)  # an absent modality stays zero-filled
        for i in range(4):  # studies 1 and 2 share no modality: neither is mixed with the other
            assert {i, int(perm[i])} != {1, 2}


def test_mixup_objective_is_the_weighted_loss_of_both_labels() -> None:
    model = medformer(seed=0)
    model.train()
    ds = datasets(n2d=8, n3d=0)["c2d"]
    batch = collate([ds[i] for i in range(8)])
    torch.manual_seed(3)
    loss, _logs = SupervisedObjective(mixup=0.4)(model, batch)
    torch.manual_seed(3)
    mixed, perm, lam = mixup(batch, 0.4)
    key = model.tasks_for("c2d", 2)[0]
    spec = task_spec(model, key)
    out = model(mixed, tasks=[key])[key]
    y = batch["labels"][spec.key]
    expected = lam * task_loss(spec, out, y) + (1 - lam) * task_loss(spec, out, y[perm])
    torch.testing.assert_close(loss, expected)
    plain, _ = SupervisedObjective()(model, batch)
    assert not torch.allclose(loss, plain)


def test_mixup_counts_only_pairs_labelled_in_both() -> None:
    model = medformer(seed=0)
    ds = datasets(n2d=8, n3d=0)["c2d"]
    batch = collate([ds[i] for i in range(8)])
    key = model.tasks_for("c2d", 2)[0]
    spec = task_spec(model, key)
    batch["has_label"][spec.key] = torch.tensor([True] * 4 + [False] * 4)
    torch.manual_seed(5)
    loss, _ = SupervisedObjective(mixup=1.0)(model, batch)
    torch.manual_seed(5)
    mixed, perm, lam = mixup(batch, 1.0)
    both = batch["has_label"][spec.key] & batch["has_label"][spec.key][perm]
    out = model(mixed, tasks=[key])[key][both]
    y = batch["labels"][spec.key]
    expected = lam * task_loss(spec, out, y[both]) + (1 - lam) * task_loss(spec, out, y[perm][both])
    torch.testing.assert_close(loss, expected)


def test_mixup_alpha_is_checked() -> None:
    with pytest.raises(ValueError, match="alpha > 0"):
        mixup(batch_of(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, dtype=torch.bool)), 0.0)
    with pytest.raises((ConfigError, ValueError), match="mixup"):
        FinetuneSection(mixup=-0.1)
