"""Domain adaptation: the gradient reversal layer really reverses (and DANN aligns a toy problem), CORAL,
adapter-only adaptation keeps every frozen parameter bit-identical and the old collections' outputs
unchanged, TENT changes only LayerNorm affine parameters, and `medformer adapt` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _engine_helpers import collection, medformer
from _pretext_helpers import single_thread
from medformer.adapt import (
    AlignmentObjective,
    DomainClassifier,
    adapter_parameter_names,
    add_adapted_collection,
    coral_loss,
    dann_lambda,
    freeze_all_but,
    grad_reverse,
    tent,
)
from medformer.adapt.tta import norm_parameters, prediction_entropy
from medformer.cli import main
from medformer.config import TrainConfig
from medformer.data.dataset import CollectionDataset, collate
from medformer.pretext import MAE, Pretrainer
from medformer.train import fit

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def tiny_train(steps: int = 4) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=1e-2, device="cpu", progress=False, log_every=1)


# -- gradient reversal and DANN ---------------------------------------------------------------------
def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(5, 3))


def test_domain_classifier_learns_while_the_features_get_the_opposite_gradient():
    """The classifier's own gradient is the ordinary one; the encoder's is exactly its negative."""
    torch.manual_seed(0)
    encoder, clf = nn.Linear(4, 8), DomainClassifier(8, hidden=16)
    x, domain = torch.randn(16, 4), (torch.arange(16) % 2).float()

    def grads(lambd: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        encoder.zero_grad(), clf.zero_grad()
        f = encoder(x)
        logits = clf(f, lambd) if lambd is not None else clf.net(f).squeeze(-1)
        F.binary_cross_entropy_with_logits(logits, domain).backward()
        return [p.grad.clone() for p in encoder.parameters()], [p.grad.clone() for p in clf.parameters()]

    enc_plain, clf_plain = grads(None)
    enc_rev, clf_rev = grads(1.0)
    for a, b in zip(clf_plain, clf_rev):
        assert torch.allclose(a, b)
    for a, b in zip(enc_plain, enc_rev):
        assert torch.allclose(a, -b) and a.abs().sum() > 0


def test_dann_aligns_two_shifted_gaussians_on_a_toy_problem():
    """Source N(0, I) vs target N(3 e_0, I) in 2D: after adversarial training the encoder's features of
    the two domains are much closer, and the domain classifier is near chance."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(256, 2, generator=g)
    tgt = torch.randn(256, 2, generator=g) + torch.tensor([3.0, 0.0])
    encoder, clf = nn.Linear(2, 2), DomainClassifier(2, hidden=16)
    opt = torch.optim.Adam([*encoder.parameters(), *clf.parameters()], lr=1e-2)
    labels = torch.cat([torch.zeros(256), torch.ones(256)])

    def gap() -> float:
        with torch.no_grad():
            fs, ft = encoder(src), encoder(tgt)
            return float((fs.mean(0) - ft.mean(0)).norm() / torch.cat([fs, ft]).std(0).norm())

    before = gap()
    for _ in range(300):
        logits = clf(encoder(torch.cat([src, tgt])), 1.0)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        acc = float(((clf(encoder(torch.cat([src, tgt]))) > 0).float() == labels).float().mean())
    assert gap() < 0.3 * before
    assert acc < 0.7


def test_dann_lambda_schedule():
    assert dann_lambda(0.0) == 0.0 and dann_lambda(1.0) > 0.99
    assert dann_lambda(0.2) < dann_lambda(0.5) < dann_lambda(0.8)


def test_coral_loss_is_zero_for_equal_covariances_and_training_lowers_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    assert float(coral_loss(x, x + 5.0)) < 1e-9  # a mean shift alone: same covariance
    y = torch.randn(64, 4, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.2])
    w = nn.Parameter(torch.eye(4))
    start = float(coral_loss(x, y @ w).detach())
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(100):
        loss = coral_loss(x, y @ w)
        opt.zero_grad(), loss.backward(), opt.step()
    assert start > 0.01 and float(coral_loss(x, y @ w).detach()) < 0.1 * start


def test_alignment_objective_in_the_engine_trains_the_domain_classifier(tmp_path):
    model = medformer()
    source = {"c2d": CollectionDataset(collection("c2d", 2, 8, seed=1))}
    target = CollectionDataset(collection("c2d", 2, 8, seed=5))
    align = AlignmentObjective("c2d", target, dim=32, method="dann", batch_size=4, total_steps=3)
    before = [p.detach().clone() for p in align.classifier.parameters()]
    other = collate([CollectionDataset(collection("c3d", 3, 2))[0]])
    assert align(model, other) == (None, {})  # not a source batch: nothing to align
    groups = [{"params": [p for p in model.parameters()]}, *align.parameter_groups()]
    result = fit(model, [align], source, tiny_train(3), tmp_path, param_groups=groups)
    assert any("loss/align_dann" in r for r in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, align.classifier.parameters()))
    coral = AlignmentObjective("c2d", target, dim=32, method="coral", batch_size=4)
    loss, logs = coral(model, collate([source["c2d"][i] for i in range(4)]))
    assert loss.ndim == 0 and loss >= 0 and "coral" in logs


