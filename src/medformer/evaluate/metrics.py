"""Metrics computed the way the field computes them, so our numbers compare with published ones.

Classification follows the official MedMNIST evaluator (``getAUC`` / ``getACC``):

- binary: AUC of the positive-class score; ACC at threshold 0.5 on that score
- multiclass and ordinal: mean over classes of the one-vs-rest AUC of each class's softmax
  probability; ACC of the argmax
- multilabel: mean over labels of each label's AUC; mean over labels of the 0.5-threshold accuracy

Scores are probabilities (sigmoid / softmax of the model's logits), as in MedMNIST's training code:
for multiclass AUC this matters, because a class's softmax probability ranks studies differently
from its raw logit. Segmentation uses MONAI's Dice and 95th-percentile Hausdorff distance.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from medformer.data.study import TaskSpec


def scores_from_logits(kind: str, logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Model outputs -> the scores the evaluator ranks: probabilities for classification tasks."""
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not torch.is_tensor(logits) else logits)
    x = x.double()
    if kind == "binary":
        return torch.sigmoid(x.reshape(x.shape[0], -1)[:, -1]).numpy()
    if kind in ("multiclass", "ordinal"):
        return torch.softmax(x, dim=1).numpy()
    if kind == "multilabel":
        return torch.sigmoid(x).numpy()
    return x.numpy()


def auc(kind: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    """MedMNIST-compatible AUC (see the module docstring). NaN when a class has no positives."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    with warnings.catch_warnings():  # a class absent from y_true: sklearn warns and we return NaN
        warnings.simplefilter("ignore")
        return _auc(kind, y_true, y_score)


def _auc(kind: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    try:
        if kind == "binary":
            score = y_score[:, -1] if y_score.ndim == 2 else y_score
            return float(roc_auc_score(y_true.reshape(-1), score))
        columns = range(y_score.shape[1])
        if kind == "multilabel":
            return float(np.mean([roc_auc_score(y_true[:, i], y_score[:, i]) for i in columns]))
        labels = y_true.reshape(-1)
        return float(np.mean([roc_auc_score((labels == i).astype(float), y_score[:, i]) for i in columns]))
    except ValueError:  # a class absent from y_true: AUC undefined
        return float("nan")


def accuracy(kind: str, y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> float:
    """MedMNIST-compatible ACC (see the module docstring)."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if kind == "binary":
        score = y_score[:, -1] if y_score.ndim == 2 else y_score
        return float(accuracy_score(y_true.reshape(-1), score > threshold))
    if kind == "multilabel":
        pred = y_score > threshold
        return float(np.mean([accuracy_score(y_true[:, i], pred[:, i]) for i in range(y_true.shape[1])]))
    return float(accuracy_score(y_true.reshape(-1), np.argmax(y_score, axis=-1)))


def classification_metrics(task: TaskSpec, y_true: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """``{"auc", "acc"}`` for a classification task from labels and raw model outputs."""
    scores = scores_from_logits(task.kind, logits)
    return {"auc": auc(task.kind, y_true, scores), "acc": accuracy(task.kind, y_true, scores)}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    err = np.asarray(y_pred, dtype=np.float64).reshape(len(y_true), -1) - np.asarray(
        y_true, dtype=np.float64
    ).reshape(len(y_true), -1)
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: tuple[float, ...] | None = None,
    hd95: bool = True,
) -> dict[str, float]:
    """Per-class Dice (and HD95 in voxels or mm) of label maps ``(B, *spatial)``, background excluded.

    Dice of a class absent from both prediction and truth is 1 (nothing to find, nothing found);
    HD95 is NaN there and is left out of the mean.
    """
    from monai.metrics import compute_hausdorff_distance

    p = torch.as_tensor(np.asarray(pred)).long()
    t = torch.as_tensor(np.asarray(truth)).long()
    p1 = torch.nn.functional.one_hot(p, num_classes).movedim(-1, 1).float()
    t1 = torch.nn.functional.one_hot(t, num_classes).movedim(-1, 1).float()
    dims = tuple(range(2, p1.ndim))
    inter = (p1 * t1).sum(dims)
    total = p1.sum(dims) + t1.sum(dims)
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))[:, 1:]
    out = {f"dice_{c}": float(dice[:, c - 1].mean()) for c in range(1, num_classes)}
    out["dice_mean"] = float(dice.mean())
    if hd95:
        both = (p1[:, 1:].sum(dims) > 0) & (t1[:, 1:].sum(dims) > 0)
        with warnings.catch_warnings():  # empty classes are handled below, MONAI's warnings say nothing more
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(p1, t1, include_background=False, percentile=95, spacing=spacing)
        hd = torch.where(both, hd, torch.full_like(hd, float("nan")))
        for c in range(1, num_classes):
            out[f"hd95_{c}"] = float(torch.nanmean(hd[:, c - 1]))
        out["hd95_mean"] = float(torch.nanmean(hd))
    return out


def brats_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of the BraTS regions from label maps with 1 = necrotic core, 2 = oedema, 3 = enhancing:
    ET = {3}, TC = {1, 3}, WT = {1, 2, 3}. An empty region in both maps scores 1."""
    regions = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
    p, t = np.asarray(pred), np.asarray(truth)
    out = {}
    for name, labels in regions.items():
        pm, tm = np.isin(p, labels), np.isin(t, labels)
        axes = tuple(range(1, pm.ndim))
        inter, total = (pm & tm).sum(axes), pm.sum(axes) + tm.sum(axes)
        out[f"dice_{name}"] = float(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))
    return out
