"""Output Adaptformer heads: from the body's tokens to what one task needs.

- `QueryHead` (binary, multiclass, multilabel, ordinal, regression): a few learned query tokens,
  shifted by the task's latent token, cross-attend to the body's tokens (absent modalities masked
  out); their mean goes through a LayerNorm and a Linear to ``out_channels`` values.
- `DenseHead` (segmentation, reconstruction): every patch token is projected to its patch's pixels x
  channels (a learned pixel shuffle), the modalities of one grid cell are averaged, and a light
  convolution refines the map at full resolution together with a skip from the input image.

Output widths follow `TaskSpec.out_channels`. Ordinal tasks give one logit per class by default: the
MedMNIST convention, so its evaluator (softmax, one-vs-rest AUC, argmax ACC) applies unchanged. With
``ordinal="cumulative"`` they give ``K - 1`` cumulative logits ``logit P(y > k)`` instead (CORAL-style,
Cao et al. 2020); `cumulative_to_class_probs` turns them into class probabilities.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.data.study import TaskSpec
from medformer.models.body import MLP
from medformer.models.tokenizers import Encoded, unpatchify

OrdinalMode = Literal["classes", "cumulative"]


def head_width(spec: TaskSpec, ordinal: OrdinalMode = "classes") -> int:
    """Output channels of a task's head (`TaskSpec.out_channels`, or ``K - 1`` for cumulative ordinal)."""
    if spec.kind == "ordinal" and ordinal == "cumulative":
        return max(spec.num_classes - 1, 1)
    return spec.out_channels


def cumulative_to_class_probs(logits: Tensor) -> Tensor:
    """Cumulative ordinal logits ``(B, K-1)`` (``logit P(y > k)``) -> class probabilities ``(B, K)``.

    ``P(y > k)`` is made non-increasing in ``k`` (running minimum): probabilities are >= 0 and sum to 1.
    """
    above = torch.sigmoid(logits).cummin(dim=1).values
    ones = torch.ones_like(above[:, :1])
    zeros = torch.zeros_like(above[:, :1])
    cum = torch.cat([ones, above, zeros], dim=1)  # P(y > k) for k = -1 .. K-1
    return cum[:, :-1] - cum[:, 1:]


class CrossAttention(nn.Module):
    """Queries attend to a context sequence (multi-head, SDPA, optional key-padding mask)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor, pad: Tensor | None = None) -> Tensor:
        b, nq, d = queries.shape
        h = self.heads
        q = self.q(queries).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if pad is None else ~pad[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class QueryHead(nn.Module):
    """Per-study prediction: learned queries cross-attend to the encoded tokens, then a Linear."""

    def __init__(
        self, key: str, dim: int, heads: int, out_channels: int, num_queries: int = 4, mlp_ratio: float = 1.0
    ):
        super().__init__()
        self.key = key
        self.queries = nn.Parameter(torch.zeros(num_queries, dim))
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_channels)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, enc: Encoded) -> Tensor:
        # the task token's body output shifts every query: the queries ask what this task needs to know
        q = self.queries + enc.task_token(self.key)[:, None, :]
        q = q + self.attn(self.norm_q(q), self.norm_kv(enc.tokens), enc.pad)
        q = q + self.mlp(self.norm_mlp(q))
        return self.out(self.norm_out(q.mean(dim=1)))


class DenseHead(nn.Module):
    """Tokens back to the input grid: ``(B, out_channels, *spatial)`` (or per modality).

    Each token is projected to ``channels x p^d`` values and unpatchified; the modalities of one grid cell
    are averaged over those present (``per_modality=False``, e.g. segmentation), or decoded each on their
    own (``per_modality=True`` -> ``(B, M, out_channels, *spatial)``, e.g. reconstruction). A 3x3(x3)
    convolution then refines the map with a skip from the input image (a shared single-channel conv per
    modality, averaged like the tokens) and a 1x1(x1) convolution gives the output. ``key`` names the task
    whose latent token conditions the tokens (None: no conditioning, e.g. for a pretext head).
    """

    def __init__(
        self,
        key: str | None,
        dim: int,
        out_channels: int,
        ndim: int,
        patch_size: int,
        channels: int = 16,
        skip: bool = True,
        per_modality: bool = False,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"a dense head is 2D or 3D, got ndim={ndim}")
        self.key, self.ndim, self.patch_size = key, ndim, patch_size
        self.channels, self.per_modality = channels, per_modality
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, channels * patch_size**ndim)
        self.skip = conv(1, channels, 3, padding=1) if skip else None
        self.refine = conv(channels * (2 if skip else 1), channels, 3, padding=1)
        self.out = conv(channels, out_channels, 1)

    def forward(self, enc: Encoded) -> Tensor:
        ts = enc.tokenset
        if not ts.full:
            raise ValueError(
                "dense decoding needs a token for every grid cell; fill the dropped ones first "
                "(medformer.models.tokenizers.scatter_tokens) or encode without `visible`"
            )
        if ts.ndim != self.ndim:
            raise ValueError(f"this dense head is {self.ndim}D, the batch is {ts.ndim}D")
        b, m, g = ts.tokens.shape[0], len(ts.modalities), ts.num_patches
        x = enc.patches
        if self.key is not None:
            x = x + enc.task_token(self.key)[:, None, :]
        x = self.norm(x).view(b, m, g, -1)
        weight = ts.present.to(x.dtype)  # (B, M)
        if not self.per_modality:
            # average the present modalities of each cell before the (linear) projection: same, cheaper
            w = weight[:, :, None, None]
            x = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        x = self.proj(x)  # (B, M or 1, G, C * p^d)
        k = x.shape[1]
        x = x.view(b * k, g, self.channels, -1).transpose(1, 2)  # (B*k, C, G, p^d)
        x = unpatchify(x, ts.grid, self.patch_size)
        x = x[(..., *[slice(0, s) for s in ts.spatial])]  # crop the padding away
        if self.skip is not None:
            s = self.skip(ts.images.reshape(b * m, 1, *ts.spatial)).view(b, m, self.channels, *ts.spatial)
            if not self.per_modality:
                w = weight.view(b, m, 1, *[1] * self.ndim)
                s = (s * w).sum(1) / w.sum(1).clamp_min(1)
            x = torch.cat([x, s.reshape(b * k, self.channels, *ts.spatial)], dim=1)
        y = self.out(F.gelu(self.refine(x)))
        return y.view(b, m, *y.shape[1:]) if self.per_modality else y


def make_head(
    key: str,
    spec: TaskSpec,
    dim: int,
    heads: int,
    ndim: int | None,
    patch_size: int | None,
    *,
    num_queries: int = 4,
    head_mlp_ratio: float = 1.0,
    dense_channels: int = 16,
    ordinal: OrdinalMode = "classes",
) -> nn.Module:
    """The head a task's kind calls for."""
    if spec.kind == "segmentation":
        if ndim is None or patch_size is None:
            raise ValueError(
                f"segmentation task {key!r} needs its dimensionality: bind it to a collection registered "
                "with ndim, or pass ndim= to add_task"
            )
        return DenseHead(key, dim, spec.out_channels, ndim, patch_size, channels=dense_channels)
    return QueryHead(
        key, dim, heads, head_width(spec, ordinal), num_queries=num_queries, mlp_ratio=head_mlp_ratio
    )
