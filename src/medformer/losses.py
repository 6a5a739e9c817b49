"""Supervised task losses, one per task kind, and the objective that sums them over a batch's tasks.

Only studies that carry a label for a task count towards its loss (``batch["has_label"]``), so a
collection may be partly labelled (label-efficiency runs) and several tasks may label different
studies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.data.mixup import mixup
from medformer.data.study import TaskSpec


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Soft Dice over foreground classes (batch-pooled), the usual companion of cross-entropy."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (total + eps)
    return 1 - dice[1:].mean()


def task_loss(spec: TaskSpec, output: Tensor, target: Tensor, ordinal: str = "classes") -> Tensor:
    """The loss of one task kind, averaged over the given samples.

    binary: BCE on the single logit; multiclass and ordinal (MedMNIST convention: class logits):
    cross-entropy; ordinal with ``ordinal="cumulative"``: BCE on the K-1 "label > k" logits;
    multilabel: BCE per label; regression: MSE; segmentation: cross-entropy + soft Dice.
    """
    output = output.float()
    if spec.kind == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), target.float().reshape(-1))
    if spec.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(output, target.float().reshape(output.shape))
    if spec.kind == "ordinal" and ordinal == "cumulative":
        k = torch.arange(output.shape[1], device=output.device)
        return F.binary_cross_entropy_with_logits(output, (target.reshape(-1, 1) > k).float())
    if spec.kind in ("multiclass", "ordinal"):
        return F.cross_entropy(output, target.reshape(-1).long())
    if spec.kind == "regression":
        return F.mse_loss(output, target.float().reshape(output.shape))
    if spec.kind == "segmentation":
        target = target.long()
        return F.cross_entropy(output, target) + dice_loss(output, target)
    raise ValueError(f"unknown task kind {spec.kind!r}")


class SupervisedObjective:
    """Sum (or weighted sum) of the task losses of every task the model runs for a batch.

    ``tasks``: task keys to train (default: all the model's tasks for the batch's collection);
    ``task_weights``: optional per-key weights. Regression targets can be standardised with
    ``targets_scale = {key: (mean, std)}`` so their loss is on the scale of the others. ``augment``
    (e.g. `medformer.data.augment.Augment`) is applied to each training batch first; then, with
    ``mixup`` = alpha > 0, each study is mixed with another of the batch (`medformer.data.mixup`) and
    every task's loss is ``lam * loss(y) + (1 - lam) * loss(y[perm])`` over the studies labelled in both.
    """

    name = "supervised"

    def __init__(
        self,
        tasks: list[str] | None = None,
        task_weights: Mapping[str, float] | None = None,
        targets_scale: Mapping[str, tuple[float, float]] | None = None,
        augment: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
        mixup: float = 0.0,
    ):
        self.tasks = tasks
        self.task_weights = dict(task_weights or {})
        self.targets_scale = dict(targets_scale or {})
        self.augment = augment
        self.mixup = mixup

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        keys = model.tasks_for(batch["collection"], batch["images"].dim() - 2)
        if self.tasks is not None:
            keys = [k for k in keys if k in self.tasks]
        labelled = {}
        for key in keys:
            spec = task_spec(model, key)
            mask = batch["has_label"][spec.key]
            if bool(mask.any()):
                labelled[key] = mask
        if not labelled:
            return None, {}
        if self.augment is not None:
            batch = self.augment(batch)
        perm, lam = None, 1.0
        if self.mixup > 0:
            batch, perm, lam = mixup(batch, self.mixup)
        outputs = model(batch, tasks=list(labelled))
        total: Tensor | None = None
        logs: dict[str, float] = {}
        for key, mask in labelled.items():
            spec = task_spec(model, key)
            ordinal = getattr(model.tasks[key], "ordinal", "classes")
            labels = batch["labels"][spec.key]
            if key in self.targets_scale:
                mean, std = self.targets_scale[key]
                labels = (labels - mean) / std
            if perm is None:
                loss = task_loss(spec, outputs[key][mask], labels[mask], ordinal)
            else:
                mask = mask & mask[perm]
                if not bool(mask.any()):
                    continue
                out = outputs[key][mask]
                loss = lam * task_loss(spec, out, labels[mask], ordinal) + (1 - lam) * task_loss(
                    spec, out, labels[perm][mask], ordinal
                )
            logs[f"loss/{key}"] = float(loss.detach())
            weighted = self.task_weights.get(key, 1.0) * loss
            total = weighted if total is None else total + weighted
        return total, logs


def task_spec(model: nn.Module, key: str) -> TaskSpec:
    """The TaskSpec of a model's task: Medformer keeps TaskEntry records, the CNN baselines TaskSpecs."""
    entry = model.tasks[key]
    return getattr(entry, "spec", entry)
