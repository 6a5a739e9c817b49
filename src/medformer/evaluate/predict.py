"""Run a model over a split and score every task it has for that collection.

Classification and regression outputs are gathered whole (they are small) and scored at the end with
the MedMNIST-compatible metrics; segmentation is scored batch by batch (Dice, optionally HD95) so
volumes never pile up in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medformer.data.dataset import collate
from medformer.evaluate.metrics import classification_metrics, regression_metrics, segmentation_metrics
from medformer.losses import task_spec


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors (images, present, labels, has_label) to `device`."""
    out = dict(batch)
    out["images"] = batch["images"].to(device, non_blocking=True)
    out["present"] = batch["present"].to(device, non_blocking=True)
    out["labels"] = {k: v.to(device, non_blocking=True) for k, v in batch["labels"].items()}
    out["has_label"] = {k: v.to(device, non_blocking=True) for k, v in batch["has_label"].items()}
    return out


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, batch_size: int = 64, device: torch.device | str = "cpu"
) -> dict[str, dict[str, np.ndarray]]:
    """Per-study outputs of every non-dense task: ``{key: {"outputs", "labels", "has_label", "ids"}}``."""
    device = torch.device(device)
    model.eval()
    gathered: dict[str, dict[str, list]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch = to_device(batch, device)
        keys = [
            k
            for k in model.tasks_for(batch["collection"], batch["images"].dim() - 2)
            if task_spec(model, k).kind != "segmentation"
        ]
        outputs = model(batch, tasks=keys)
        for key in keys:
            spec = task_spec(model, key)
            g = gathered.setdefault(key, {"outputs": [], "labels": [], "has_label": [], "ids": []})
            g["outputs"].append(outputs[key].float().cpu().numpy())
            g["labels"].append(batch["labels"][spec.key].cpu().numpy())
            g["has_label"].append(batch["has_label"][spec.key].cpu().numpy())
            g["ids"].extend(batch["ids"])
    return {
        k: {name: (np.concatenate(v) if name != "ids" else np.asarray(v)) for name, v in g.items()}
        for k, g in gathered.items()
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    hd95: bool = False,
    targets_scale: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, float]:
    """Metrics of every task the model runs on this dataset's collection: ``{"<key>/<metric>": value}``.

    Classification: ``auc`` and ``acc`` (MedMNIST evaluator); regression: ``mse``, ``mae`` (in the
    label's units: standardised outputs are scaled back with ``targets_scale``); segmentation:
    ``dice_<class>``, ``dice_mean`` (and ``hd95_*`` when asked).
    """
    device = torch.device(device)
    model.eval()
    results: dict[str, float] = {}
    for key, g in predict(model, dataset, batch_size, device).items():
        spec = task_spec(model, key)
        keep = g["has_label"].astype(bool)
        if not keep.any():
            continue
        outputs, labels = g["outputs"][keep], g["labels"][keep]
        if spec.kind == "regression":
            if targets_scale and key in targets_scale:
                mean, std = targets_scale[key]
                outputs = outputs * std + mean
            metrics = regression_metrics(labels, outputs)
        else:
            metrics = classification_metrics(spec, labels, outputs)
        results.update({f"{key}/{m}": v for m, v in metrics.items()})
    results.update(_segmentation(model, dataset, batch_size, device, hd95))
    return results


def _segmentation(
    model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, hd95: bool
) -> dict[str, float]:
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}  # per metric: HD95 is undefined (NaN) for empty classes
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch = to_device(batch, device)
        keys = [
            k
            for k in model.tasks_for(batch["collection"], batch["images"].dim() - 2)
            if task_spec(model, k).kind == "segmentation"
        ]
        if not keys:
            return {}
        outputs = model(batch, tasks=keys)
        for key in keys:
            spec = task_spec(model, key)
            mask = batch["has_label"][spec.key]
            if not bool(mask.any()):
                continue
            pred = outputs[key][mask].argmax(1).cpu().numpy()
            truth = batch["labels"][spec.key][mask].cpu().numpy()
            n = int(mask.sum())
            metrics = segmentation_metrics(pred, truth, spec.num_classes, hd95=hd95)
            acc, cnt = sums.setdefault(key, {}), counts.setdefault(key, {})
            for m, v in metrics.items():
                if np.isfinite(v):
                    acc[m] = acc.get(m, 0.0) + v * n
                    cnt[m] = cnt.get(m, 0) + n
    return {f"{k}/{m}": v / counts[k][m] for k, acc in sums.items() for m, v in acc.items()}
