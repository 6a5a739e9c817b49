"""Data-parallel training without DDP: we all-reduce the gradients ourselves.

Why not `DistributedDataParallel`: DDP hooks gradient reduction into ``model.forward``. Pretext
objectives call submodules directly (``model.tokenize``, ``model.encode``, ``model.heads[k]``), and which
heads run changes from batch to batch (one collection per step), so DDP would see forwards it did not
wrap and parameters it expected but never got (``find_unused_parameters`` then costs a graph walk every
step and still breaks on direct submodule calls). After the backward pass of the last micro-batch we
instead flatten every trainable gradient into a few ~25 MB buckets (zeros where a rank has no gradient,
so all ranks send the same layout), all-reduce, divide by the world size and copy back. A gradient that
is missing on every rank stays ``None``, so AdamW skips that parameter exactly as a single process would.

Launch with ``torchrun --nproc-per-node N``: `setup` reads RANK / WORLD_SIZE / LOCAL_RANK and starts the
process group (NCCL on CUDA, Gloo on CPU) unless the caller already did.

Contrastive losses need the other ranks' embeddings as negatives: `gather_with_grad` all-gathers them
and sends the gradient back to the rank that made each row (see its docstring for why the backward pass
is a sum).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(use_cuda: bool) -> DistInfo:
    """Join (or start) the process group when one exists or torchrun's variables are set."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_tensors(tensors: Sequence[Tensor], info: DistInfo) -> None:
    """Copy rank 0's values into every rank's tensors (the initial weights: one model, N replicas)."""
    if info.distributed:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_tensor(t: Tensor, info: DistInfo) -> Tensor:
    if info.distributed:
        dist.all_reduce(t)
    return t


def allreduce_gradients(
    params: Sequence[torch.nn.Parameter], info: DistInfo, bucket_bytes: int | None = None
) -> None:
    """Average ``params``' gradients over ranks in place (see the module docstring)."""
    if not info.distributed or not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad)
    live = [p for p, n in zip(params, has_grad.tolist()) if n > 0]
    for bucket in _buckets(live, bucket_bytes or BUCKET_BYTES):
        flat = torch.cat(
            [torch.zeros_like(p).view(-1) if p.grad is None else p.grad.reshape(-1) for p in bucket]
        )
        dist.all_reduce(flat)
        flat /= info.world_size
        offset = 0
        for p in bucket:
            value = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            offset += p.numel()


def _buckets(params: Sequence[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of parameters of one dtype and device, each up to ``limit`` bytes."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if last is None or size + nbytes > limit or (p.dtype, p.device) != (last[0].dtype, last[0].device):
            out.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return out


def average_logs(
    sums: Mapping[str, float], counts: Mapping[str, float], info: DistInfo, device: torch.device
) -> dict[str, float]:
    """Mean of each logged value over every rank's contributions (ranks may log different keys)."""
    keys = sorted(set().union(*gather_objects(sorted(sums), info)))  # the union: a collective on every rank
    if not keys:
        return {}
    t = torch.tensor(
        [[sums.get(k, 0.0) for k in keys], [counts.get(k, 0.0) for k in keys]], dtype=torch.float64
    ).to(device)
    t = sum_tensor(t, info).cpu()
    return {k: float(t[0, i] / t[1, i]) for i, k in enumerate(keys) if t[1, i] > 0}


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows in rank order; backward: sum every rank's gradient of the gathered tensor, keep
    this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


@dataclass
class Gathered:
    """Rows gathered from every rank (rank order): ``sizes[r]`` rows came from rank ``r``."""

    rows: Tensor
    sizes: list[int]
    rank: int

    @property
    def start(self) -> int:
        """Where this rank's own rows begin in ``rows``."""
        return sum(self.sizes[: self.rank])


def gather_with_grad(x: Tensor) -> Gathered:
    """Every rank's ``x`` ``(n_r, ...)`` concatenated in rank order; gradients flow back to each row's rank.

    Each rank's loss uses every rank's rows, so the gradient of a row is the *sum* over ranks of their
    losses' gradients (an all-reduce in the backward pass); `allreduce_gradients` then divides by the
    world size, which gives exactly the gradient of the mean loss of one process that saw the whole
    global batch. Ranks may hold different numbers of rows. Without a process group: ``x`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Gathered(x, [x.shape[0]], 0)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    return Gathered(_GatherWithGrad.apply(x, counts), counts, dist.get_rank())
