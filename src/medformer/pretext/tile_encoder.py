"""One embedding per puzzle tile, from a Medformer or from a small CNN (the jigsaw papers' setting).

The puzzle task does not care which network embeds a tile: `embed_tiles(model, tiles, ...)` gives a
``(K, D)`` feature per tile and `tile_feature_dim(model)` its width.

- **Medformer**: the tiles are tokenized as a batch of small single-modality images (each tile with
  its own modality's learned embedding; tiles are grouped by modality, so one call per modality), run
  through the Main Body with the collection's latent tokens, and mean-pooled over their patch tokens.
- **CNN** (`CNNTileEncoder`): a small MONAI residual CNN shared by all tiles, as in Noroozi & Favaro
  (2016) and Taleb et al. (2019), whose encoders are CNNs that later become a U-Net's encoder. It sees
  one channel and no modality label: modality-agnostic by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn


class CNNTileEncoder(nn.Module):
    """Residual CNN (MONAI ``ResidualUnit``s, stride 2 after the first) -> adaptive pool to 2^d -> Linear.

    Pooling to a 2^d grid rather than to one vector keeps where in the tile things are, which is what a
    tile's position is read from.
    """

    def __init__(self, ndim: int, channels: Sequence[int] = (32, 64, 128), dim: int = 256):
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim, self.dim = ndim, dim
        units, previous = [], 1
        for i, c in enumerate(channels):
            units.append(
                ResidualUnit(ndim, previous, c, strides=1 if i == 0 else 2, subunits=2, norm="batch")
            )
            previous = c
        self.features = nn.Sequential(*units)
        self.pool = (nn.AdaptiveAvgPool2d if ndim == 2 else nn.AdaptiveAvgPool3d)(2)
        self.proj = nn.Linear(previous * 2**ndim, dim)

    def embed_tiles(self, tiles: Tensor) -> Tensor:
        """``(K, 1, *tile)`` -> ``(K, dim)``."""
        return self.proj(self.pool(self.features(tiles)).flatten(1))

    def forward(self, tiles: Tensor) -> Tensor:
        return self.embed_tiles(tiles)


def tile_feature_dim(model: nn.Module) -> int:
    """Width of `embed_tiles`' features for ``model``."""
    if hasattr(model, "tokenize") and hasattr(model, "encode"):
        return int(model.config.dim)
    if hasattr(model, "embed_tiles"):
        return int(model.dim)
    raise TypeError(
        f"{type(model).__name__} cannot embed puzzle tiles: use a Medformer or a model with "
        "`embed_tiles(tiles) -> (K, dim)` and a `dim` attribute (e.g. CNNTileEncoder)"
    )


def embed_tiles(
    model: nn.Module,
    tiles: Tensor,
    modality: Tensor,
    modalities: Sequence[str],
    collection: str | None = None,
) -> Tensor:
    """Embed ``tiles (K, *tile)``, tile ``k`` cut from modality ``modalities[modality[k]]`` -> ``(K, D)``."""
    if not (hasattr(model, "tokenize") and hasattr(model, "encode")):
        tile_feature_dim(model)  # a clear error for a model that cannot do this
        return model.embed_tiles(tiles[:, None].float())
    if collection is not None and collection not in getattr(model, "collections", {}):
        collection = None  # an unregistered collection: no latent tokens rather than an error
    tokens, tokenset = None, None
    for m in modality.unique().tolist():
        index = torch.nonzero(modality == m).flatten()
        part = model.tokenize(tiles[index, None], [modalities[m]], None, collection)
        if tokens is None:
            tokens = part.tokens.new_empty(len(tiles), *part.tokens.shape[1:])
            tokenset = part
        tokens = tokens.index_copy(0, index, part.tokens)
    assert tokenset is not None and tokens is not None
    k, g = tokens.shape[:2]
    present = nn.functional.one_hot(modality, len(modalities)).bool()  # (K, M): each tile has one
    images = tiles.new_zeros(k, len(modalities), *tiles.shape[1:])
    images[torch.arange(k, device=tiles.device), modality] = tiles
    combined = replace(  # the groups' tokens in tile order, described as one set
        tokenset,
        tokens=tokens,
        pad=None,
        modality=modality[:, None].expand(k, g),
        position=tokenset.position[:1].expand(k, -1),
        modalities=tuple(modalities),
        present=present,
        images=images,
    )
    return model.encode(combined).patches.mean(1)


__all__ = ["CNNTileEncoder", "embed_tiles", "tile_feature_dim"]
