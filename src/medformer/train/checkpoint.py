"""Training checkpoints that a crash cannot corrupt, and everything an exact resume needs.

Layout of ``<output>/checkpoints/step_0001000/``:

- ``model.safetensors`` + ``config.json``: the weights (`Medformer.save`; a plain state dict otherwise),
  loadable with `Medformer.from_pretrained`; ``model_ema/`` the same for the EMA weights;
- ``train_state.pt``: optimizer, LR scheduler, data position (epoch + batches consumed), RNG states of
  every rank, loss-weighting parameters, GradScaler, best metric so far;
- ``train_state.json``: step, config and last metrics, for people and tools.

A checkpoint is written into ``step_N.tmp-XXXXXXXX/`` and renamed to ``step_N/`` only once complete
(a rename is atomic), so a ``step_N/`` folder is always whole and a leftover ``*.tmp-*`` is debris from
a crash. ``latest`` (a one-line file, also replaced atomically) names the newest; only the last
``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medformer.train.ema import EMA

WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
STATE_JSON = "train_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# -- weights ----------------------------------------------------------------------------------------
def save_weights(model: nn.Module, directory: Path) -> None:
    """`model.save(directory)` when the model has it (Medformer), else a safetensors state dict."""
    if callable(getattr(model, "save", None)):
        model.save(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS))


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load ``directory/model.safetensors`` into ``model``; every key must match (it is our own run)."""
    model.load_state_dict(read_weights(directory), strict=True)


# -- random number generators -------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python RNG states, as tensors and plain values
    (so ``torch.load(weights_only=True)`` can read them back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever runs inside (an evaluation) leaves the training RNG streams untouched."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# -- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    ema: EMA | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a complete checkpoint atomically (see the module docstring); returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = root / f"{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_weights(model, tmp)
    if ema is not None:
        with ema.applied(model):
            save_weights(model, tmp / "model_ema")
    torch.save(state, tmp / STATE)
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    final = root / name
    if final.exists():  # the same step written again (e.g. a resumed run that had nothing left to do)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, name + "\n")
    prune(root, keep_last)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, folder), oldest first; ``*.tmp-*`` are skipped."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint (by step, not by the ``latest`` file, which may be stale)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: Path, keep_last: int | None) -> None:
    if keep_last is None:
        return
    for _, d in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def remove_partial(root: Path) -> list[str]:
    """Delete ``*.tmp-*`` debris of an interrupted save; returns the names removed."""
    if not root.is_dir():
        return []
    removed = []
    for d in root.iterdir():
        if ".tmp-" in d.name:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            removed.append(d.name)
    return removed


def load_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE, map_location="cpu", weights_only=True)
