"""BrainMVP benchmark on the simulated multi-contrast brain cohort (T1w, T1c, T2w, FLAIR; some subjects
lack modalities): the paper's ablation (CMR, +MD, +MCL) and an MAE baseline, each pre-trained on the
training split without labels, then fine-tuned for tumour segmentation with 20%, 40% and 100% of the
labels, against training from scratch; plus BrainMVP with its templates used downstream (missing
modalities filled, template channel mixing). The models fine-tuned with all the labels are also scored
with one and with two modalities withheld at test time (every choice, in turn), the missing images
dropped (Medformer's native way), zero-filled, or filled from the learned templates.

    python benchmarks/brainmvp.py --size quick   # pipeline check: small cohort and model, a few steps
    python benchmarks/brainmvp.py                # CPU-sized: the demo's cohort and model, one label seed
    python benchmarks/brainmvp.py --size full    # the full run (see FULL): for a GPU

Cost of the full run: 4 pre-trainings x 4000 steps and 54 fine-tunings (6 initialisations x 3 label
fractions x 3 seeds) x 1500 steps. Measured on 2 shared CPU cores: ~13 s per pre-training step and
~29 s per fine-tuning step at 64^3 with the tiny preset, i.e. weeks: run it on a GPU (estimated, not
measured: about 0.1 s per step on one H100, ~3 hours in all). On a shared CPU, ``--threads 1`` is often
faster than several threads waiting on each other.

Reports test Dice per class (necrosis, oedema, enhancing) and of the BraTS regions (ET, TC, WT), mean
and SD over label seeds, and the time per optimizer step of every pre-training and fine-tuning run.
Writes benchmarks/results/brainmvp{,_quick,_full}.{json,md,png} after every run, so no work is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medformer.config import build_config
from medformer.data.dataset import CollectionDataset
from medformer.data.phantom import PhantomConfig, write_cohort
from medformer.evaluate.missing import missing_modality_scores, withheld_sets
from medformer.finetune import FinetuneConfig, load_run_model, open_collections, run_finetune
from medformer.pretrain import PretrainConfig, run_pretrain

QUICK = {
    "subjects": 20, "shape": 24, "voxel_mm": 8.0, "seeds": [0],
    "model": {"preset": "tiny", "dim": 96, "depth": 4, "heads": 3},
    "pretrain": {"steps": 40, "batch_size": 4, "lr": 1e-3},
    "finetune": {"steps": 30, "batch_size": 2, "lr": 5e-4},
}  # fmt: skip
DEFAULT = {  # the demo's cohort and model: a CPU-sized run (about 20 min on 2 cores)
    "subjects": 80, "shape": 40, "voxel_mm": 5.0, "seeds": [0],
    "model": {"preset": "tiny", "dim": 96, "depth": 4, "heads": 3},
    "pretrain": {"steps": 400, "batch_size": 4, "lr": 1e-3},
    "finetune": {"steps": 250, "batch_size": 2, "lr": 5e-4},
}  # fmt: skip
FULL = {
    "subjects": 120, "shape": 64, "voxel_mm": 3.0, "seeds": [0, 1, 2],
    "model": {"preset": "tiny"},
    "pretrain": {"steps": 4000, "batch_size": 4, "lr": 3e-4},
    "finetune": {"steps": 1500, "batch_size": 2, "lr": 3e-4},
}  # fmt: skip
FRACTIONS = (0.2, 0.4, 1.0)
# pre-training variants: the paper's ablation (Table 5 of Rui et al. 2025) and the MAE baseline
VARIANTS: dict[str, dict[str, Any]] = {
    "CMR": {"task": "brainmvp", "md_weight": 0.0, "mcl_weight": 0.0},
    "CMR + MD": {"task": "brainmvp", "mcl_weight": 0.0},
    "CMR + MD + MCL (BrainMVP)": {"task": "brainmvp"},
    "MAE": {"task": "mae"},
}
TEMPLATES_ROW = "BrainMVP + templates (fill missing, mix 1)"
CLASSES = ("necrosis", "oedema", "enhancing")
WITHHELD = (0, 1, 2)  # modalities withheld at test time (every choice of that many, in turn)


def slug(name: str) -> str:
    """A folder name for a row label: "CMR + MD (x)" -> "CMR_MD"."""
    return "_".join(w for w in name.split(" (")[0].split() if w.isalnum())


def preprocess(settings: dict) -> dict:
    """Foreground crop, percentile scaling, pad/crop to the cohort's grid: the templates' reference grid."""
    return {"crop_foreground": True, "intensity": "percentile", "size": [settings["shape"]] * 3}


def pretrain(name: str, entry: dict, settings: dict, manifest: Path, work: Path) -> dict:
    """One pre-training run; returns its model folder and seconds per optimizer step."""
    steps = settings["pretrain"]["steps"]
    if entry["task"] == "brainmvp":
        entry = {**entry, "template_shape": [settings["shape"]] * 3, "total_steps": steps}
    out = work / "pretrain" / slug(name)
    tree = {
        "seed": 0, "device": "auto", "output": str(out), "cache_dir": str(work / ".cache"),
        "data": [{"path": str(manifest)}], "preprocess": preprocess(settings), "model": settings["model"],
        "pretext": [entry],
        "train": {**settings["pretrain"], "warmup_fraction": 0.05, "log_every": max(1, steps // 10),
                  "checkpoint_every": None, "progress": True},
    }  # fmt: skip
    config = build_config(PretrainConfig, tree, name)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run_pretrain(config)
    return {
        "model": summary["model"],
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_step": step_seconds(out, settings["pretrain"]["batch_size"]),
        "last_losses": summary.get("losses", {}),
    }


def finetune(init: str | None, templates: dict, fraction: float, seed: int, settings: dict, manifest: Path,
             out: Path, work: Path) -> dict:  # fmt: skip
    """Fine-tune tumour segmentation; test Dice per class and per BraTS region, seconds per step."""
    steps = settings["finetune"]["steps"]
    tree = {
        "seed": seed, "device": "auto", "output": str(out), "cache_dir": str(work / ".cache"),
        "data": [{"path": str(manifest)}], "preprocess": preprocess(settings),
        "model": {**settings["model"], "init": init},
        "finetune": {"label_fraction": fraction, "label_seed": seed, "tasks": ["tumour"]},
        "templates": templates,
        "augment": {"flip": 0.5, "flip_axes": [-1], "intensity_scale": 0.1, "intensity_shift": 0.1},
        "train": {**settings["finetune"], "warmup_fraction": 0.05, "log_every": max(1, steps // 10),
                  "eval_every": steps, "checkpoint_every": None, "progress": True},
        "eval": {"batch_size": 2},
    }  # fmt: skip
    config = build_config(FinetuneConfig, tree, str(out))
    shutil.rmtree(out, ignore_errors=True)
    results = run_finetune(config)
    test = results["test"]
    key = next(k.rsplit("/", 1)[0] for k in test if k.endswith("/dice_mean"))
    scores = {f"dice_{name}": test[f"{key}/dice_{c}"] for c, name in enumerate(CLASSES, start=1)}
    scores["dice_mean"] = test[f"{key}/dice_mean"]
    collections, cache = open_collections(config)
    folder = out / "best" if (out / "best").exists() else out / "model"
    model = load_run_model(folder, config, collections).eval()
    test = CollectionDataset(collections[0], "test", load=cache)
    scores.update(brats_scores(model, test, key))
    if fraction == 1.0:
        scores["missing"] = robustness(model, test, key, collections[0].modalities)
    scores["seconds_per_step"] = step_seconds(out, settings["finetune"]["batch_size"])
    return scores


def brats_scores(model: torch.nn.Module, test: CollectionDataset, key: str) -> dict[str, float]:
    """Test Dice of the BraTS regions ET, TC, WT with the run's selected model, its missing modalities
    handled as the model itself does (from the templates when fine-tuned with ``fill_missing``)."""
    fills = model.templates is not None and model.templates.fill_missing
    scores = missing_modality_scores(model, test, key, [()], "template" if fills else "drop")
    return {k: v for k, v in scores.items() if k != "n"}


def robustness(model: torch.nn.Module, test: CollectionDataset, key: str, modalities: list[str]) -> dict:
    """BraTS-region Dice with 0, 1, 2 modalities withheld (each choice in turn), per way of filling them;
    template filling only where pre-training learned templates (MD on)."""
    templates = getattr(model, "templates", None)
    learned = templates is not None and any(
        bool(v.detach().abs().sum() > 0) for v in templates.volumes.values()
    )
    fills = ["drop", "zero"] + (["template"] if learned else [])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k in WITHHELD:
        for fill in fills:
            r = missing_modality_scores(model, test, key, withheld_sets(modalities, k), fill)
            r["dice_regions"] = float(np.mean([r["dice_ET"], r["dice_TC"], r["dice_WT"]]))
            out.setdefault(str(k), {})[fill] = r
    return out


def step_seconds(run: Path, batch_size: int) -> float:
    """Median seconds per optimizer step over the run's logged windows (no evaluation inside them)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [batch_size / r["samples_per_s"] for r in records if r.get("samples_per_s") and "split" not in r]
    return round(statistics.median(times), 3) if times else float("nan")


