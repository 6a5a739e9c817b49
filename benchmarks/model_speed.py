"""Medformer training-step speed, peak memory and model FLOPs utilisation (MFU).

For the tiny and small presets on 28x28 (1 channel, batch 128), 28^3 and 64^3 (1 and 4 modalities):

- end to end: tokenize -> body -> one classification head -> cross-entropy -> backward (samples/s);
- body only: the transformer body's forward + backward on a token tensor of the same shape;
- peak memory of the end-to-end step: growth of the process's max RSS on CPU (each setting runs in a
  fresh subprocess, so the high-water mark is its own), ``torch.cuda.max_memory_allocated`` on GPU.

MFU = analytic FLOPs of the body's forward + backward / time / measured peak. The FLOPs per sample:

    6 * P * N + 12 * L * N^2 * D

with ``P`` the body's Linear weights (the matmul parameters), ``N`` the tokens in the sequence (patch
tokens + collection latent + task token), ``L`` layers, ``D`` width: 2 FLOPs per multiply-add, the backward
pass twice the forward; the attention term counts ``Q K^T`` and ``A V`` (``2 * 2 * N^2 * D`` per layer
forward). LayerNorm, GELU, softmax and the heads are not counted, so MFU is conservative. The peak is the
best of several 4096x4096 fp32 ``torch.matmul`` calls, measured in the same run (before and after; the
higher is used).

Run it alone on the machine (timings on a shared CPU mean nothing):

    flock /tmp/medformer-cpu.lock .venv/bin/python benchmarks/model_speed.py

Writes ``benchmarks/results/model_speed.json`` and ``.md``. ``--quick`` runs a one-repetition smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
MODALITIES = ["T1", "T2", "FLAIR", "T1c"]

# name, spatial size, modalities, batch per preset
SETTINGS: list[dict[str, Any]] = [
    {"name": "28x28, 1 mod", "spatial": [28, 28], "modalities": 1, "batch": {"tiny": 128, "small": 128}},
    {"name": "28^3, 1 mod", "spatial": [28, 28, 28], "modalities": 1, "batch": {"tiny": 32, "small": 32}},
    {"name": "28^3, 4 mod", "spatial": [28, 28, 28], "modalities": 4, "batch": {"tiny": 8, "small": 8}},
    {"name": "64^3, 1 mod", "spatial": [64, 64, 64], "modalities": 1, "batch": {"tiny": 4, "small": 4}},
    {"name": "64^3, 4 mod", "spatial": [64, 64, 64], "modalities": 4, "batch": {"tiny": 1, "small": 1}},
]


TARGET_SETTINGS = ("28x28, 1 mod", "64^3, 1 mod", "64^3, 4 mod")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int = 4096, repeats: int = 6) -> float:
    """Best fp32 matmul rate (FLOP/s) of ``n x n`` by ``n x n``."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    torch.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (preset, setting): runs in its own process."""
    from medformer.data.study import TaskSpec
    from medformer.models import Medformer, MedformerConfig
    from medformer.models.body import body_matmul_params

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    config = MedformerConfig.from_preset(spec["preset"])
    model = Medformer(config, modalities=MODALITIES).to(device).train()
    model.add_collection("bench", ndim=len(spec["spatial"]))
    key = model.add_task(TaskSpec("label", "multiclass", 10), collection="bench")
    b, m = spec["batch"], spec["modalities"]
    images = torch.randn(b, m, *spec["spatial"], device=device)
    labels = torch.randint(0, 10, (b,), device=device)
    names = MODALITIES[:m]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(images, names, collection="bench", tasks=[key])[key]
        F.cross_entropy(out, labels).backward()

    rss0 = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    t_model = timed(step, device, spec["repeats"])
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() - mem0
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0

    tokens = model.tokenize(images, names, collection="bench")
    n = len(tokens) + config.num_latents + 1  # + collection latent(s) + the task token
    x = torch.randn(b, n, config.dim, device=device)
    model.zero_grad(set_to_none=True)

    def body_step() -> None:
        model.body(x, None, num_readers=1).square().mean().backward()

    t_body = timed(body_step, device, spec["repeats"])
    p = body_matmul_params(model.body)
    flops = b * (6 * p * n + 12 * config.depth * n * n * config.dim)
    return {
        "tokens": n,
        "grid": list(tokens.grid),
        "body_matmul_params": p,
        "params_total": sum(q.numel() for q in model.parameters()),
        "flops_per_step": flops,
        "step_s": t_model,
        "body_step_s": t_body,
        "samples_per_s": b / t_model,
        "body_samples_per_s": b / t_body,
        "peak_mem_mib": peak_mem / 2**20,
    }


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(result: dict[str, Any]) -> str:
    mach = result["machine"]
    lines = [
        "# Medformer training-step speed",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['threads']} torch threads, "
        f"torch {mach['torch']}, device {mach['device']}{', ' + mach['gpu'] if 'gpu' in mach else ''}.  ",
        f"Measured fp32 matmul peak (4096^3, best of several): **{result['peak_gflops']:.0f} GFLOP/s**.  ",
        "MFU = body FLOPs (6·P·N + 12·L·N²·D per sample, forward + backward) / time / peak. "
        "*Body* times the transformer body alone; *end to end* times tokenizer + body + classification head "
        "+ loss + backward (its MFU still counts body FLOPs only). Target: body MFU >= 50% at 28x28 "
        "batch 128 and at 64^3.",
        "",
        "| preset | input | batch | tokens | samples/s (end to end) | samples/s (body) "
        "| MFU body | MFU end to end | peak memory (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['preset']} | {r['setting']} | {r['batch']} | {r['tokens']} | {r['samples_per_s']:.3g} "
            f"| {r['body_samples_per_s']:.3g} | {r['mfu_body']:.0%} | {r['mfu_end_to_end']:.0%} "
            f"| {r['peak_mem_mib']:.0f} |"
        )
    targets = [
        f"{r['preset']} {r['setting']} {r['mfu_body']:.0%} ({'met' if r['target_met'] else 'MISSED'})"
        for r in result["runs"]
        if r["target_met"] is not None
    ]
    lines += [
        "",
        f"Target (body MFU >= 50%): {', '.join(targets)}.",
        "",
        f"Written by `benchmarks/model_speed.py` in {result['wall_s']:.0f} s; "
        "peak memory on CPU is the growth of max RSS during the end-to-end steps.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions per measurement (best is kept)"
    )
    parser.add_argument("--quick", action="store_true", help="one repetition, tiny preset, small batches")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    presets = ["tiny"] if args.quick else args.presets
    repeats = 1 if args.quick else args.repeats
    peak = matmul_peak(device)
    runs = []
    for preset in presets:
        for setting in SETTINGS:
            batch = setting["batch"][preset] if preset in setting["batch"] else setting["batch"]["small"]
            if args.quick:
                batch = max(1, batch // 8)
            spec = {
                "preset": preset,
                "spatial": setting["spatial"],
                "modalities": setting["modalities"],
                "batch": batch,
                "device": args.device,
                "threads": args.threads,
                "repeats": repeats,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"benchmark worker failed for {preset} {setting['name']}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(preset=preset, setting=setting["name"], batch=batch)
            runs.append(r)
            print(
                f"{preset:6s} {setting['name']:12s} b={batch:<4d} N={r['tokens']:<5d} "
                f"{r['samples_per_s']:8.1f} samples/s  body {r['body_samples_per_s']:8.1f} samples/s  "
                f"peak mem {r['peak_mem_mib']:7.0f} MiB",
                flush=True,
            )
    peak = max(peak, matmul_peak(device))
    for r in runs:
        r["mfu_body"] = r["flops_per_step"] / r["body_step_s"] / peak
        r["mfu_end_to_end"] = r["flops_per_step"] / r["step_s"] / peak
        r["target_met"] = r["mfu_body"] >= 0.5 if r["setting"] in TARGET_SETTINGS else None
    result = {
        "machine": machine(device, args.threads),
        "peak_gflops": peak / 1e9,
        "flops_formula": "per sample: 6*P*N + 12*L*N^2*D (body forward+backward; P = body Linear weights)",
        "quick": args.quick,
        "runs": runs,
        "wall_s": time.perf_counter() - start,
    }
    print(markdown(result))
    if args.quick and args.out == RESULTS:
        print("(--quick: results not written; pass --out to keep them)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "model_speed.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
