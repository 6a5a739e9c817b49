"""Images to tokens and back: patchify one modality at a time, sin-cos positions for any grid.

A 2D image ``H x W`` or a 3D volume ``D x H x W`` is zero-padded at the end of each axis to a multiple of
the patch size ``p``, cut into non-overlapping ``p^d`` patches and projected with one shared Linear
(single input channel). The Linear on unfolded patches is the same map as a Conv with stride = kernel,
but a single large matmul, which is what a CPU (or a GPU) runs fastest.

Every modality of a study is tokenized on its own with the same projection, so one model takes any
number of modalities; which modality a token came from is told by a learned embedding (added in the
Input Adaptformer), where it sits by a fixed sin-cos embedding of its grid position, computed for the
actual grid so that a 28x28, 64x64 or 96^3 input needs no retraining or interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padded_shape(spatial: tuple[int, ...], patch_size: int) -> tuple[int, ...]:
    """The spatial shape rounded up to a multiple of the patch size."""
    return tuple(math.ceil(s / patch_size) * patch_size for s in spatial)


def pad_to_multiple(x: Tensor, patch_size: int) -> Tensor:
    """Zero-pad ``(B, C, *spatial)`` at the end of each spatial axis to a multiple of ``patch_size``."""
    spatial = tuple(x.shape[2:])
    target = padded_shape(spatial, patch_size)
    if target == spatial:
        return x
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target)):  # F.pad lists the last axis first
        pad += [0, t - s]
    return F.pad(x, pad)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(B, C, *spatial)``, spatial a multiple of ``p`` -> ``(B, C, G, p^d)``, cells in row-major order."""
    b, c, *spatial = x.shape
    p, d = patch_size, len(spatial)
    grid = [s // p for s in spatial]
    x = x.reshape(b, c, *[n for g in grid for n in (g, p)])  # (B, C, g0, p, g1, p[, g2, p])
    grid_axes = [2 + 2 * i for i in range(d)]
    patch_axes = [3 + 2 * i for i in range(d)]
    x = x.permute(0, 1, *grid_axes, *patch_axes)
    return x.reshape(b, c, math.prod(grid), p**d)


def unpatchify(patches: Tensor, grid: tuple[int, ...], patch_size: int) -> Tensor:
    """Inverse of `patchify`: ``(B, C, G, p^d)`` -> ``(B, C, *[g * p for g in grid])``."""
    b, c = patches.shape[:2]
    p, d = patch_size, len(grid)
    x = patches.reshape(b, c, *grid, *([p] * d))
    order = [0, 1] + [a for i in range(d) for a in (2 + i, 2 + d + i)]  # interleave grid and patch axes
    return x.permute(*order).reshape(b, c, *[g * p for g in grid])


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """The transformer's 1D sin-cos embedding (Vaswani et al. 2017) of integer positions, ``(n, dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@lru_cache(maxsize=64)
def _sincos_table(grid: tuple[int, ...], dim: int) -> Tensor:
    d = len(grid)
    per_axis = (dim // d) // 2 * 2  # an even share of the width per axis; the rest stays zero
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    parts = [_sincos_1d(c.reshape(-1), per_axis) for c in coords]
    table = torch.zeros(math.prod(grid), dim, dtype=torch.float64)
    table[:, : per_axis * d] = torch.cat(parts, dim=1)
    return table.to(torch.float32)


def sincos_position_embedding(
    grid: tuple[int, ...],
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Fixed 2D/3D sin-cos position embedding of a patch grid, ``(prod(grid), dim)``, row-major order.

    Each axis gets an even share of the width (MAE's 2D scheme, extended to 3D); computed for the
    actual grid and cached per device, so any input size works without interpolating a learned table.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _table_on(tuple(int(g) for g in grid), dim, device, dtype or torch.float32)


@lru_cache(maxsize=64)
def _table_on(grid: tuple[int, ...], dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _sincos_table(grid, dim).to(device=device, dtype=dtype)


class PatchTokenizer(nn.Module):
    """Shared patch projection for one dimensionality: single-channel ``p^d`` patches -> ``dim`` features."""

    def __init__(self, ndim: int, patch_size: int, dim: int):
        super().__init__()
        self.ndim, self.patch_size = ndim, patch_size
        self.proj = nn.Linear(patch_size**ndim, dim)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``(B, M, *spatial)`` -> tokens ``(B, M, G, dim)`` and the grid shape (after padding)."""
        x = pad_to_multiple(images, self.patch_size)
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        return self.proj(patchify(x, self.patch_size)), grid


class ConvPatchTokenizer(PatchTokenizer):
    """`PatchTokenizer` plus a patch-local convolutional stem: a small CNN run inside each patch.

    Why: a transformer trained from scratch on a few hundred images learns little from a linear patch
    projection; early convolutions give it the local inductive bias a CNN has (Xiao et al. 2021,
    "Early convolutions help transformers see better"). The convolutions see one patch at a time (zero
    padding at its border), so no pixel reaches a neighbouring patch's token and masking a patch hides
    it completely (MAE stays leak-free). The stem's output is added to the linear projection's.
    """

    def __init__(self, ndim: int, patch_size: int, dim: int, width: int = 32):
        super().__init__(ndim, patch_size, dim)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        down = math.ceil(patch_size / 2)
        self.stem = nn.Sequential(
            conv(1, width, 3, padding=1),
            nn.GELU(),
            conv(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(1),
            nn.Linear(2 * width * down**ndim, dim),
        )

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        x = pad_to_multiple(images, self.patch_size)
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        patches = patchify(x, self.patch_size)  # (B, C, G, p^d)
        b, c, g, _ = patches.shape
        local = patches.reshape(b * c * g, 1, *([self.patch_size] * self.ndim))
        return self.proj(patches) + self.stem(local).reshape(b, c, g, -1), grid


class HybridTokenizer(nn.Module):
    """A convolutional stem over the whole image whose feature map is the token grid (ViT "hybrid").

    Why: on a few hundred training images a transformer with patch tokens learns the task worse than a
    CNN (BreastMNIST test AUC 0.83 against ResNet-18's 0.91); a stem of 3x3 convolutions gives it a
    CNN's local inductive bias (Dosovitskiy et al. 2021, hybrid ViT; Hassani et al. 2021, compact
    convolutional transformers).

    ``log2(p)`` stride-2 stages (two 3x3 convolutions each, widths doubling from ``width``) map a
    ``p``-padded image onto the grid a patch tokenizer gives, so positions, modality embeddings and dense
    heads are unchanged. 3D starts narrower (8 channels, not 32): a full-resolution 3D convolution costs
    ``p`` times a 2D one.

    Each convolution is batch-normalised with running statistics *per collection* and a shared affine
    (Li et al. 2016, AdaBN; Chang et al. 2019, domain-specific batch norm). Per-sample normalisation
    (GroupNorm) erases what a whole image has in common, such as the size of an AdrenalMNIST3D gland
    (validation AUC <= 0.59 with it, 0.83 with batch norm); one set of statistics shared by ultrasound and
    X-ray normalises each with the other's moments at test time. Images of no collection use ``shared``;
    a 3D collection has 2D statistics too, for its slices.
    Statistics follow the module's train/eval mode, not ``requires_grad``: a frozen stem (linear probing)
    still estimates the statistics of a collection it was not pre-trained on, as AdaBN does.

    With ``collection_stems`` each collection also gets its own convolutions and affine (the projection
    onto the tokens stays shared): an ultrasound stem need not fit X-ray edges too. In the multitask
    MedMNIST model it lifted BreastMNIST from 0.885 to 0.896 test AUC and cost PneumoniaMNIST 0.011
    (3 seeds; docs/training.md). A collection added later starts from a fresh stem.

    The convolutions overlap neighbouring patches, so a token also sees pixels of its neighbours: to
    encode a masked subset (MAE), `Medformer.encode` tokenizes again with the hidden patches zeroed.
    """

    def __init__(
        self, ndim: int, patch_size: int, dim: int, width: int | None = None, collection_stems: bool = False
    ):
        super().__init__()
        stages = round(math.log2(patch_size)) if patch_size > 1 else 0
        if 2**stages != patch_size:
            raise ValueError(f"the hybrid tokenizer needs a power-of-two patch size, got {patch_size}")
        self.ndim, self.patch_size, self.collection_stems = ndim, patch_size, collection_stems
        c = width or (32 if ndim == 2 else 8)
        self.units = [(1, c, 1)]  # (in, out, stride) of each convolution
        for i in range(stages):
            self.units += [(c << i, c << (i + 1), 2), (c << (i + 1), c << (i + 1), 1)]
        self.widths = [out for _, out, _ in self.units]
        self.convs, self.weight, self.bias = self._stem()
        self.stats = nn.ModuleDict()  # collection -> running statistics of each convolution
        self.shared = self._statistics()
        self.stems = nn.ModuleDict()  # collection -> its own stem (collection_stems only)
        self.proj = (nn.Conv2d if ndim == 2 else nn.Conv3d)(self.widths[-1], dim, 1)

    def _stem(self) -> tuple[nn.ModuleList, nn.ParameterList, nn.ParameterList]:
        """Freshly initialised convolutions and their (shared-statistics) affine."""
        conv = nn.Conv2d if self.ndim == 2 else nn.Conv3d
        convs = nn.ModuleList(conv(i, o, 3, s, 1, bias=False) for i, o, s in self.units)
        weight = nn.ParameterList(nn.Parameter(torch.ones(w)) for w in self.widths)
        bias = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in self.widths)
        return convs, weight, bias

    def _statistics(self) -> nn.ModuleList:
        norm = nn.BatchNorm2d if self.ndim == 2 else nn.BatchNorm3d
        like = self.convs[0].weight
        return nn.ModuleList(norm(w, affine=False, device=like.device) for w in self.widths)

    def add_collection(self, name: str) -> None:
        """Give a collection its own running statistics and, with ``collection_stems``, its own freshly
        initialised stem (idempotent)."""
        if name not in self.stats:
            self.stats[name] = self._statistics()
        if self.collection_stems and name not in self.stems:
            stem = nn.Module()
            stem.convs, stem.weight, stem.bias = self._stem()
            like = self.proj.weight
            self.stems[name] = stem.to(like.device, like.dtype)

    def forward(self, images: Tensor, collection: str | None = None) -> tuple[Tensor, tuple[int, ...]]:
        """``(B, M, *spatial)`` -> tokens ``(B, M, G, dim)`` and the grid shape (after padding)."""
        if collection is not None and collection not in self.stats:
            raise KeyError(
                f"collection {collection!r} has no {self.ndim}D tokenizer statistics: "
                f"register it with model.add_collection({collection!r}, ndim={self.ndim})"
            )
        stats = self.shared if collection is None else self.stats[collection]
        stem = self.stems[collection] if collection in self.stems else self  # noqa: SIM401 (no .get)
        x = pad_to_multiple(images, self.patch_size)
        b, m, *spatial = x.shape
        grid = tuple(s // self.patch_size for s in spatial)
        x = x.reshape(b * m, 1, *spatial)
        shape = (1, -1) + (1,) * self.ndim
        for conv, norm, w, bias in zip(stem.convs, stats, stem.weight, stem.bias, strict=True):
            x = F.relu(norm(conv(x)) * w.view(shape) + bias.view(shape))
        y = self.proj(x)  # (B * M, dim, *grid)
        return y.flatten(2).transpose(1, 2).reshape(b, m, math.prod(grid), -1), grid


@dataclass
class TokenSet:
    """The tokens of one batch, and what a pretext task needs to know about each of them.

    ``tokens`` hold patch embedding + position + modality embedding, in modality-major order: token
    ``n = m * G + g`` is grid cell ``g`` of the ``m``-th modality in ``modalities``. After `select`, each
    sample holds its own subset; ``modality`` and ``position`` then say where every kept token came from.
    """

    tokens: Tensor  # (B, N, D)
    pad: Tensor | None  # (B, N) bool, True = absent (modality missing in that sample); None = no padding
    modality: Tensor  # (B, N) long: index into `modalities`
    position: Tensor  # (B, N) long: flat index into the patch grid
    grid: tuple[int, ...]  # patch grid shape (of the padded image)
    spatial: tuple[int, ...]  # input spatial shape before padding
    patch_size: int
    modalities: tuple[str, ...]  # the modalities that have tokens in this set (absent-in-all are dropped)
    present: Tensor  # (B, len(modalities)) bool
    collection: str | None
    images: Tensor  # (B, len(modalities), *spatial), absent modalities zeroed: for skip connections
    full: bool = True  # False after `select`: not every token of the grid is here

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def num_patches(self) -> int:
        """Grid cells per modality ``G``."""
        return math.prod(self.grid)

    def __len__(self) -> int:
        return self.tokens.shape[1]

    def select(self, index: Tensor) -> TokenSet:
        """Keep, for each sample, the tokens at ``index`` ``(B, K)`` (MAE's visible ones), in that order."""
        index = index.to(self.tokens.device, torch.long)
        if index.dim() != 2 or index.shape[0] != self.tokens.shape[0]:
            raise ValueError(
                f"visible index must be (batch, K) = ({self.tokens.shape[0]}, K), got {tuple(index.shape)}"
            )
        gather = torch.gather
        return replace(
            self,
            tokens=gather(self.tokens, 1, index[..., None].expand(-1, -1, self.tokens.shape[-1])),
            pad=None if self.pad is None else gather(self.pad, 1, index),
            modality=gather(self.modality, 1, index),
            position=gather(self.position, 1, index),
            full=False,
        )


def scatter_tokens(visible: Tensor, index: Tensor, num_tokens: int, fill: Tensor) -> Tensor:
    """Put per-sample tokens ``(B, K, D)`` back at ``index`` ``(B, K)`` of a ``(B, num_tokens, D)`` sequence
    whose other places hold ``fill`` ``(D,)`` (e.g. MAE's mask token): the inverse of `TokenSet.select`."""
    b, _, d = visible.shape
    out = fill.to(visible.dtype).expand(b, num_tokens, d).clone()
    return out.scatter(1, index[..., None].expand(-1, -1, d), visible)


@dataclass
class Encoded:
    """What the Main Body made of a `TokenSet`: the input of every Output Adaptformer head.

    ``tokens`` is the context after the body: the collection's latent tokens, then the (visible) patch
    tokens in `tokenset` order. ``task_tokens`` holds the body output of each requested task's latent
    token (a reader: it saw the context, the context did not see it).
    """

    tokens: Tensor  # (B, L + N, D)
    pad: Tensor | None  # (B, L + N) bool, True = absent; None = no padding
    num_latents: int
    tokenset: TokenSet
    task_tokens: dict[str, Tensor]  # task key -> (B, D)

    @property
    def patches(self) -> Tensor:
        """The encoded patch tokens ``(B, N, D)``, in `tokenset` order."""
        return self.tokens[:, self.num_latents :]

    def task_token(self, key: str) -> Tensor:
        if key not in self.task_tokens:
            raise KeyError(
                f"task {key!r} was not encoded: call encode(..., tasks=[{key!r}]) "
                f"(encoded: {sorted(self.task_tokens)})"
            )
        return self.task_tokens[key]


def tokens_to_image(values: Tensor, tokens: TokenSet) -> Tensor:
    """Per-token patch values ``(B, N, p^d)`` back to images ``(B, M, *spatial)`` (padding cropped)."""
    b, m = values.shape[0], len(tokens.modalities)
    x = unpatchify(values.reshape(b, m, tokens.num_patches, -1), tokens.grid, tokens.patch_size)
    return x[(..., *[slice(0, s) for s in tokens.spatial])]