def summarise(runs: list[dict]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k.startswith("dice")] + ["seconds_per_step"]
    out: dict[str, Any] = {f"{k}_mean": float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({f"{k}_sd": float(np.std([r[k] for r in runs])) for k in keys if k.startswith("dice")})
    if "missing" in runs[0]:  # mean over label seeds of each (withheld, fill) entry
        out["missing"] = {
            k: {fill: {m: float(np.mean([r["missing"][k][fill][m] for r in runs])) for m in entry}
                for fill, entry in per_fill.items()}
            for k, per_fill in runs[0]["missing"].items()
        }  # fmt: skip
    return {**out, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size",
        choices=("quick", "default", "full"),
        default="default",
        help="quick: pipeline check; default: CPU-sized (~20 min, 2 cores); full: for a GPU",
    )
    ap.add_argument("--work", default="runs/benchmark_brainmvp", help="cohort, cache and run folders")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: every core of this process)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    settings = {"quick": QUICK, "default": DEFAULT, "full": FULL}[args.size]
    args.quick = args.size == "quick"
    work = Path(args.work) / args.size
    wall = time.perf_counter()
    cohort = PhantomConfig(
        n_subjects=settings["subjects"],
        voxel_size_mm=settings["voxel_mm"],
        shape=(settings["shape"],) * 3,
        tumour_radius_mm=(20.0, 35.0) if args.size == "default" else PhantomConfig.tumour_radius_mm,
    )
    manifest = write_cohort(work / "data" / "brain_phantom", cohort)
    result: dict[str, Any] = {
        "quick": args.quick, "size": args.size, "settings": settings, "fractions": list(FRACTIONS),
        "variants": VARIANTS,
        "pretrain": {}, "finetune": {}, "complete": False,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
    }  # fmt: skip

    inits: dict[str, tuple[str | None, dict]] = {"scratch": (None, {})}
    for name, entry in VARIANTS.items():
        result["pretrain"][name] = pretrain(name, entry, settings, manifest, work)
        inits[name] = (result["pretrain"][name]["model"], {})
        write(result, args, wall)
    inits[TEMPLATES_ROW] = (inits["CMR + MD + MCL (BrainMVP)"][0], {"fill_missing": True, "mix": 1})

    for name, (init, templates) in inits.items():
        for fraction in FRACTIONS:
            runs = []
            for seed in settings["seeds"]:
                folder = work / "finetune" / slug(name) / f"f{fraction}_s{seed}"
                runs.append(finetune(init, templates, fraction, seed, settings, manifest, folder, work))
            result["finetune"].setdefault(name, {})[str(fraction)] = summarise(runs)
            write(result, args, wall)
    result["complete"] = True
    write(result, args, wall)
    print(markdown(result))


