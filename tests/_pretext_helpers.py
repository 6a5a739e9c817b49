"""Tiny models and batches for the pretext-task tests; also a script (run by the 2-process contrastive
test): ``python tests/_pretext_helpers.py '{"output": ..., "task": "contrastive"}'``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from medformer.models import Medformer, MedformerConfig
from medformer.pretext import PretextTask
from medformer.train import distributed

MODALITIES = ("T1", "T2")


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models gain nothing from more, and on a busy machine each extra
    thread makes every small op wait for a descheduled partner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_model(seed: int = 0, dim: int = 32, depth: int = 2, tokenizer: str = "linear") -> Medformer:
    """Two collections (2D and 3D), two modalities, patch size 4 in both dimensionalities."""
    torch.manual_seed(seed)
    model = Medformer(
        MedformerConfig(dim=dim, depth=depth, heads=2, patch_size_2d=4, patch_size_3d=4, tokenizer=tokenizer),
        modalities=MODALITIES,
    )
    model.add_collection("c2d", 2)
    model.add_collection("c3d", 3)
    return model


def blobs(n: int, ndim: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images ``(n, 2, *spatial)`` in [0, 1]: bright blobs at random places (structure an
    encoder can learn, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * ndim, indexing="ij"))
    centres = torch.rand(n, 2, ndim, generator=g) * 1.4 - 0.7
    widths = 0.15 + 0.3 * torch.rand(n, 2, 1, generator=g)
    dist = ((coords[None, None] - centres.view(n, 2, ndim, *[1] * ndim)) ** 2).sum(2)
    x = torch.exp(-dist / widths.view(n, 2, *[1] * ndim) ** 2)
    return torch.where(x < 1e-4, 0.0, x)  # no denormal floats (they make CPU arithmetic crawl)


def batch(ndim: int, n: int = 6, size: int = 8, seed: int = 0, present: torch.Tensor | None = None) -> dict:
    """A loader-style batch of one collection (``c2d`` or ``c3d``)."""
    return {
        "images": blobs(n, ndim, size, seed),
        "present": torch.ones(n, 2, dtype=torch.bool) if present is None else present,
        "modalities": MODALITIES,
        "collection": f"c{ndim}d",
    }


def train(
    task: PretextTask, model: torch.nn.Module, batches: list[dict], steps: int, lr: float = 3e-3
) -> None:
    """A few Adam steps of one task over the batches (in turn)."""
    params = list(model.parameters()) + list(task.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for i in range(steps):
        loss, _ = task(model, batches[i % len(batches)])
        if loss is None:
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()


def mean_loss(task: PretextTask, model: nn.Module, batches: list[dict], seed: int = 123) -> float:
    """The task's loss with its random draws (masks, views, slices) fixed by ``seed``: comparable
    before and after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        values = [task(model, b)[0] for b in batches]
    return float(torch.stack([v for v in values if v is not None]).mean())


def embedding_task(name: str, model: nn.Module) -> PretextTask:
    """A contrastive or cross-dimensional task attached to ``model``, its heads drawn from seed 1."""
    from medformer.pretext import Contrastive, CrossDimensional

    task = Contrastive() if name == "contrastive" else CrossDimensional()
    torch.manual_seed(1)
    task.attach(model)
    return task


def main(args: dict) -> None:
    """One rank of the 2-process test: for each task, this rank's share of a fixed global batch, the loss
    (averaged over ranks) and the gradients (averaged as the engine does)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo")
    info = distributed.DistInfo(rank, world, rank)
    n = args["global_batch"]
    share = slice(rank * n // world, (rank + 1) * n // world)
    for name in args["tasks"]:
        model = tiny_model()
        task = embedding_task(name, model)
        views = global_views(name, n)
        loss, _ = task.loss(
            model, {k: v[share] if isinstance(v, torch.Tensor) else v for k, v in views.items()}
        )
        loss.backward()
        named = {f"model.{k}": p for k, p in model.named_parameters()}
        named |= {f"task.{k}": p for k, p in task.named_parameters()}
        distributed.allreduce_gradients(list(named.values()), info)
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        grads = {k: p.grad.contiguous() for k, p in named.items() if p.grad is not None}
        out = Path(args["output"]) / f"{name}_rank{rank}.safetensors"
        save_file({**grads, "loss": (mean / world).reshape(1)}, str(out))
    torch.distributed.destroy_process_group()


def global_views(task: str, n: int) -> dict:
    """The fixed views of the global batch (the same in every process)."""
    torch.manual_seed(7)
    if task == "contrastive":
        b = batch(2, n=n, seed=3)
        return {
            **b,
            "view1": b["images"] + 0.05 * torch.randn_like(b["images"]),
            "view2": b["images"].flip(-1),
        }
    b = batch(3, n=n, seed=3)
    return {**b, "slices": b["images"][:, :, 3], "slice_axis": 0}


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
