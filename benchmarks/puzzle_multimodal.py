"""Multimodal vs single-modal jigsaw pre-training, judged by fine-tuning with 10% of the labels.

The question of Taleb et al. (2019/2021): do puzzles whose tiles come from different modalities of a
subject (T1w, T1c, T2w, FLAIR) teach a better representation than puzzles cut from one modality? On
the simulated multi-contrast brain MRI cohort (`medformer.data.phantom`), three arms share everything
but the pre-training:

- ``scratch``: no pre-training;
- ``single``: 3^3 puzzles, every tile of a puzzle from one (random) modality;
- ``multimodal``: 3^3 puzzles, every tile from a random modality of that subject;
- ``multimodal+synthetic`` (with ``--translator DIR``, a `medformer generate` run): as ``multimodal``, and
  a subject's missing modality is synthesised for the puzzles (never for fine-tuning).

Each arm then fine-tunes tumour segmentation (4 classes) with 10% of the training labels (stratified;
three label subsets) with the demo's recipe and a fixed step budget, and is scored on the test split:
mean Dice over the classes and whole-tumour Dice. All through the library's commands: ``run_pretrain``
(``pretext: [{task: puzzle, ...}]``) and ``run_finetune``.

    python benchmarks/puzzle_multimodal.py                  # the demo's cohort and model (~15 min, 2 cores)
    python benchmarks/puzzle_multimodal.py --size full      # 3 mm, bigger model, longer (hours on a CPU)
    python benchmarks/puzzle_multimodal.py --size quick     # pipeline check: tiny cohort, a few steps

Writes benchmarks/results/puzzle_multimodal[_quick|_full].{json,md,png}.
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

SIZES = {  # quick: pipeline check; default: about 15 min on 2 CPU cores; full: hours on a CPU
    "quick": {"subjects": 10, "voxel_mm": 5.0, "grid": 40, "size": [32, 40, 32], "pretrain_steps": 4,
              "finetune_steps": 4, "label_seeds": [0], "model": {"dim": 48, "depth": 2, "heads": 2}},
    "default": {"subjects": 80, "voxel_mm": 5.0, "grid": 40, "size": [32, 40, 32], "pretrain_steps": 600,
                "finetune_steps": 250, "label_seeds": [0, 1, 2],
                "model": {"dim": 96, "depth": 4, "heads": 3}},
    "full": {"subjects": 200, "voxel_mm": 3.0, "grid": 64, "size": [56, 64, 48], "pretrain_steps": 4000,
             "finetune_steps": 1000, "label_seeds": [0, 1, 2],
             "model": {"dim": 192, "depth": 8, "heads": 3}},
}  # fmt: skip
PUZZLE = {"task": "puzzle", "grid_3d": 3, "loss": "mse+ce", "gap": 0.15}
ARMS = {"scratch": None, "single": "single", "multimodal": "multimodal"}


def common(manifest: Path, settings: dict, cache: Path, seed: int) -> dict[str, Any]:
    """What every run shares: data, preprocessing (crop to the brain, percentile scaling, padded to
    the grid), the model."""
    return {
        "seed": seed,
        "device": "auto",
        "cache_dir": str(cache),
        "data": [{"path": str(manifest)}],
        "preprocess": {"crop_foreground": True, "intensity": "percentile", "size": settings["size"]},
        "model": dict(settings["model"]),
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
            "steps": settings["pretrain_steps"], "batch_size": 4, "lr": 1e-3, "weight_decay": 0.05,
            "warmup_fraction": 0.05, "checkpoint_every": None, "log_every": 25, "progress": False,
        },
    }  # fmt: skip
    config = build_config(PretrainConfig, tree, f"pretrain {arm}")
    shutil.rmtree(config.output, ignore_errors=True)
    run_pretrain(config)
    return Path(config.output)


def finetune(arm: str, init: Path | None, seed: int, settings: dict, base: dict, work: Path) -> dict:
    """Tumour segmentation with 10% of the labels; the model after the last step is scored (a fixed
    budget, the demo's recipe): Dice per class, their mean, and the whole-tumour Dice."""
    model = {**base["model"], **({"init": str(init / "model")} if init else {})}
    steps = settings["finetune_steps"]
    tree = {
        **base,
        "model": model,
        "output": str(work / f"finetune_{arm}_seed{seed}"),
        "finetune": {"label_fraction": 0.1, "label_seed": seed, "tasks": ["tumour"]},
        "augment": {"flip": 0.5, "flip_axes": [-1], "intensity_scale": 0.1, "intensity_shift": 0.1},
        "train": {
            "steps": steps, "batch_size": 2, "lr": 5e-4, "weight_decay": 0.05, "warmup_fraction": 0.1,
            "checkpoint_every": None, "log_every": max(1, steps // 10), "progress": False,
            "eval_every": steps,
        },
        "eval": {"batch_size": 4},
    }  # fmt: skip
    config = build_config(FinetuneConfig, tree, f"finetune {arm}")
    shutil.rmtree(config.output, ignore_errors=True)
    results = run_finetune(config, progress=False)
    test = results.get("test", {})
    prefix = "brain_phantom/tumour/"
    scores = {k.removeprefix(prefix): v for k, v in test.items() if k.startswith(prefix + "dice")}
    scores["dice_WT"] = whole_tumour_dice(Path(config.output))
    return scores


def whole_tumour_dice(run: Path) -> float:
    """Mean over test subjects of the whole-tumour Dice (every tumour label against background)."""
    from medformer.config import load_config
    from medformer.data.dataset import CollectionDataset
    from medformer.evaluate.examples import mean_region_dice
    from medformer.finetune import load_run_model, model_folder, open_collections

    config = load_config(FinetuneConfig, run / "config.yaml")
    collections, cache = open_collections(config)
    col = collections[0]
    model = load_run_model(model_folder(run), config, collections)
    test = CollectionDataset(col, "test", load=cache)
    return mean_region_dice(model, test, f"{col.name}/tumour", (1, 2, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="default", help="quick | default | full")
    ap.add_argument("--translator", help="a `medformer generate` run folder's translator/: adds an arm")
    ap.add_argument("--work", default="runs/benchmark_puzzle_multimodal", help="run folders")
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = SIZES[args.size]
    work = Path(args.work) / args.size
    arms = dict(ARMS)
    if args.translator:
        arms["multimodal+synthetic"] = "multimodal"

    start = time.perf_counter()
    cohort = PhantomConfig(n_subjects=settings["subjects"], seed=0, voxel_size_mm=settings["voxel_mm"],
                           shape=(settings["grid"],) * 3, tumour_radius_mm=(20.0, 35.0))  # fmt: skip
    manifest = write_cohort(work / "brain_phantom", cohort, progress=False)
    cohort_seconds = time.perf_counter() - start
    rows: dict[str, dict[str, Any]] = {}
    for arm, mode in arms.items():
        base = common(manifest, settings, work / "cache", seed=0)
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
        rows[arm] = {"pretrain_seconds": round(pretrain_seconds, 1), "runs": runs}
        for key in ("dice_mean", "dice_WT"):
            values = [r[key] for r in runs if key in r]
            rows[arm][key] = float(np.mean(values)) if values else float("nan")
            rows[arm][key.replace("dice", "sd")] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        write(rows, args, settings, cohort_seconds, time.perf_counter() - start)


def write(
    rows: dict, args: argparse.Namespace, settings: dict, cohort_seconds: float, seconds: float
) -> None:
    """Results so far (rewritten after every arm): JSON, Markdown table, bar plot."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("puzzle_multimodal" + ("" if args.size == "default" else f"_{args.size}"))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    summary = {
        "size": args.size,
        "settings": settings,
        "puzzle": PUZZLE,
        "cohort_seconds": round(cohort_seconds, 1),
        "wall_seconds": round(seconds, 1),
        "machine": machine,
        "results": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    title = "# Multimodal vs single-modal puzzle pre-training, 10% labels (simulated brain MRI)"
    lines = [
        title + (" — quick pipeline check, not a result" if args.size == "quick" else ""),
        "",
        f"Cohort: {settings['subjects']} simulated subjects (T1w, T1c, T2w, FLAIR; ~20% lack one or two) at "
        f"{settings['voxel_mm']:g} mm, cropped to the brain and padded to {settings['size']}. Pre-training: "
        f"{settings['pretrain_steps']} steps of 3^3 puzzles (batch 4); fine-tuning: "
        f"{settings['finetune_steps']} steps (batch 2), tumour segmentation, 10% of the training labels, "
        f"label subsets {settings['label_seeds']}, the model after the last step scored. "
        f"Model: Medformer {settings['model']}. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}. Total "
        f"{seconds / 60:.1f} min.",
        "",
        "| pre-training | test Dice (mean over classes) | whole-tumour Dice | pre-training s |",
        "|---|---:|---:|---:|",
    ]
    for arm, r in rows.items():
        lines.append(
            f"| {arm} | {r['dice_mean']:.4f} ± {r['sd_mean']:.4f} | {r['dice_WT']:.4f} ± {r['sd_WT']:.4f} "
            f"| {r['pretrain_seconds']:.0f} |"
        )
    lines += ["", "Mean ± SD over the label subsets.", "", f"![results]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, stem.with_suffix(".png"))


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    colours = ("#999999", "#D55E00", "#0072B2", "#009E73")
    for ax, key, sd, label in ((axes[0], "dice_mean", "sd_mean", "test Dice (mean of 3 classes)"),
                               (axes[1], "dice_WT", "sd_WT", "test whole-tumour Dice")):  # fmt: skip
        names = list(rows)
        ax.bar(names, [rows[n][key] for n in names], yerr=[rows[n][sd] for n in names], capsize=3,
               color=colours[: len(names)])  # fmt: skip
        for i, n in enumerate(names):
            for run in rows[n]["runs"]:
                ax.plot(i, run.get(key, np.nan), "k.", ms=4)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        "puzzle pre-training, then segmentation with 10% of the labels (dots: label subsets)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