def write(result: dict, args: argparse.Namespace, wall: float) -> None:
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    result["cpu_seconds"] = round(time.process_time(), 1)  # this process's CPU time, all threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = {"quick": "brainmvp_quick", "default": "brainmvp", "full": "brainmvp_full"}[args.size]
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    draw(result, out / f"{stem}.png")


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# BrainMVP on the simulated brain cohort: tumour segmentation, test Dice",
        "",
        f"Cohort: {s['subjects']} subjects, {s['shape']}^3 at {s['voxel_mm']} mm; model {s['model']}; "
        f"pre-training {s['pretrain']}; fine-tuning {s['finetune']}; label seeds {s['seeds']}.",
        "",
        "| initialisation | labels | ET | TC | WT | necrosis | oedema | enhancing | mean | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_fraction in result["finetune"].items():
        for fraction, r in per_fraction.items():
            cells = [
                f"{r[f'dice_{k}_mean']:.3f} ± {r[f'dice_{k}_sd']:.3f}"
                for k in ("ET", "TC", "WT", *CLASSES, "mean")
            ]
            step = r["seconds_per_step_mean"]
            lines.append(f"| {name} | {float(fraction):.0%} | " + " | ".join(cells) + f" | {step:.2f} |")
    lines += missing_table(result)
    lines += ["", "Pre-training:", "", "| variant | s/step | seconds | last losses |", "|---|---:|---:|---|"]
    for name, r in result["pretrain"].items():
        losses = ", ".join(f"{k} {v:.4g}" for k, v in r["last_losses"].items())
        lines.append(f"| {name} | {r['seconds_per_step']:.2f} | {r['seconds']:.0f} | {losses} |")
    quick = " (quick mode: a pipeline check, not a result)" if result["quick"] else ""
    quick += "" if result["complete"] else " so far (run not complete)"
    lines += [
        "",
        f"Wall time: {result['wall_seconds'] / 60:.1f} min{quick}; "
        f"CPU time {result['cpu_seconds'] / 60:.1f} min ({result['machine']['threads']} thread(s)).",
        f"Machine: {result['machine']}",
        "",
    ]
    return "\n".join(lines)


