"""Speed, memory and scaling of Medformer training, against the machine's limit and the field.

One command measures everything side by side, so the ratios come from one machine in one run:

    python benchmarks/speed.py                      # every section (~1 h on 2 CPU cores)
    python benchmarks/speed.py --sections mfu memory
    python benchmarks/speed.py --quick --out /tmp/speed   # small sizes, a smoke test of the suite

Sections (results go to ``benchmarks/results/speed.{json,md}`` and ``speed_growth.png``):

- ``limit``: the best fp32 (and on GPU bf16) 4096^3 ``torch.matmul`` rate: the peak MFU is taken against.
- ``mfu``: the transformer body's forward + backward at 28x28, 28^3, 64^3 and 96^3 (tiny and small
  presets); analytic FLOPs (6 P N + 12 L N^2 D per sample, P = the body's Linear weights, N tokens, L
  layers, D width) / time / peak. Target: >= 50% at 64^3 and above.
- ``pretext``: one optimizer step (views, forward, loss, backward, AdamW) of every pretext task at its
  standard size, and in the same run the MONAI references doing the equivalent step at the same input
  and batch: SwinUNETR (feature size 48) with the Swin UNETR pre-training recipe (two rotated, cut-out
  views -> rotation + contrastive + reconstruction heads) and MONAI's 3D UNet reconstructing masked
  input. Targets at 96^3, equal batch: Medformer-small MAE >= 20x the SwinUNETR recipe's samples/s;
  the BrainMVP step >= 5x faster per sample than the official implementation's 36.8 s.
- ``data``: loading throughput of a simulated brain MRI cohort (2 mm, 4 contrasts, 96^3) from NIfTI
  with preprocessing vs from the cache, and the share of each step spent waiting for data in a real
  ``medformer pretrain`` run with the default loader settings. Target: < 5% on the cached path.
- ``memory``: peak memory of a 96^3, 4-modality pre-training step at batch 2 with and without
  activation checkpointing, and the largest batch that fits in 8 GiB (CPU: growth of the process's
  peak resident memory; each measurement runs in a fresh process).
- ``scaling``: ``torchrun`` with 1 vs 2 processes (gloo on CPU) at a fixed global batch: throughput
  and efficiency of the real pre-training run. See docs/scaling.md for GPUs and nodes.
- ``growth``: step time and memory against the input size (28^3 -> 128^3) and the number of
  modalities (1 -> 4), with fitted power-law exponents and a plot.

Needs einops for MONAI's Swin transformer (`pip install -e .[bench]`). Run it alone on the machine:
two multi-threaded jobs on a few cores slow each other many times over.
bf16 is measured on GPU only (on CPUs without AMX it is slower than fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
MODALITIES = ["T1w", "T1c", "T2w", "FLAIR"]
SECTIONS = ("limit", "mfu", "pretext", "data", "memory", "scaling", "growth")
GIB = 2**30
MEMORY_BUDGET = 8 * GIB
BRAINMVP_OFFICIAL_S = 36.8  # s per sample, UniFormer-small, measured on a free 2-core machine

# ------------------------------------------------------------------------------------------------
# measurement helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 4096) -> float:
    """Best rate (FLOP/s) of an ``n x n`` by ``n x n`` matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: torch.matmul(a, b, out=c), device, 6)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs after one warm-up (``repeats=0``: one run)."""
    best = float("inf")
    for _ in range(max(1, repeats) + (repeats > 0)):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def rss_peak(reset: bool = False) -> int:
    """The process's peak resident memory in bytes (VmHWM); ``reset`` starts a new high-water mark
    at the current use (Linux >= 4.0, ``/proc/self/clear_refs``)."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak, or on CPU the peak resident memory
    above what the process held on entry (model, optimizer and inputs already built)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_peak(reset=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.total = torch.cuda.max_memory_allocated()
            self.bytes = self.total - self.base
        else:
            self.total = rss_peak()
            self.bytes = self.total - self.base


def smooth_images(b: int, m: int, spatial: list[int], device: torch.device, seed: int = 0) -> Tensor:
    """Smooth random images in [0, 1] (structure, not white noise; no denormal floats)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, m, *[max(2, s // 8) for s in spatial], generator=g)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    x = F.interpolate(coarse, size=spatial, mode=mode, align_corners=False)
    return x.clamp_min(1e-3).to(device)


def run_worker(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement in a fresh process (its own memory high-water mark, no warm caches)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark worker failed: {spec}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# workers (each runs in its own process)


def worker_mfu(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Body forward + backward, and the end-to-end classification step, for one preset and input."""
    from medformer.data.study import TaskSpec
    from medformer.models import Medformer, MedformerConfig
    from medformer.models.body import body_matmul_params

    config = MedformerConfig.from_preset(spec["preset"])
    model = Medformer(config, modalities=MODALITIES).to(device).train()
    model.add_collection("bench", ndim=len(spec["spatial"]))
    key = model.add_task(TaskSpec("label", "multiclass", 10), collection="bench")
    b, m = spec["batch"], spec["modalities"]
    images = smooth_images(b, m, spec["spatial"], device)
    labels = torch.randint(0, 10, (b,), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(
            model(images, MODALITIES[:m], collection="bench", tasks=[key])[key], labels
        ).backward()

    t_model = timed(step, device, spec["repeats"])
    tokens = model.tokenize(images, MODALITIES[:m], collection="bench")
    n = len(tokens) + config.num_latents + 1  # + collection latent(s) + the task token
    x = torch.randn(b, n, config.dim, device=device)
    model.zero_grad(set_to_none=True)
    t_body = timed(
        lambda: model.body(x, None, num_readers=1).square().mean().backward(), device, spec["repeats"]
    )
    p = body_matmul_params(model.body)
    return {
        "tokens": n,
        "flops_per_step": b * (6 * p * n + 12 * config.depth * n * n * config.dim),
        "step_s": t_model,
        "body_step_s": t_body,
        "samples_per_s": b / t_model,
        "body_samples_per_s": b / t_body,
    }


def pretext_options(task: str, spatial: list[int]) -> dict[str, Any]:
    """Each task's standard options (BrainMVP with every part on from the first step)."""
    return {
        "mae": {"mask_ratio": 0.75},
        "contrastive": {"gather": False},
        "crossdim": {"gather": False},
        "source": {},
        "puzzle": {"grid_3d": 3, "grid_2d": 3},
        "brainmvp": {
            "template_shape": spatial,
            "total_steps": 1000,
            "mcl_start": 0,
            "cmr_warmup": 0,
            "gather": False,
        },
    }[task]


def medformer_step(spec: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One pre-training step of Medformer with one pretext task: views, loss, backward, AdamW."""
    from medformer.models import Medformer, MedformerConfig
    from medformer.pretext import Pretrainer
    from medformer.pretext.registry import build_task

    m, spatial = spec["modalities"], spec["spatial"]
    config = MedformerConfig.from_preset(spec["preset"], checkpointing=spec.get("checkpointing", False))
    model = Medformer(config, modalities=MODALITIES[:m])
    model.add_collection("bench", ndim=len(spatial))
    task, _ = build_task({"task": spec["task"], **pretext_options(spec["task"], spatial)})
    pretrainer = Pretrainer(model, [task]).to(device).train()
    optimizer = torch.optim.AdamW(pretrainer.parameters(), lr=1e-4)
    batch = {
        "images": smooth_images(spec["batch"], m, spatial, device),
        "present": torch.ones(spec["batch"], m, dtype=torch.bool, device=device),
        "modalities": tuple(MODALITIES[:m]),
        "collection": "bench",
    }

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task(model, batch)
        loss.backward()
        optimizer.step()

    return step


class SwinSSL(nn.Module):
    """The Swin UNETR pre-training network (Tang et al., CVPR 2022) on MONAI's Swin transformer
    (feature size 48): rotation (4 classes) and contrastive (512-d) heads on the pooled last stage, and
    a convolutional decoder (conv, 2x upsampling, instance norm, leaky ReLU per stage) reconstructing
    the input from it."""

    def __init__(self, feature_size: int = 48):
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.encoder = SwinTransformer(
            in_chans=1,
            embed_dim=feature_size,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24),
            spatial_dims=3,
        )
        dim = 16 * feature_size
        self.rotation = nn.Linear(dim, 4)
        self.contrastive = nn.Linear(dim, 512)
        stages, c = [], dim
        for _ in range(5):
            stages += [
                nn.Conv3d(c, c // 2, 3, padding=1),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                nn.InstanceNorm3d(c // 2),
                nn.LeakyReLU(),
            ]
            c //= 2
        self.decoder = nn.Sequential(*stages, nn.Conv3d(c, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        top = self.encoder(x.contiguous(), normalize=True)[-1]
        pooled = top.flatten(2).mean(-1)
        return self.rotation(pooled), self.contrastive(pooled), self.decoder(top)


def cutout(x: Tensor, fraction: float = 0.3, block: int = 16) -> Tensor:
    """Zero random ``block``-voxel cubes covering about ``fraction`` of the volume (inpainting views)."""
    keep = (torch.rand(x.shape[0], 1, *[s // block for s in x.shape[2:]], device=x.device) > fraction).float()
    return x * F.interpolate(keep, size=x.shape[2:], mode="nearest")


def swin_step(spec: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """The Swin UNETR recipe per step: two views of each volume, each rotated by a random multiple of
    90 degrees and cut out, through the network; rotation CE + NT-Xent + L1 reconstruction."""
    net = SwinSSL().to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = smooth_images(spec["batch"], 1, spec["spatial"], device)

    def step() -> None:
        views, rotations = [], []
        for _ in range(2):
            k = torch.randint(0, 4, (x.shape[0],), device=device)
            views.append(torch.stack([torch.rot90(v, int(r), dims=(2, 3)) for v, r in zip(x, k)]))
            rotations.append(k)
        truth = torch.cat(views)
        optimizer.zero_grad(set_to_none=True)
        rot, emb, rec = net(cutout(truth))
        z = F.normalize(emb, dim=1)
        sim = z @ z.T / 0.5
        sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=device), -1e9)
        b = x.shape[0]
        partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(device)
        loss = (
            F.cross_entropy(rot, torch.cat(rotations)) + F.cross_entropy(sim, partner) + F.l1_loss(rec, truth)
        )
        loss.backward()
        optimizer.step()

    return step


def unet_step(spec: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """MONAI's 3D UNet (5 levels, 2 residual units) reconstructing cut-out input (L1 loss)."""
    from monai.networks.nets import UNet

    net = UNet(3, 1, 1, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = smooth_images(spec["batch"], 1, spec["spatial"], device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.l1_loss(net(cutout(x)), x).backward()
        optimizer.step()

    return step


def worker_step(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Time (and peak memory of) one training step of ``spec["model"]``."""
    build = {"medformer": medformer_step, "swin": swin_step, "unet": unet_step}[spec["model"]]
    step = build(spec, device)
    with PeakMemory(device) as peak:
        seconds = timed(step, device, spec["repeats"])
    return {
        "step_s": seconds,
        "samples_per_s": spec["batch"] / seconds,
        "peak_mem_mib": peak.bytes / 2**20,  # the step's own (activations, gradients, optimizer state)
        "process_peak_mib": peak.total / 2**20,  # everything the process held at its peak
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    return {"mfu": worker_mfu, "step": worker_step}[spec["kind"]](spec, device)


# ------------------------------------------------------------------------------------------------
# sections


class Suite:
    """Shared settings of one benchmark run and the sections' results."""

    def __init__(self, args: argparse.Namespace):
        self.quick = args.quick
        self.device = torch.device(args.device)
        self.threads = args.threads
        self.repeats = 1 if args.quick else args.repeats
        self.big = 32 if args.quick else 96  # the "standard" 3D size
        self.results: dict[str, Any] = {}

    def spec(self, **values: Any) -> dict[str, Any]:
        return {"device": str(self.device), "threads": self.threads, "repeats": self.repeats, **values}

    @property
    def peak(self) -> float:
        return self.results["limit"]["fp32_gflops"] * 1e9

    def limit(self) -> dict[str, Any]:
        out = {"fp32_gflops": matmul_peak(self.device) / 1e9}
        if self.device.type == "cuda":
            out["bf16_gflops"] = matmul_peak(self.device, torch.bfloat16) / 1e9
        print(f"limit: fp32 matmul {out['fp32_gflops']:.0f} GFLOP/s", flush=True)
        return out

    def mfu(self) -> list[dict[str, Any]]:
        settings = [  # name, spatial, modalities, batch
            ("28x28", [28, 28], 1, 128),
            ("28^3", [28, 28, 28], 1, 32),
            ("64^3", [64, 64, 64], 1, 4),
            ("64^3, 4 mod", [64, 64, 64], 4, 1),
            ("96^3", [96, 96, 96], 1, 1),
        ]
        rows = []
        for preset in ("tiny",) if self.quick else ("tiny", "small"):
            for name, spatial, m, batch in settings:
                if self.quick:
                    spatial, batch = [min(s, 32) for s in spatial], max(1, batch // 8)
                r = run_worker(
                    self.spec(kind="mfu", preset=preset, spatial=spatial, modalities=m, batch=batch)
                )
                r.update(preset=preset, input=name, batch=batch)
                r["mfu_body"] = r["flops_per_step"] / r["body_step_s"] / self.peak
                r["mfu_end_to_end"] = r["flops_per_step"] / r["step_s"] / self.peak
                r["target_met"] = r["mfu_body"] >= 0.5 if spatial[0] >= 64 else None
                rows.append(r)
                print(
                    f"mfu: {preset} {name} b={batch} N={r['tokens']} body MFU {r['mfu_body']:.0%}", flush=True
                )
        return rows

    def pretext(self) -> dict[str, Any]:
        s, b = self.big, 2
        cube = [s] * 3
        rows = []
        runs = [  # label, spec
            ("SwinUNETR-48 (Swin UNETR recipe)", {"model": "swin", "modalities": 1}),
            ("MONAI UNet (masked reconstruction)", {"model": "unet", "modalities": 1}),
        ]
        for task, m in (
            ("mae", 1),
            ("contrastive", 1),
            ("crossdim", 1),
            ("source", 4),
            ("puzzle", 4),
            ("brainmvp", 4),
            ("mae", 4),
        ):
            for preset in ("small",) if task != "mae" or m > 1 or self.quick else ("tiny", "small"):
                runs.append(
                    (
                        f"Medformer-{preset} {task}",
                        {"model": "medformer", "task": task, "preset": preset, "modalities": m},
                    )
                )
        for label, values in runs:
            if self.quick and values["model"] == "medformer":
                values["preset"] = "tiny"
                label = label.replace("small", "tiny")
            r = run_worker(self.spec(kind="step", spatial=cube, batch=b, **values))
            r.update(label=label, input=f"{s}^3, {values['modalities']} mod", batch=b, **values)
            r["s_per_sample"] = r["step_s"] / b
            rows.append(r)
            print(
                f"pretext: {label} {r['input']} b={b}: {r['samples_per_s']:.3g} samples/s, "
                f"{r['peak_mem_mib']:.0f} MiB",
                flush=True,
            )
        swin = next(r for r in rows if r["model"] == "swin")
        for r in rows:
            r["x_swin"] = r["samples_per_s"] / swin["samples_per_s"]
        preset = "tiny" if self.quick else "small"
        mae = next(
            r for r in rows if r.get("task") == "mae" and r["modalities"] == 1 and r["preset"] == preset
        )
        bmvp = next(r for r in rows if r.get("task") == "brainmvp")
        return {
            "rows": rows,
            "targets": {
                "mae_vs_swin": {"value": mae["x_swin"], "target": 20.0, "met": mae["x_swin"] >= 20},
                "brainmvp_vs_official": {
                    "value": BRAINMVP_OFFICIAL_S / bmvp["s_per_sample"],
                    "target": 5.0,
                    "s_per_sample": bmvp["s_per_sample"],
                    "met": BRAINMVP_OFFICIAL_S / bmvp["s_per_sample"] >= 5,
                },
            },
        }

    def data(self) -> dict[str, Any]:
        """Loading throughput from NIfTI vs cache; the data wait in real pre-training runs."""
        from medformer.config import PreprocessConfig
        from medformer.data.cache import PreprocessCache
        from medformer.data.dataset import CollectionDataset
        from medformer.data.manifest import open_collection
        from medformer.data.phantom import PhantomConfig, write_cohort
        from medformer.data.transforms import Preprocessor

        n, s = (6, 48) if self.quick else (16, 96)
        root = self.workdir / "cohort"
        manifest = write_cohort(
            root,
            PhantomConfig(
                n_subjects=n,
                voxel_size_mm=192 / s,
                shape=(s, s, s),
                missing_fraction=0.0,
                split=(1.0, 0.0, 0.0),
            ),
            progress=False,
        )
        self.manifest = manifest
        self.preprocess = PreprocessConfig(crop_foreground=True, intensity="percentile", size=[s, s, s])
        collection = open_collection(manifest)
        cache = PreprocessCache(self.workdir / "cache", Preprocessor(self.preprocess))
        dataset = CollectionDataset(collection, split=None, load=cache)
        rates = {}  # the first pass reads NIfTI, preprocesses and fills the cache; the second reads it
        for name in ("uncached (NIfTI + preprocessing)", "cached"):
            t = time.perf_counter()
            for i in range(len(dataset)):
                dataset[i]
            rates[name] = len(dataset) / (time.perf_counter() - t)
            print(f"data: {name} {rates[name]:.2f} studies/s", flush=True)
        run = self.pretrain_run("data_wait", processes=1, global_batch=2, steps=6 if self.quick else 24)
        return {
            "cohort": {"subjects": n, "grid": [s] * 3, "modalities": 4},
            "studies_per_s": rates,
            "pretrain": run,
            "target": {"data_wait": 0.05, "met": run["data_wait"] < 0.05},
        }

    def pretrain_run(self, name: str, processes: int, global_batch: int, steps: int) -> dict[str, Any]:
        """A real ``medformer pretrain`` (MAE, tiny preset) under torchrun; its logged samples/s and
        data wait after the first logging window (warm-up)."""
        import yaml

        out = self.workdir / name
        config = {
            "output": str(out),
            "seed": 0,
            "device": str(self.device.type),
            "cache_dir": str(self.workdir / "cache"),
            "data": [{"path": str(self.manifest)}],
            "preprocess": self.preprocess.model_dump(),
            "model": {"preset": "tiny"},
            "pretext": [{"task": "mae"}],
            "pretrain": {"splits": ["train"]},
            "train": {
                "steps": steps,
                "batch_size": global_batch // processes,
                "log_every": max(1, steps // 6),
                "checkpoint_every": None,
                "keep_last": 1,
                "lr": 1e-4,
            },
        }
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        threads = max(1, self.threads // processes)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "medformer",
            "pretrain",
            "-c",
            str(path),
        ]
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"pre-training run {name} failed")
        logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs = [r for r in logs if "samples_per_s" in r][1:]
        return {
            "processes": processes,
            "threads_per_process": threads,
            "global_batch": global_batch,
            "steps": steps,
            "samples_per_s": float(np.mean([r["samples_per_s"] for r in logs])),
            "data_wait": float(np.mean([r.get("data_wait", 0.0) for r in logs])),
            "wall_s": wall,
        }

    def memory(self) -> dict[str, Any]:
        s = self.big
        base = {
            "kind": "step",
            "model": "medformer",
            "preset": "tiny" if self.quick else "small",
            "spatial": [s] * 3,
            "modalities": 4,
            "repeats": 0,
        }
        rows = []
        for task in ("mae", "brainmvp"):
            for ckpt in (False, True):
                r = run_worker(self.spec(**base, task=task, batch=2, checkpointing=ckpt))
                rows.append({"task": task, "checkpointing": ckpt, "batch": 2, **r})
                print(f"memory: {task} b=2 checkpointing={ckpt}: {r['peak_mem_mib']:.0f} MiB", flush=True)
        largest = {}
        for ckpt in (False, True):
            two = next(r for r in rows if r["task"] == "mae" and r["checkpointing"] == ckpt)
            one = run_worker(self.spec(**base, task="mae", batch=1, checkpointing=ckpt))
            per_sample = max(two["process_peak_mib"] - one["process_peak_mib"], 1.0)
            fixed = one["process_peak_mib"] - per_sample  # imports, model, optimizer state
            guess = max(1, int((MEMORY_BUDGET / 2**20 - fixed) // per_sample))
            if self.quick:
                guess = min(guess, 4)
            while True:  # check the linear estimate with a real step; step down until it fits
                check = run_worker(self.spec(**base, task="mae", batch=guess, checkpointing=ckpt))
                if check["process_peak_mib"] * 2**20 <= MEMORY_BUDGET or guess == 1:
                    break
                guess = max(1, int(guess * MEMORY_BUDGET / (check["process_peak_mib"] * 2**20)))
            largest["on" if ckpt else "off"] = {
                "batch": guess,
                "process_peak_mib": check["process_peak_mib"],
                "per_sample_mib": per_sample,
                "fixed_mib": fixed,
            }
            print(f"memory: largest MAE batch in 8 GiB, checkpointing={ckpt}: {guess}", flush=True)
        return {"input": f"{s}^3, 4 mod", "rows": rows, "largest_batch_8gib": largest}

    def scaling(self) -> dict[str, Any]:
        if not hasattr(self, "manifest"):
            self.results["data"] = self.data()
        steps, batch = (6, 2) if self.quick else (24, 4)
        runs = [self.pretrain_run(f"ddp{p}", processes=p, global_batch=batch, steps=steps) for p in (1, 2)]
        for r in runs:
            print(f"scaling: {r['processes']} process(es): {r['samples_per_s']:.3g} samples/s", flush=True)
        from medformer.models import Medformer, MedformerConfig

        params = sum(
            p.numel()
            for p in Medformer(MedformerConfig.from_preset("tiny"), modalities=MODALITIES).parameters()
        )
        return {
            "runs": runs,
            "speedup": runs[1]["samples_per_s"] / runs[0]["samples_per_s"],
            "gradient_bytes_per_step": 4 * params,
        }

    def growth(self) -> dict[str, Any]:
        sizes = [16, 24, 32] if self.quick else [28, 48, 64, 96, 128]
        base = {
            "kind": "step",
            "model": "medformer",
            "task": "mae",
            "preset": "tiny" if self.quick else "small",
            "batch": 1,
        }
        by_size = []
        for s in sizes:
            r = run_worker(self.spec(**base, spatial=[s] * 3, modalities=1))
            by_size.append({"size": s, "voxels": s**3, **r})
            print(f"growth: {s}^3: {r['step_s']:.3g} s, {r['peak_mem_mib']:.0f} MiB", flush=True)
        s = sizes[-2]
        by_modalities = []
        for m in (1, 2, 3, 4):
            r = run_worker(self.spec(**base, spatial=[s] * 3, modalities=m))
            by_modalities.append({"modalities": m, **r})
            print(f"growth: {s}^3, {m} modalities: {r['step_s']:.3g} s", flush=True)
        return {
            "by_size": by_size,
            "modalities_at": s,
            "by_modalities": by_modalities,
            "exponents": fits(by_size, by_modalities),
        }


def fits(by_size: list[dict[str, Any]], by_modalities: list[dict[str, Any]]) -> dict[str, float]:
    """Power-law exponents of step time and step memory; sizes from the third on (64^3 up in the full
    run), where the fixed cost of a step (the optimizer update, Python) no longer dominates."""
    big = by_size[2:]
    return {
        f"{what}_vs_{axis}": exponent([r[x] for r in rows], [r[key] for r in rows])
        for axis, x, rows in (("voxels", "voxels", big), ("modalities", "modalities", by_modalities))
        for what, key in (("time", "step_s"), ("memory", "peak_mem_mib"))
    }


def exponent(x: list[float], y: list[float]) -> float:
    """The least-squares slope of log y on log x: y ~ x^k."""
    return float(np.polyfit(np.log(x), np.log(np.maximum(y, 1e-9)), 1)[0])


# ------------------------------------------------------------------------------------------------
# report


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
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _met(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def markdown(result: dict[str, Any]) -> str:
    mach, out = result["machine"], result["sections"]
    lines = [
        "# Medformer speed, memory and scaling",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, {mach['threads']} torch "
        f"threads, torch {mach['torch']}, device {mach['device']}"
        f"{', ' + mach['gpu'] if 'gpu' in mach else ''}. "
        f"Written by `python benchmarks/speed.py{' --quick' if result['quick'] else ''}` in "
        f"{result['wall_s'] / 60:.0f} min.",
        "",
    ]
    if "limit" in out:
        lim = out["limit"]
        lines += [
            "## The limit",
            "",
            f"fp32 matmul (4096^3, best of 6): **{lim['fp32_gflops']:.0f} GFLOP/s**"
            + (f"; bf16 **{lim['bf16_gflops']:.0f} GFLOP/s**" if "bf16_gflops" in lim else "")
            + ".",
            "",
        ]
    if "mfu" in out:
        lines += [
            "## Model FLOPs utilisation",
            "",
            "Body = the transformer body's forward + backward on the token tensor; end to end = tokenizer "
            "+ body + classification head + loss + backward (MFU still counts body FLOPs only). "
            "Target: body MFU >= 50% "
            "at 64^3 and above.",
            "",
            "| preset | input | batch | tokens | samples/s end to end | samples/s body | MFU body "
            "| MFU end to end | target |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in out["mfu"]:
            lines.append(
                f"| {r['preset']} | {r['input']} | {r['batch']} | {r['tokens']} | {r['samples_per_s']:.3g} "
                f"| {r['body_samples_per_s']:.3g} | {r['mfu_body']:.0%} | {r['mfu_end_to_end']:.0%} "
                f"| {_met(r['target_met'])} |"
            )
        lines.append("")
    if "pretext" in out:
        p = out["pretext"]
        t = p["targets"]
        lines += [
            "## Pre-training step throughput",
            "",
            "One optimizer step (views, forward, loss, backward, AdamW), batch 2, same input for every row; "
            "peak memory of the step. Ratios against the SwinUNETR recipe measured in the same run.",
            "",
            "| network and task | input | samples/s | s per sample | x SwinUNETR recipe "
            "| peak memory (MiB) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in p["rows"]:
            lines.append(
                f"| {r['label']} | {r['input']} | {r['samples_per_s']:.3g} | {r['s_per_sample']:.3g} "
                f"| {r['x_swin']:.1f} | {r['peak_mem_mib']:.0f} |"
            )
        mv, bv = t["mae_vs_swin"], t["brainmvp_vs_official"]
        lines += [
            "",
            f"- Medformer-small MAE vs the SwinUNETR recipe: **{mv['value']:.1f}x** "
            f"(target >= 20x: {_met(mv['met'])}).",
            f"- BrainMVP step: **{bv['s_per_sample']:.2f} s per sample**, {bv['value']:.1f}x faster than "
            f"the official "
            f"implementation's {BRAINMVP_OFFICIAL_S} s (target >= 5x: {_met(bv['met'])}).",
            "",
        ]
    if "data" in out:
        d = out["data"]
        c, run = d["cohort"], d["pretrain"]
        lines += [
            "## Data path",
            "",
            f"Simulated brain MRI, {c['subjects']} subjects x {c['modalities']} contrasts, {c['grid'][0]}^3.",
            "",
            "| loading | studies/s |",
            "|---|---:|",
            *[f"| {k} | {v:.3g} |" for k, v in d["studies_per_s"].items()],
            "",
            f"`medformer pretrain` (MAE, tiny, batch {run['global_batch']}, default loader settings, "
            "cached): "
            f"{run['samples_per_s']:.3g} samples/s, **data wait {run['data_wait']:.1%}** of the step time "
            f"(target < 5%: {_met(d['target']['met'])}).",
            "",
        ]
    if "memory" in out:
        m = out["memory"]
        lines += [
            "## Memory",
            "",
            f"Medformer-small pre-training step at {m['input']}, batch 2: the step's peak memory "
            "(activations, gradients, optimizer state) and the whole process's peak.",
            "",
            "| task | activation checkpointing | step peak (MiB) | process peak (MiB) | s per step |",
            "|---|---|---:|---:|---:|",
            *[
                f"| {r['task']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_mem_mib']:.0f} "
                f"| {r['process_peak_mib']:.0f} | {r['step_s']:.3g} |"
                for r in m["rows"]
            ],
            "",
            "Largest MAE batch whose process fits in 8 GiB: "
            + ", ".join(
                f"checkpointing {k}: **{v['batch']}** ({v['process_peak_mib']:.0f} MiB measured)"
                for k, v in m["largest_batch_8gib"].items()
            )
            + ".",
            "",
        ]
    if "scaling" in out:
        s = out["scaling"]
        one = s["runs"][0]
        lines += [
            "## Scaling",
            "",
            f"`torchrun` + `medformer pretrain` (MAE, tiny), global batch {one['global_batch']}, "
            "the machine's "
            f"{mach['cores']} cores shared by the processes (see docs/scaling.md).",
            "",
            "| processes | threads each | samples/s |",
            "|---:|---:|---:|",
            *[
                f"| {r['processes']} | {r['threads_per_process']} | {r['samples_per_s']:.3g} |"
                for r in s["runs"]
            ],
            "",
            f"2 processes / 1 process: **{s['speedup']:.2f}x** on the same cores; "
            f"gradient all-reduce {s['gradient_bytes_per_step'] / 2**20:.0f} MiB per step.",
            "",
        ]
    if "growth" in out:
        g = out["growth"]
        e = g["exponents"]
        lines += [
            "## Growth",
            "",
            "Medformer MAE step, batch 1: time and memory against the input size (1 modality) and the number "
            f"of modalities ({g['modalities_at']}^3). Exponents are least-squares slopes on log-log axes "
            "(sizes from the third on, where the fixed cost of a step no longer dominates).",
            "",
            "| input | s per step | peak memory (MiB) |",
            "|---|---:|---:|",
            *[f"| {r['size']}^3 | {r['step_s']:.3g} | {r['peak_mem_mib']:.0f} |" for r in g["by_size"]],
            *[
                f"| {g['modalities_at']}^3 x {r['modalities']} | {r['step_s']:.3g} "
                f"| {r['peak_mem_mib']:.0f} |"
                for r in g["by_modalities"]
            ],
            "",
            f"time ~ voxels^{e['time_vs_voxels']:.2f}, memory ~ voxels^{e['memory_vs_voxels']:.2f}; "
            f"time ~ modalities^{e['time_vs_modalities']:.2f}, "
            f"memory ~ modalities^{e['memory_vs_modalities']:.2f}.",
            "",
            "![growth](speed_growth.png)" if not result["quick"] else "",
        ]
    return "\n".join(lines) + "\n"


def growth_figure(growth: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in (
        (axes[0], "step_s", "seconds per step"),
        (axes[1], "peak_mem_mib", "peak memory (MiB)"),
    ):
        ax.loglog(
            [r["voxels"] for r in growth["by_size"]],
            [r[key] for r in growth["by_size"]],
            "o-",
            color="#0072B2",
            label="1 modality, size ->",
        )
        s3 = growth["modalities_at"] ** 3
        ax.loglog(
            [s3 * r["modalities"] for r in growth["by_modalities"]],
            [r[key] for r in growth["by_modalities"]],
            "s--",
            color="#D55E00",
            label=f"{growth['modalities_at']}^3, 1 -> 4 modalities",
        )
        ax.set_xlabel("voxels per sample (all modalities)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Medformer MAE step: growth with input size and modalities", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed repetitions per measurement (best kept)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and tiny models: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    suite = Suite(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "speed_quick" if args.quick else "speed"
    previous = args.out / f"{name}.json"
    result = json.loads(previous.read_text()) if previous.exists() else {"sections": {}}
    with tempfile.TemporaryDirectory(prefix="medformer-speed-") as tmp:
        suite.workdir = Path(tmp)
        sections = ["limit", *[s for s in args.sections if s != "limit"]]  # MFU needs the peak
        for section in sections:
            suite.results[section] = getattr(suite, section)()
            result["sections"].update(suite.results)  # sections not rerun keep their last results
            result.update(
                machine=machine(suite.device, args.threads),
                quick=args.quick,
                wall_s=time.perf_counter() - start,
            )
            previous.write_text(json.dumps(result, indent=1) + "\n")  # a long run loses no section
        shutil.rmtree(tmp, ignore_errors=True)
    if "growth" in result["sections"]:
        growth_figure(result["sections"]["growth"], args.out / f"{name}_growth.png")
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
