"""The Main Body: a pre-norm transformer encoder (ViT style) shared by every collection and task.

The sequence is ``[context | readers]``. The context (latent tokens + patch tokens) attends to itself with
`scaled_dot_product_attention`, with a key-padding mask only when some sample lacks a modality. The
readers (one latent token per requested task) attend to the context and to themselves, but no token
attends to a reader: so a task's output does not depend on which other tasks are asked for in the same
call, and adding a task to a trained model leaves every other output exactly as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Named sizes: the ViT-Ti/S/B widths (Dosovitskiy et al. 2021; DeiT), 12 layers, MLP ratio 4.
PRESETS: dict[str, dict[str, int | float]] = {
    "tiny": {"dim": 192, "depth": 12, "heads": 3, "mlp_ratio": 4.0},  # ~5.4M parameters
    "small": {"dim": 384, "depth": 12, "heads": 6, "mlp_ratio": 4.0},  # ~21.5M
    "base": {"dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0},  # ~85.6M
}


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): skip a residual branch for a random subset of samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The context attends to itself through SDPA. Readers (few) attend to the context and to themselves
    each alone, written out by hand: ``R`` query rows cost next to nothing, and keeping them out of the
    context's SDPA call keeps that call exactly the plain (mask-free, copy-free) one.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, N, D)`` -> q, k, v, each ``(B, heads, N, D / heads)``."""
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge_heads(self, x: Tensor) -> Tensor:
        """``(B, heads, N, D / heads)`` -> the output projection of ``(B, N, D)``."""
        b, h, n, e = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, h * e))

    def forward(
        self, x: Tensor, readers: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` ``(B, C, D)`` context, ``readers`` ``(B, R, D)`` or None, ``mask`` ``(B, 1, 1, C)`` (True:
        may attend) or None -> the attention outputs of both."""
        q, k, v = self.split_heads(x)
        out = self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        if readers is None:
            return out, None
        qr, kr, vr = self.split_heads(readers)
        scale = qr.shape[-1] ** -0.5
        to_context = (qr @ k.transpose(-2, -1)) * scale  # (B, H, R, C)
        if mask is not None:
            to_context = to_context.masked_fill(~mask, float("-inf"))
        to_self = (qr * kr).sum(-1, keepdim=True) * scale  # (B, H, R, 1): each reader sees only itself
        p = torch.cat([to_context, to_self], dim=-1).softmax(dim=-1)
        return out, self.merge_heads(p[..., :-1] @ v + p[..., -1:] * vr)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); readers share its weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, readers: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        a, ar = self.attn(self.norm1(x), None if readers is None else self.norm1(readers), mask)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if readers is not None:
            readers = readers + self.drop_path(ar)
            readers = readers + self.drop_path(self.mlp(self.norm2(readers)))
        return x, readers


class Body(nn.Module):
    """A stack of `Block`s and a final LayerNorm.

    ``drop_path`` is the stochastic-depth rate of the last block (rising linearly from 0 over depth);
    ``checkpointing`` recomputes each block's activations in the backward pass (less memory, ~30% more
    compute) while training.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        checkpointing: bool = False,
    ):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = checkpointing

    def forward(self, x: Tensor, pad: Tensor | None = None, num_readers: int = 0) -> Tensor:
        """Encode ``x`` ``(B, C + R, D)``: C context tokens, then R readers (see the module docstring).

        ``pad`` ``(B, C)`` is True where a context token is absent (it is then never attended to);
        None means no padding and takes the mask-free attention path.
        """
        c = x.shape[1] - num_readers
        context, readers = (x, None) if num_readers == 0 else (x[:, :c], x[:, c:])
        mask = None if pad is None else ~pad[:, None, None, :]  # SDPA's convention: True = may attend
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                context, readers = checkpoint(block, context, readers, mask, use_reentrant=False)
            else:
                context, readers = block(context, readers, mask)
        return self.norm(context if readers is None else torch.cat([context, readers], dim=1))


def body_matmul_params(body: Body) -> int:
    """Weights that take part in a matmul per token (Linear weights): the ``P`` of the 6*P*N FLOP rule."""
    return sum(m.weight.numel() for m in body.modules() if isinstance(m, nn.Linear))