def missing_table(result: dict) -> list[str]:
    """Markdown: Dice with 0 / 1 / 2 modalities withheld, per initialisation and fill, 100% labels."""
    rows = [
        (name, r["1.0"]["missing"]) for name, r in result["finetune"].items() if "missing" in r.get("1.0", {})
    ]
    if not rows:
        return []
    lines = [
        "",
        "Missing modalities at test time (100% labels): whole-tumour Dice / mean of ET, TC, WT Dice, "
        "mean over every choice of the withheld modalities. drop: marked absent (no tokens); zero: "
        "zero images; template: the learned BrainMVP templates.",
        "",
        "| initialisation | fill | none withheld | 1 withheld | 2 withheld |",
        "|---|---|---:|---:|---:|",
    ]
    for name, missing in rows:
        for fill in missing["0"]:
            cells = [f"{missing[str(k)][fill]['dice_WT']:.3f} / {missing[str(k)][fill]['dice_regions']:.3f}"
                     for k in WITHHELD]  # fmt: skip
            lines.append(f"| {name} | {fill} | " + " | ".join(cells) + " |")
    return lines


def draw(result: dict, path: Path) -> None:
    """Whole-tumour and mean region Dice vs label fraction per initialisation; whole-tumour Dice vs the
    number of withheld modalities per initialisation and fill (100% labels)."""
    from matplotlib.figure import Figure

    if not result["finetune"]:
        return
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    colours = {name: f"C{i}" for i, name in enumerate(result["finetune"])}
    for ax, metric, title in ((axes[0], "WT", "whole tumour"), (axes[1], "mean", "mean of 3 classes")):
        for name, per_fraction in result["finetune"].items():
            x = [float(f) for f in per_fraction]
            y = [r[f"dice_{metric}_mean"] for r in per_fraction.values()]
            sd = [r[f"dice_{metric}_sd"] for r in per_fraction.values()]
            ax.errorbar(x, y, yerr=sd, marker="o", capsize=3, color=colours[name], label=name)
        ax.set_xticks(FRACTIONS, [f"{f:.0%}" for f in FRACTIONS])
        ax.set(xlabel="training labels used", ylabel="test Dice", title=f"Tumour segmentation: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    styles = {"drop": "-", "zero": "--", "template": ":"}
    for name, per_fraction in result["finetune"].items():
        missing = per_fraction.get("1.0", {}).get("missing")
        for fill in missing["0"] if missing else ():
            y = [missing[str(k)][fill]["dice_WT"] for k in WITHHELD]
            axes[2].plot(WITHHELD, y, styles[fill], marker="o", color=colours[name], label=f"{name}, {fill}")
    axes[2].set_xticks(WITHHELD)
    title = "Missing modalities (100% labels)\nsolid: drop, dashed: zero-fill, dotted: template-fill"
    axes[2].set(xlabel="modalities withheld at test time", ylabel="test whole-tumour Dice", title=title)
    axes[2].grid(alpha=0.3)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
