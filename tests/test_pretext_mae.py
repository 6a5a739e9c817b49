"""Masked image modelling: the masks (random and block), no leak of hidden pixels into the encoder,
the loss (hidden, real tokens only) and that training lowers it, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from _pretext_helpers import batch, mean_loss, single_thread, tiny_model, train
from medformer.pretext import MAE, Pretrainer
from medformer.pretext.mae import patch_targets, pixel_mask
from medformer.pretext.masking import block_ids, block_masking, mask_from_noise, num_visible, random_masking


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def tokens_of(model, b):
    return model.tokenize(b["images"], b["modalities"], b["present"], b["collection"])


def test_random_masking_partitions_the_tokens_and_keeps_the_ratio():
    model = tiny_model()
    tokens = tokens_of(model, batch(2, size=16))  # 4x4 grid x 2 modalities = 32 tokens
    m = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert m.visible.shape == (6, 8) and m.masked.shape == (6, 24)
    for i in range(6):
        both = torch.cat([m.visible[i], m.masked[i]]).sort().values
        assert torch.equal(both, torch.arange(32))  # every token exactly once
        assert not m.mask[i, m.visible[i]].any() and m.mask[i, m.masked[i]].all()
    # each sample draws its own mask
    assert len({tuple(v.tolist()) for v in m.visible}) > 1


def test_padding_tokens_are_never_kept_while_real_ones_are_left():
    noise = torch.tensor([[0.1, 0.2, 0.9, 0.3]])
    pad = torch.tensor([[True, True, False, False]])
    m = mask_from_noise(noise, 2, pad)
    assert m.visible.tolist() == [[2, 3]]  # the two real tokens, despite their higher noise
    assert num_visible(64, 0.75) == 16 and num_visible(2, 0.99) == 1
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(10, 1.0)


def test_block_masking_hides_whole_blocks():
    model = tiny_model()
    tokens = tokens_of(model, batch(3, size=16))  # 4^3 grid, patch 4: an 8^3 block = 2^3 tokens
    ids = block_ids(tokens.grid, 2)
    assert ids.bincount().tolist() == [8] * 8
    m = block_masking(tokens, 0.75, block=8, generator=torch.Generator().manual_seed(1))
    assert m.mask.float().mean().item() == 0.75
    cells = m.mask.view(6, 2, 64)  # (B, modality, cell)
    for block in range(8):
        state = cells[:, :, ids == block]
        assert (state.all(-1) | ~state.any(-1)).all(), "a block is partly hidden"


@pytest.mark.parametrize("tokenizer", ["linear", "hybrid"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_masking_never_leaks_the_target(ndim, tokenizer):
    """Changing the pixels of hidden patches changes nothing the encoder outputs, but it does change the
    loss (the hidden pixels are the target). The hybrid stem's convolutions reach across patches: it must
    not see a hidden neighbour either."""
    model = tiny_model(tokenizer=tokenizer).eval()
    task = MAE(mask_ratio=0.75)
    Pretrainer(model, [task])
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    b = batch(ndim, n=4, size=12, present=present)  # 12 is not a multiple of the patch: padded grid
    tokens = tokens_of(model, b)
    masking = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    hidden = pixel_mask(masking, tokens)
    assert hidden.shape == b["images"].shape and 0 < hidden.float().mean() < 1
    changed = {**b, "images": torch.where(hidden, torch.rand_like(b["images"]) * 5, b["images"])}
    with torch.no_grad():
        before = task.run(model, b, masking)
        after = task.run(model, changed, masking)
    torch.testing.assert_close(after.encoded.tokens, before.encoded.tokens, rtol=0, atol=0)
    torch.testing.assert_close(after.pred, before.pred, rtol=0, atol=0)  # the decoder sees no pixels either
    assert not torch.equal(after.target, before.target)


def test_loss_scores_hidden_real_tokens_only():
    model = tiny_model()
    task = MAE(mask_ratio=0.5, norm_pix_loss=False)
    Pretrainer(model, [task])
    present = torch.tensor([[True, True], [True, False]])
    b = batch(2, n=2, present=present)
    out = task.run(model, b)
    tokens = out.tokens
    assert torch.equal(out.weight.bool(), out.masking.mask & ~tokens.pad)
    assert torch.equal(out.target, patch_targets(tokens))  # raw pixels without norm_pix_loss
    assert out.pred.shape == out.target.shape == (2, 8, 16)  # 2x2 grid x 2 modalities, 4x4 patches


@pytest.mark.parametrize("masking", ["random", "block"])
def test_loss_decreases_on_a_tiny_batch(masking):
    model = tiny_model()
    task = MAE(mask_ratio=0.75, masking=masking, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    Pretrainer(model, [task])
    batches = [batch(2, size=16, seed=1), batch(3, size=8, seed=2)]
    before = mean_loss(task, model, batches)
    train(task, model, batches, steps=20)
    after = mean_loss(task, model, batches)
    assert after < 0.7 * before, (before, after)


def test_options_are_checked():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_dim"):
        MAE(decoder_dim=30, decoder_heads=4)
    with pytest.raises(RuntimeError, match="attach"):
        MAE().run(tiny_model(), batch(2))


def test_visualise_draws_original_masked_and_reconstruction():
    model = tiny_model()
    task = MAE()
    Pretrainer(model, [task])
    images = task.reconstruct(model, batch(3, n=2))
    assert set(images) == {"original", "masked", "reconstruction"}
    assert images["masked"].isnan().any() and not images["reconstruction"].isnan().any()
    fig = task.visualise(model, batch(2, n=2))
    assert len(fig.axes) == 6  # 2 samples x 3 columns
