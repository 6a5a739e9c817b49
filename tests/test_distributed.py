"""Data parallelism: 2 CPU processes (Gloo, torchrun's environment variables) train the same weights as
one process on the same global batches; the hand-rolled gradient all-reduce and its buckets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _engine_helpers import Supervised, TokenNorm, datasets, medformer
from medformer.config import TrainConfig
from medformer.train import fit
from medformer.train.distributed import _buckets

HELPER = Path(__file__).with_name("_engine_helpers.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, args: dict, timeout: float = 120) -> None:
    """What `torchrun --nproc-per-node N` does for us: N processes with RANK / WORLD_SIZE / LOCAL_RANK."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HELPER), json.dumps(args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"


def test_two_ranks_match_one_process(tmp_path):
    """2 ranks (gradients reduced in 4 KB buckets) = one process with the whole batch."""
    # No qkv bias: the key bias has an exactly-zero true gradient (softmax ignores a shift), so its
    # gradient is rounding noise, which AdamW's g / sqrt(v) turns into +-lr steps that differ between any
    # two summation orders. Every other weight has a real gradient and must agree to 1e-5.
    b, steps = 2, 6
    common = {"steps": steps, "lr": 3e-3, "log_every": 2, "progress": False, "checkpoint_every": 3}
    args = {
        "output": str(tmp_path / "ddp"),
        "aux": True,
        "qkv_bias": False,
        "bucket_bytes": 4096,  # many buckets
        "config": {**common, "batch_size": b},
    }
    launch(2, args)
    rank0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"

    model = medformer(qkv_bias=False)
    cfg = TrainConfig(**common, batch_size=2 * b)
    fit(model, [Supervised(), TokenNorm()], datasets(), cfg, tmp_path / "single")
    single = model.state_dict()
    initial = medformer(qkv_bias=False).state_dict()
    assert any(not torch.equal(single[k], initial[k]) for k in single)
    worst = max(((single[k] - rank0[k]).abs().max().item(), k) for k in single)
    assert worst[0] < 1e-5, worst

    # rank 0 alone wrote the run's files, with losses averaged over both ranks
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    single_records = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss/sup"] == pytest.approx(single_records[0]["loss/sup"], rel=1e-4)
    assert (tmp_path / "ddp" / "checkpoints" / "step_0000006" / "train_state.pt").is_file()
    state = torch.load(
        tmp_path / "ddp" / "checkpoints" / "step_0000006" / "train_state.pt", weights_only=True
    )
    assert len(state["rng"]) == 2 and state["world_size"] == 2


def test_buckets_split_by_size_and_dtype():
    ps = [torch.nn.Parameter(torch.zeros(10)) for _ in range(5)]
    ps.insert(2, torch.nn.Parameter(torch.zeros(10, dtype=torch.float64)))
    sizes = [len(b) for b in _buckets(ps, limit=80)]
    assert sizes == [2, 1, 2, 1]  # 2 x 40 bytes fit in 80; the float64 one starts its own bucket
    assert sum(sizes) == len(ps)
