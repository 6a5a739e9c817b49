"""Tiny data, models and objectives for the training-engine tests; also a script (run in a subprocess
by the resume and distributed tests): ``python tests/_engine_helpers.py '{"output": ..., ...}'``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from medformer.config import TrainConfig
from medformer.data.dataset import CollectionDataset
from medformer.data.study import Collection, Study, TaskSpec
from medformer.models import Medformer, MedformerConfig
from medformer.train import distributed, fit


def collection(name: str, ndim: int, n: int, seed: int = 0) -> Collection:
    """Images whose mean intensity decides the label: binary in 2D, 3 classes in 3D."""
    rng = np.random.default_rng(seed)
    shape = (8,) * ndim
    studies = []
    for i in range(n):
        y = i % (2 if ndim == 2 else 3)
        img = rng.normal(0.0, 1.0, shape).astype(np.float32) + (y - 0.5) * 1.5
        studies.append(Study(f"{name}{i}", images={"T1": img}, labels={"y": y}))
    task = TaskSpec("y", "binary") if ndim == 2 else TaskSpec("y", "multiclass", 3)
    return Collection(name, ndim, ["T1"], studies, tasks=[task])


def jitter(images: np.ndarray) -> np.ndarray:
    """A random augmentation drawn from NumPy's global RNG, so resume must restore that RNG too."""
    return images + np.random.normal(0.0, 0.1, images.shape).astype(np.float32)


def datasets(n2d: int = 16, n3d: int = 12, augment: bool = False) -> dict[str, CollectionDataset]:
    t = jitter if augment else None
    out = {}
    if n2d:
        out["c2d"] = CollectionDataset(collection("c2d", 2, n2d, seed=1), transform=t)
    if n3d:
        out["c3d"] = CollectionDataset(collection("c3d", 3, n3d, seed=2), transform=t)
    return out


def medformer(seed: int = 0, drop_path: float = 0.0, qkv_bias: bool = True) -> Medformer:
    torch.manual_seed(seed)
    cfg = MedformerConfig(
        dim=32, depth=2, heads=2, patch_size_2d=4, patch_size_3d=4, drop_path=drop_path, qkv_bias=qkv_bias
    )
    model = Medformer(cfg)
    for ds in datasets().values():
        model.add_collection(ds.collection)
    return model


class Linear2D(nn.Module):
    """A linear classifier on flattened 8x8 images: every gradient is large, so comparisons are tight."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleDict({"c2d/y": nn.Linear(64, 1)})
        self.tasks = {"c2d/y": TaskSpec("y", "binary")}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"c2d/y": self.heads["c2d/y"](batch["images"].flatten(1))}


def spec(model: nn.Module, key: str) -> TaskSpec:
    entry = model.tasks[key]
    return getattr(entry, "spec", entry)


class Supervised:
    """BCE / CE on the model's outputs with the batch's labels (labelled studies only)."""

    name = "sup"

    def __call__(self, model: nn.Module, batch: dict):
        total, logs = None, {}
        for key, out in model(batch).items():
            s = spec(model, key)
            mask = batch["has_label"][s.key]
            if not bool(mask.any()):
                continue
            target = batch["labels"][s.key][mask]
            if s.kind == "binary":
                logits, target = out[mask].reshape(-1), target.float().reshape(-1)
                loss = F.binary_cross_entropy_with_logits(logits, target)
                hit = (logits > 0).float() == target
            else:
                loss = F.cross_entropy(out[mask], target.reshape(-1))
                hit = out[mask].argmax(1) == target.reshape(-1)
            logs[f"acc/{key}"] = float(hit.float().mean())
            total = loss if total is None else total + loss
        return total, logs


class TokenNorm:
    """A pretext-style objective that calls the model's parts directly (no model(batch))."""

    name = "aux"

    def __call__(self, model: nn.Module, batch: dict):
        tokens = model.tokenize(batch["images"], batch["modalities"], batch["present"], batch["collection"])
        enc = model.encode(tokens)
        loss = 10.0 * (enc.tokens.mean(1) ** 2).mean()
        return loss, {"aux/token_mean": float(enc.tokens.detach().mean())}


def flat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(args: dict) -> None:
    """Build the model and data the args name, train, optionally die right after a checkpoint."""
    model = medformer(drop_path=args.get("drop_path", 0.0), qkv_bias=args.get("qkv_bias", True))
    data = datasets(augment=args.get("augment", False))
    objectives = [Supervised()] + ([TokenNorm()] if args.get("aux") else [])
    exit_after = args.pop("exit_after", None)
    if exit_after is not None:  # simulate a crash: die at the first batch after that checkpoint exists
        ckpt = Path(args["output"]) / "checkpoints" / f"step_{exit_after:07d}"
        inner = objectives[0]

        class Crash:
            name = inner.name

            def __call__(self, model, batch):
                if ckpt.is_dir():
                    os._exit(1)
                return inner(model, batch)

        objectives[0] = Crash()
    if "bucket_bytes" in args:
        distributed.BUCKET_BYTES = args["bucket_bytes"]
    config = TrainConfig(**args["config"])
    fit(model, objectives, data, config, args["output"], resume=args.get("resume", False))
    rank = int(os.environ.get("RANK", 0))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(Path(args["output"]) / f"rank{rank}.safetensors"),
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
