"""Fine-tuning modes: frozen weights stay bit-identical, layer-wise LR decay scales, no-decay groups."""

from __future__ import annotations

import pytest
import torch

from _engine_helpers import Supervised, datasets, flat_state, medformer
from medformer.config import TrainConfig
from medformer.train import finetune_param_groups, fit
from medformer.train.optim import default_param_groups


@pytest.mark.parametrize("mode", ["linear", "attentive"])
def test_probe_modes_train_only_the_heads(tmp_path, mode):
    model = medformer(drop_path=0.1)
    before = flat_state(model)
    groups = finetune_param_groups(model, mode, lr=1e-2, weight_decay=0.05)
    names = [n for g in groups for n in g["names"]]
    assert names and all(n.startswith("output_adaptformer.heads.") for n in names)
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-2, progress=False, checkpoint_every=None, ema_decay=0.5)
    fit(model, [Supervised()], datasets(), cfg, tmp_path, param_groups=groups)
    after = model.state_dict()
    frozen = [k for k in before if not k.startswith("output_adaptformer.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bit-identical
    heads = [k for k in before if k.startswith("output_adaptformer.heads.c2d/")]
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_llrd_scales_by_depth():
    model = medformer()  # depth 2
    d = 0.5
    groups = finetune_param_groups(model, "llrd", lr=1e-3, weight_decay=0.05, layer_decay=d)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    lr = {n: g["lr"] for g in groups for n in g["names"]}
    assert scale["output_adaptformer.heads.c2d/y.out.weight"] == 1.0
    assert scale["body.norm.weight"] == 1.0
    assert scale["body.blocks.1.mlp.fc1.weight"] == d**1
    assert scale["body.blocks.0.attn.qkv.weight"] == d**2
    assert scale["input_adaptformer.tokenizers.2d.proj.weight"] == d**3
    assert scale["input_adaptformer.modality_embed.T1"] == d**3
    assert lr["body.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * d**2)
    assert len(scale) == sum(1 for _ in model.parameters())  # every parameter, once


def test_full_mode_and_default_groups_skip_decay_where_it_hurts():
    model = medformer()
    for groups in (finetune_param_groups(model, "full", 1e-3, 0.05), default_param_groups(model, 0.05)):
        decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
        assert decay["body.blocks.0.attn.qkv.weight"] == 0.05
        assert decay["output_adaptformer.heads.c2d/y.queries"] == 0.0
        for name in (
            "body.blocks.0.norm1.weight",
            "body.blocks.0.mlp.fc1.bias",
            "input_adaptformer.collection_embed.c2d",
            "input_adaptformer.task_embed.c2d/y",
        ):
            assert decay[name] == 0.0, name
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        finetune_param_groups(model, "lora", 1e-3, 0.05)
