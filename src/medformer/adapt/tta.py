"""Test-time adaptation by entropy minimisation (TENT, Wang et al. 2021), on normalisation layers.

TENT adapts a trained model to the test distribution with no labels: only the affine parameters of the
normalisation layers change, by gradient steps that lower the entropy of the model's own predictions
on the test batches. Wang et al. adapt BatchNorm (statistics and affine); a Medformer has LayerNorm,
whose statistics are per token, so here only the LayerNorm scales and shifts (``weight``, ``bias``)
adapt, as in TENT's transformer variants. Everything else stays bit-identical.

Entropy per task kind: softmax over classes (multiclass, ordinal; segmentation per voxel), the
Bernoulli entropy of each sigmoid output (binary, multilabel). Regression outputs are not used.

`medformer evaluate --run DIR --tent` scores a run this way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medformer.data.dataset import collate
from medformer.losses import task_spec


def prediction_entropy(kind: str, logits: Tensor) -> Tensor | None:
    """Mean entropy of the predictions of one task kind (``None`` for kinds without one)."""
    logits = logits.float()
    if kind in ("multiclass", "ordinal", "segmentation") and logits.shape[1] > 1:  # per voxel for masks
        logp = logits.log_softmax(1)
        return -(logp.exp() * logp).sum(1).mean()
    if kind in ("binary", "multilabel") or (kind == "ordinal" and logits.shape[1] == 1):
        p = torch.sigmoid(logits)
        return (-(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))).mean()
    return None


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every LayerNorm of the model (input side, body and heads)."""
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the LayerNorm affine parameters; return those."""
    params = norm_parameters(model)
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def tent(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    tasks: Sequence[str] | None = None,
    lr: float = 1e-3,
    steps: int = 1,
    collection: str | None = None,
) -> dict[str, float]:
    """Adapt ``model`` in place: ``steps`` Adam steps of entropy minimisation per batch of ``batches``
    (one pass: "online" TENT). ``tasks``: the task keys whose predictions count (default: the batch
    collection's). Returns the mean entropy before the first and after the last update."""
    flags = [p.requires_grad for p in model.parameters()]
    params = configure_tent(model)
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    model.eval()  # no dropout / drop-path: the model predicts as it will at test time
    first = last = float("nan")
    for batch in batches:
        for _ in range(steps):
            loss = batch_entropy(model, batch, tasks, collection)
            if loss is None:
                break
            first = float(loss.detach()) if first != first else first
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = float(loss.detach())
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    return {"entropy_before": first, "entropy_after": last}


def batch_entropy(
    model: nn.Module, batch: Mapping[str, Any], tasks: Sequence[str] | None, collection: str | None = None
) -> Tensor | None:
    """The summed mean prediction entropy of ``tasks`` on one batch (``None`` if no task has one)."""
    collection = collection or batch["collection"]
    keys = list(tasks) if tasks is not None else model.tasks_for(collection, batch["images"].dim() - 2)
    outputs = model(batch, tasks=keys, collection=collection)
    terms = [prediction_entropy(task_spec(model, k).kind, outputs[k]) for k in keys]
    terms = [t for t in terms if t is not None]
    return torch.stack(terms).sum() if terms else None


def tent_on_dataset(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    epochs: int = 1,
    **options: Any,
) -> dict[str, float]:
    """`tent` over a dataset's batches (shuffled, ``epochs`` passes), e.g. a test split before `evaluate`."""
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
    device = torch.device(device)

    def batches() -> Iterable[dict[str, Any]]:
        for _ in range(epochs):
            for b in loader:
                yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()}

    return tent(model, batches(), **options)
