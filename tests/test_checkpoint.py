"""Checkpoints: a run killed after a checkpoint and resumed ends with exactly the weights of a run that
was never interrupted; saves are atomic (debris ignored), only the last K are kept, `latest` is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _engine_helpers import Supervised, TokenNorm, datasets, medformer
from medformer.config import TrainConfig
from medformer.errors import ConfigError
from medformer.train import fit
from medformer.train.checkpoint import find_latest, list_checkpoints, load_state

HELPER = Path(__file__).with_name("_engine_helpers.py")

# everything with state: dropout-like noise (drop_path), a random augmentation (NumPy RNG), two objectives
# with learned uncertainty weights, EMA, gradient accumulation across epoch boundaries (7 batches/epoch)
RUN = {
    "steps": 10,
    "batch_size": 4,
    "grad_accum": 2,
    "lr": 3e-3,
    "warmup_steps": 2,
    "checkpoint_every": 4,
    "keep_last": 2,
    "log_every": 2,
    "loss_weighting": "uncertainty",
    "ema_decay": 0.8,
    "progress": False,
}


def train(output: Path, resume: bool = False, **changes) -> torch.nn.Module:
    model = medformer(drop_path=0.2)
    fit(model, [Supervised(), TokenNorm()], datasets(augment=True), TrainConfig(**{**RUN, **changes}), output,
        resume=resume)  # fmt: skip
    return model


def test_resume_after_a_crash_is_exact(tmp_path):
    reference = train(tmp_path / "straight")

    # the same run in a subprocess that dies (os._exit) right after its checkpoint at step 4
    args = {"output": str(tmp_path / "crashed"), "aux": True, "augment": True, "drop_path": 0.2,
            "exit_after": 4, "config": RUN}  # fmt: skip
    proc = subprocess.run([sys.executable, str(HELPER), json.dumps(args)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "crashed" / "checkpoints")] == [4]
    assert not (tmp_path / "crashed" / "model").exists()

    resumed = train(tmp_path / "crashed", resume=True)
    ref, res = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref), "resumed weights differ"
    for name in ("model_ema", "model"):
        a = load_file(str(tmp_path / "straight" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "crashed" / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = load_state(tmp_path / "straight" / "checkpoints" / "step_0000010")
    b = load_state(tmp_path / "crashed" / "checkpoints" / "step_0000010")
    assert torch.equal(a["weighting"]["log_vars"], b["weighting"]["log_vars"])
    assert a["data"] == b["data"] and a["data"]["epoch"] == 2  # 20 batches at 7 per epoch

    # metrics.jsonl reads as one run: the interrupted run's records after step 4 were replaced
    def losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss/sup"]) for r in map(json.loads, lines)]

    assert [s for s, _ in losses("crashed")] == [2, 4, 6, 8, 10]
    assert losses("crashed")[2:] == losses("straight")[2:]

    # without restoring the RNG the run is not the same: the test above can tell
    other = train(tmp_path / "other_seed", seed=1)
    assert any(not torch.equal(ref[k], v) for k, v in other.state_dict().items())


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path):
    out = tmp_path / "run"
    train(out, steps=6, checkpoint_every=2, keep_last=2, ema_decay=None)
    root = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [4, 6]  # step 2 pruned
    assert (root / "latest").read_text().strip() == "step_0000006"
    step6 = root / "step_0000006"
    assert {"model.safetensors", "config.json", "train_state.pt", "train_state.json"} <= {
        p.name for p in step6.iterdir()
    }
    meta = json.loads((step6 / "train_state.json").read_text())
    assert meta["step"] == 6 and meta["config"]["steps"] == 6 and meta["metrics"]["step"] == 6

    # debris of a save that crashed half-way (newer step number, no train_state.pt) is never resumed from
    debris = root / "step_0000008.tmp-deadbeef"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"partial")
    assert find_latest(root) == step6
    with pytest.raises(ConfigError, match="resume it"):  # a fresh run would mix its checkpoints in
        train(out, steps=8, checkpoint_every=2, keep_last=2, ema_decay=None)
    model = train(out, resume=True, steps=8, checkpoint_every=2, keep_last=2, ema_decay=None)
    assert not debris.exists()
    assert [s for s, _ in list_checkpoints(root)] == [6, 8]
    assert (root / "latest").read_text().strip() == "step_0000008"
    saved = load_file(str(root / "step_0000008" / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "step_0000006" in log and "changed settings: steps 6 -> 8" in log


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    model = train(tmp_path / "new", resume=True, steps=2, ema_decay=None)
    assert (tmp_path / "new" / "model" / "model.safetensors").is_file()
    assert "starting from scratch" in (tmp_path / "new" / "train.log").read_text()
    assert model.training
