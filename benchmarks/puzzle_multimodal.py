"""Multimodal vs single-modal jigsaw pre-training, judged by fine-tuning with 10% of the labels.

The question of Taleb et al. (2019/2021): do puzzles whose tiles come from different modalities of a
subject (T1w, T1c, T2w, FLAIR) teach a better representation than puzzles cut from one modality? On
the simulated multi-contrast brain MRI cohort (`medformer.data.phantom`), three arms share everything
but the pre-training:

- ``scratch``: no pre-training;
- ``single``: 2^3 puzzles, every tile of a puzzle from one (random) modality;
- ``multimodal``: 2^3 puzzles, every tile from a random modality of that subject;
- ``multimodal+synthetic`` (with ``--translator DIR``, a `medformer generate` run): as ``multimodal``, and
  a subject's missing modality is synthesised for the puzzles (never for fine-tuning).

Each arm then fine-tunes tumour segmentation (4 classes) with 10% of the training labels (stratified,
``--label-seeds`` subsets) and is scored on the test split (mean Dice over the classes). All through
the library's commands: ``run_pretrain`` (``pretext: [{task: puzzle, ...}]``) and ``run_finetune``.

    python benchmarks/puzzle_multimodal.py            # full run (hours on a CPU; see the results file)
    python benchmarks/puzzle_multimodal.py --quick    # pipeline check: tiny cohort, a few steps

Writes benchmarks/results/puzzle_multimodal.{json,md} (``--quick``: puzzle_multimodal_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medformer.config import build_config
from medformer.data.phantom import PhantomConfig, write_cohort
from medformer.finetune import FinetuneConfig, run_finetune
from medformer.pretrain import PretrainConfig, run_pretrain

FULL = {"subjects": 100, "size": 32, "pretrain_steps": 2000, "finetune_steps": 600, "label_seeds": [0, 1, 2]}
QUICK = {"subjects": 10, "size": 32, "pretrain_steps": 4, "finetune_steps": 4, "label_seeds": [0]}
MODEL = {"preset": "tiny", "dim": 128, "depth": 4, "heads": 4}
PUZZLE = {"task": "puzzle", "grid_3d": 2, "loss": "mse+ce", "gap": 0.15}
ARMS = {"scratch": None, "single": "single", "multimodal": "multimodal"}


def common(manifest: Path, size: int, cache: Path, seed: int) -> dict[str, Any]:
    """What every run shares: data, preprocessing (percentile scaling, resized to size^3), the model."""
    return {
        "seed": seed,
        "device": "auto",
        "cache_dir": str(cache),
        "data": [{"path": str(manifest)}],
        "preprocess": {"crop_foreground": False, "size": [size] * 3, "resize": "interpolate"},
        "model": dict(MODEL),
    }


def pretrain(arm: str, mode: str, settings: dict, base: dict, work: Path, translator: str | None) -> Path:
    entry = {**PUZZLE, "modality_mode": mode}
    if translator:
        entry.update(synthetic=True, translators=[translator])
    tree = {
        **base,
        "output": str(work / f"pretrain_{arm}"),
        "pretext": [entry],
        "pretrain": {"splits": ["train"], "visual_samples": 2},
        "train": {
            "steps": settings["pretrain_steps"], "batch_size": 8, "lr": 1e-3, "weight_decay": 0.05,
            "warmup_fraction": 0.05, "checkpoint_every": None, "log_every": 25, "progress": False,
        },
    }  # fmt: skip
    config = build_config(PretrainConfig, tree, f"pretrain {arm}")
    shutil.rmtree(config.output, ignore_errors=True)
    run_pretrain(config)
    return Path(config.output)


def finetune(arm: str, init: Path | None, seed: int, settings: dict, base: dict, work: Path) -> dict:
    model = {**base["model"], **({"init": str(init / "model")} if init else {})}
    tree = {
        **base,
        "model": model,
        "output": str(work / f"finetune_{arm}_seed{seed}"),
        "finetune": {"label_fraction": 0.1, "label_seed": seed, "tasks": ["tumour"]},
        "train": {
            "steps": settings["finetune_steps"], "batch_size": 4, "lr": 5e-4, "weight_decay": 0.05,
            "warmup_fraction": 0.05, "checkpoint_every": None, "log_every": 25, "progress": False,
            "eval_every": max(1, settings["finetune_steps"] // 5),
        },
    }  # fmt: skip
    config = build_config(FinetuneConfig, tree, f"finetune {arm}")
    shutil.rmtree(config.output, ignore_errors=True)
    results = run_finetune(config, progress=False)
    test = results.get("test", {})
    prefix = "brain_phantom/tumour/"
    return {k.removeprefix(prefix): v for k, v in test.items() if k.startswith(prefix + "dice")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny cohort, a few steps: checks the pipeline")
    ap.add_argument("--translator", help="a `medformer generate` run folder's translator/: adds an arm")
    ap.add_argument("--work", default="runs/benchmark_puzzle_multimodal", help="run folders")
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    work = Path(args.work) / ("quick" if args.quick else "full")
    arms = dict(ARMS)
    if args.translator:
        arms["multimodal+synthetic"] = "multimodal"

    start = time.perf_counter()
    cohort = PhantomConfig(n_subjects=settings["subjects"], seed=0, voxel_size_mm=3.0, shape=(64, 64, 64))
    manifest = write_cohort(work / "brain_phantom", cohort, progress=False)
    cohort_seconds = time.perf_counter() - start
    rows: dict[str, dict[str, Any]] = {}
    for arm, mode in arms.items():
        base = common(manifest, settings["size"], work / "cache", seed=0)
        t0 = time.perf_counter()
        translator = args.translator if arm.endswith("synthetic") else None
        init = pretrain(arm, mode, settings, base, work, translator) if mode else None
        pretrain_seconds = time.perf_counter() - t0
        runs = []
        for seed in settings["label_seeds"]:
            t1 = time.perf_counter()
            scores = finetune(arm, init, seed, settings, base, work)
            runs.append({"label_seed": seed, **scores, "seconds": round(time.perf_counter() - t1, 1)})
            print(arm, json.dumps(runs[-1]), flush=True)
        dice = [r["dice_mean"] for r in runs if "dice_mean" in r]
        rows[arm] = {
            "pretrain_seconds": round(pretrain_seconds, 1),
            "dice_mean": float(np.mean(dice)) if dice else float("nan"),
            "dice_sd": float(np.std(dice)) if dice else float("nan"),
            "runs": runs,
        }
        write(rows, args, settings, cohort_seconds, time.perf_counter() - start)


def write(
    rows: dict, args: argparse.Namespace, settings: dict, cohort_seconds: float, seconds: float
) -> None:
    """Results so far (rewritten after every arm)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("puzzle_multimodal_quick" if args.quick else "puzzle_multimodal")
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    summary = {
        "quick": args.quick,
        "settings": settings,
        "model": MODEL,
        "puzzle": PUZZLE,
        "cohort_seconds": round(cohort_seconds, 1),
        "wall_seconds": round(seconds, 1),
        "machine": machine,
        "results": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    title = "# Multimodal vs single-modal puzzle pre-training, 10% labels (simulated brain MRI)"
    lines = [
        title + (" — quick pipeline check, not a result" if args.quick else ""),
        "",
        f"Cohort: {settings['subjects']} simulated subjects (T1w, T1c, T2w, FLAIR; ~20% lack one or two), "
        f"resized to {settings['size']}^3. Pre-training: {settings['pretrain_steps']} steps of 2^3 puzzles; "
        f"fine-tuning: {settings['finetune_steps']} steps, tumour segmentation, 10% of the training labels, "
        f"label subsets {settings['label_seeds']}. Model: Medformer {MODEL}. Machine: {machine['cpu']}, "
        f"{machine['cores']} cores, torch {machine['torch']}. Total {seconds / 60:.1f} min.",
        "",
        "| pre-training | test Dice (mean over classes) | SD over label subsets | pre-training s |",
        "|---|---:|---:|---:|",
    ]
    for arm, r in rows.items():
        lines.append(f"| {arm} | {r['dice_mean']:.4f} | {r['dice_sd']:.4f} | {r['pretrain_seconds']:.0f} |")
    lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