# -- adapter-only adaptation ------------------------------------------------------------------------
def test_adapter_only_adaptation_keeps_frozen_parameters_and_old_outputs_bit_identical(tmp_path):
    model = medformer()
    old_batch = collate([CollectionDataset(collection("c2d", 2, 4, seed=1))[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        old_out = model(old_batch)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    target = collection("site2", 2, 12, seed=7)
    origin = add_adapted_collection(model, "site2", 2, ["T1"], target.tasks, like="c2d")
    assert origin == {"site2/y": "copied"}
    assert torch.equal(
        model.input_adaptformer.collection_embed["site2"], model.input_adaptformer.collection_embed["c2d"]
    )
    names = adapter_parameter_names(model, "site2")
    counts = freeze_all_but(model, names)
    assert names == ["input_adaptformer.collection_embed.site2"]
    assert counts["trained"] == 32 and counts["total"] > 1000 * counts["trained"] / 10

    torch.manual_seed(0)
    wrapper = Pretrainer(model, [MAE(decoder_dim=16, decoder_depth=1, decoder_heads=2)])
    fit(wrapper, wrapper.objectives(), {"site2": CollectionDataset(target)}, tiny_train(4), tmp_path)

    after = dict(model.named_parameters())
    for n, p in frozen_before.items():
        assert torch.equal(p, after[n]), f"{n} changed"  # every old parameter, bit for bit
    latents = model.input_adaptformer.collection_embed
    assert not torch.equal(latents["site2"], latents["c2d"])  # the adapter did learn
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(old_batch)["c2d/y"], old_out["c2d/y"])


def test_a_new_task_gets_a_fresh_trainable_head(tmp_path):
    from medformer.data.study import TaskSpec

    model = medformer()
    origin = add_adapted_collection(model, "site3", 2, ["T1"], [TaskSpec("grade", "multiclass", 3)], "c2d")
    assert origin == {"site3/grade": "new"}
    names = adapter_parameter_names(model, "site3", ["site3/grade"])
    assert any(n.startswith("output_adaptformer.heads.site3/grade.") for n in names)
    assert "input_adaptformer.task_embed.site3/grade" in names
    with pytest.raises(Exception, match="already part of the model"):
        add_adapted_collection(model, "site3", 2, ["T1"], [])


# -- test-time adaptation ---------------------------------------------------------------------------
def test_tent_lowers_entropy_and_changes_only_layernorm_affine_parameters():
    model = medformer()
    batch = collate([CollectionDataset(collection("c2d", 2, 8, seed=3))[i] for i in range(8)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {id(p) for p in norm_parameters(model)}
    logs = tent(model, [batch] * 15, tasks=["c2d/y"], lr=1e-2)
    assert logs["entropy_after"] < logs["entropy_before"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(id(dict(model.named_parameters())[n]) in norms for n in changed)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_segmentation_entropy_is_per_voxel_softmax_entropy():
    uniform = torch.zeros(2, 4, 3, 3, 3)
    assert torch.isclose(prediction_entropy("segmentation", uniform), torch.log(torch.tensor(4.0)))
    sure = torch.zeros(2, 4, 3, 3, 3)
    sure[:, 0] = 50.0
    assert float(prediction_entropy("segmentation", sure)) < 1e-6
    assert prediction_entropy("regression", uniform) is None


# -- the command ------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED.exists(), reason="shared MedMNIST files not present")
def test_medformer_adapt_end_to_end_reports_trained_parameters(tmp_path, capsys, monkeypatch):
    from medformer.data.medmnist import load_medmnist
    from medformer.models import Medformer, MedformerConfig

    monkeypatch.setenv("MEDMNIST_ROOT", str(SHARED))
    col = load_medmnist("breastmnist")
    torch.manual_seed(0)
    model = Medformer(MedformerConfig(dim=32, depth=2, heads=2), collections=[col])
    model.save(tmp_path / "trained")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "adapted"
    argv = [
        "adapt", "--init", str(tmp_path / "trained"), "--collection", "breastmnist", "--output", str(out),
        "--device", "cpu", "--set", "adapt.collection=site2", "--set", "train.steps=3",
        "--set", "train.batch_size=4", "--set", "train.progress=false",
        "--set", "adapt.pretext=[{task: mae, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2}]",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    p = results["parameters"]
    assert p["trained"] == 32 and p["total"] == p["full_finetuning"] > 100 * p["trained"]
    assert results["tasks"] == {"site2/label": "copied"} and results["like"] == col.name
    assert 0 <= results["test"]["site2/label/auc"] <= 1
    assert "trained 32 of" in capsys.readouterr().out
    adapted = Medformer.from_pretrained(out / "model")
    state = adapted.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    assert "site2" in adapted.collections and np.isfinite(results["test"]["site2/label/acc"])
