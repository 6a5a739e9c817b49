"""Which tokens the encoder sees: random patch masking (MAE) and block masking (BrainMVP).

Masking works on the token sequence of a `TokenSet` (modality-major: token ``m * G + g`` is grid cell
``g`` of modality ``m``), so every modality is masked on its own draw: a cell hidden in T1 may be visible
in T2, and reconstructing it is then partly cross-modal prediction.

Both schemes draw one noise value per token and keep the ``K`` lowest (the argsort trick of MAE, He et
al. 2022): no Python loop, the same ``K`` for every sample of a batch (so the visible tokens stack into
one tensor). Padding tokens (a modality that a sample lacks) get noise above every real token, so they
are never kept while a real token is left.

- `random_masking`: independent noise per token: MAE's uniform random patch masking.
- `block_masking`: one noise value per ``block``^d voxel block, shared by the tokens inside it, so whole
  blocks disappear together (BrainMVP, Rui et al. 2025: 8^3 blocks, 80% masked). Blocks are counted in
  tokens, ``round(block / patch_size)`` per axis (at least one): with the 3D patch size 8, an 8^3 block
  is exactly one token. With a fixed ``K`` per batch at most one block is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from medformer.models.tokenizers import TokenSet


@dataclass
class Masking:
    """Indices into a `TokenSet`'s tokens: ``visible`` ``(B, K)`` (ascending), ``masked`` ``(B, N - K)``,
    and ``mask`` ``(B, N)`` (True = hidden from the encoder)."""

    visible: Tensor
    masked: Tensor
    mask: Tensor

    @property
    def num_visible(self) -> int:
        return self.visible.shape[1]


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens the encoder keeps: ``round((1 - ratio) * N)``, at least one and at most ``N - 1``."""
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    return min(max(1, round((1 - mask_ratio) * num_tokens)), num_tokens - 1) if num_tokens > 1 else 1


def mask_from_noise(noise: Tensor, keep: int, pad: Tensor | None = None) -> Masking:
    """Keep the ``keep`` tokens of lowest ``noise`` ``(B, N)`` per sample; padding tokens come last."""
    if pad is not None:
        noise = noise + 2.0 * pad.to(noise.dtype)  # noise is in [0, 1): padding sorts after every real token
    order = noise.argsort(dim=1)
    visible = order[:, :keep].sort(dim=1).values
    masked = order[:, keep:].sort(dim=1).values
    mask = torch.ones_like(noise, dtype=torch.bool).scatter(1, visible, False)
    return Masking(visible=visible, masked=masked, mask=mask)


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device if generator else None).to(device)


def random_masking(
    tokens: TokenSet, mask_ratio: float = 0.75, generator: torch.Generator | None = None
) -> Masking:
    """MAE's random patch masking: hide ``mask_ratio`` of each sample's tokens, uniformly at random."""
    b, n = tokens.tokens.shape[:2]
    noise = _uniform((b, n), tokens.tokens.device, generator)
    return mask_from_noise(noise, num_visible(n, mask_ratio), tokens.pad)


def block_ids(grid: tuple[int, ...], block_tokens: int) -> Tensor:
    """The block of each grid cell ``(G,)`` (row-major cells) and, implicitly, the blocks' grid."""
    blocks = [math.ceil(g / block_tokens) for g in grid]
    coords = torch.meshgrid(*[torch.arange(g) // block_tokens for g in grid], indexing="ij")
    ids = torch.zeros(math.prod(grid), dtype=torch.long)
    for c, nb in zip(coords, blocks):
        ids = ids * nb + c.reshape(-1)
    return ids


def block_masking(
    tokens: TokenSet,
    mask_ratio: float = 0.8,
    block: int = 8,
    generator: torch.Generator | None = None,
) -> Masking:
    """BrainMVP's block masking: hide whole ``block``^d voxel blocks (see the module docstring)."""
    b, n = tokens.tokens.shape[:2]
    k = max(1, round(block / tokens.patch_size))
    ids = block_ids(tokens.grid, k).to(tokens.tokens.device)  # (G,)
    num_blocks = int(ids.max()) + 1
    m = len(tokens.modalities)
    per_block = _uniform((b, m, num_blocks), tokens.tokens.device, generator)
    noise = per_block[:, :, ids].reshape(b, m * tokens.num_patches)  # modality-major, like the tokens
    if noise.shape[1] != n:
        raise ValueError("block masking needs the full token set (mask before selecting tokens)")
    return mask_from_noise(noise, num_visible(n, mask_ratio), tokens.pad)


def make_masking(
    tokens: TokenSet,
    kind: str,
    mask_ratio: float,
    block: int = 8,
    generator: torch.Generator | None = None,
) -> Masking:
    """``kind`` ``"random"`` or ``"block"`` (see above)."""
    if kind == "random":
        return random_masking(tokens, mask_ratio, generator)
    if kind == "block":
        return block_masking(tokens, mask_ratio, block, generator)
    raise ValueError(f"unknown masking {kind!r} (random, block)")
