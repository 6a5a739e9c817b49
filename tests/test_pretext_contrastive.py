"""Contrastive learning: the InfoNCE losses against their definitions, the views, training lowers the
loss, and 2 Gloo processes give the loss and gradients of one process on the same global batch."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _pretext_helpers import batch, embedding_task, global_views, mean_loss, single_thread, tiny_model, train
from medformer.config import AugmentConfig
from medformer.pretext import Contrastive, Pretrainer
from medformer.pretext.contrastive import cross_info_nce, info_nce, pool_tokens, random_resized_crop


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


HELPER = Path(__file__).with_name("_pretext_helpers.py")


def test_info_nce_is_simclrs_nt_xent():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    t = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    expected = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        denominator = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        expected += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denominator) / 6
    loss, _ = info_nce(z1, z2, t)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    aligned, acc = info_nce(z1, z1 + 1e-3 * torch.randn(3, 5), 0.1)  # twins: easy to match
    assert float(aligned) < float(loss) and float(acc) == 1.0


def test_cross_info_nce_is_clips_symmetric_loss():
    torch.manual_seed(1)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.2
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    loss, _ = cross_info_nce(a, b, 0.2)
    torch.testing.assert_close(loss, expected)


def test_random_resized_crop_zooms_into_the_image():
    ramp = torch.linspace(0, 1, 16).expand(4, 1, 16, 16).contiguous()  # brightness = x position
    assert torch.equal(random_resized_crop(ramp, (1.0, 1.0)), ramp)
    torch.manual_seed(0)
    crop = random_resized_crop(ramp, (0.25, 0.25))  # half of each axis
    assert crop.shape == ramp.shape
    span = crop[..., 8, -1] - crop[..., 8, 0]
    torch.testing.assert_close(span, torch.full_like(span, 0.5), atol=1e-5, rtol=0)  # half the ramp
    assert crop.min() >= 0 and crop.max() <= 1  # never outside the image
    volume = torch.rand(2, 1, 8, 8, 8)
    assert random_resized_crop(volume, (0.3, 0.6)).shape == volume.shape


def test_views_differ_and_absent_modalities_stay_empty():
    task = Contrastive()
    present = torch.tensor([[True, False]] * 4)
    b = batch(2, n=4, present=present)
    b["images"][:, 1] = 0
    torch.manual_seed(0)
    views = task.views(b)
    assert views["view1"].shape == b["images"].shape
    assert not torch.allclose(views["view1"], views["view2"])
    assert (views["view1"][:, 1] == 0).all() and (views["view2"][:, 1] == 0).all()


def test_pooling_ignores_absent_modalities():
    model = tiny_model()
    present = torch.tensor([[True, False], [True, True]])
    b = batch(2, n=2, present=present)
    enc = model.encode(model.tokenize(b["images"], b["modalities"], present, b["collection"]))
    pooled = pool_tokens(enc)
    torch.testing.assert_close(pooled[0], enc.patches[0, :4].mean(0))  # 2x2 grid of the present modality
    torch.testing.assert_close(pooled[1], enc.patches[1].mean(0))


def test_loss_decreases_on_a_tiny_batch():
    model = tiny_model()
    mild = AugmentConfig(flip=0.5, intensity_scale=0.2, noise=0.02)  # 8-pixel images: gentle views
    task = Contrastive(temperature=0.2, hidden_dim=64, proj_dim=32, crop_scale=(0.5, 1.0), augment=mild)
    Pretrainer(model, [task])
    batches = [batch(2, n=8, size=16, seed=1), batch(3, n=8, size=8, seed=2)]
    before = mean_loss(task, model, batches)
    assert before == pytest.approx(math.log(15), abs=0.1)  # 16 views: chance is 1 in 15
    train(task, model, batches, steps=30)
    after = mean_loss(task, model, batches)
    assert after < 0.9 * before, (before, after)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args: dict, out: Path) -> None:
    """Run the helper as 2 Gloo ranks (what torchrun does)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, str(HELPER), json.dumps({**args, "output": str(out)})]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for rank, p in enumerate(procs):
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"


def single_process(name: str, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model()
    task = embedding_task(name, model)
    loss, _ = task.loss(model, global_views(name, n))
    loss.backward()
    named = {f"model.{k}": p for k, p in model.named_parameters()}
    named |= {f"task.{k}": p for k, p in task.named_parameters()}
    return loss.detach(), {k: p.grad for k, p in named.items() if p.grad is not None}


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    """Negatives gathered from both ranks, gradients flowing back through the gather: the mean loss and
    the averaged gradients equal one process's on all 8 studies (a gather without gradients, or without
    the sum in its backward pass, gives other gradients). For SimCLR and for the slice/volume loss."""
    tasks = ["contrastive", "crossdim"]
    two_ranks({"tasks": tasks, "global_batch": 8}, tmp_path)
    for name in tasks:
        ranks = [load_file(str(tmp_path / f"{name}_rank{r}.safetensors")) for r in range(2)]
        loss, grads = single_process(name, 8)
        assert float(ranks[0]["loss"]) == pytest.approx(float(loss), rel=1e-5)
        assert set(ranks[0]) - {"loss"} == set(grads)
        for key, g in grads.items():
            torch.testing.assert_close(ranks[0][key], g, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
            assert torch.equal(ranks[0][key], ranks[1][key])  # the ranks agree: one update for all
