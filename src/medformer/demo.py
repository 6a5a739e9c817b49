"""`medformer demo`: the whole workflow on built-in data, with nothing of the user's needed.

    simulated multi-contrast brain MRI cohort (T1w, T1c, T2w, FLAIR; tumours; missing modalities)
    -> inspect -> preprocess once into the cache
    -> pre-train one Medformer without labels: multimodal jigsaw puzzles (when the task is available),
       BrainMVP (cross-modal reconstruction, modality templates, modality-aware contrast) and MAE
    -> fine-tune tumour segmentation and the enhancing / non-enhancing class, each with 10% and 100%
       of the training labels, from the pre-trained model and from scratch (per task: same recipe and
       steps, the model after the last step scored)
    -> score every run on the test split -> report.html, report.md and results.json in the run folder

Sizes (`SIZES`): ``quick`` checks the pipeline in about a minute, ``default`` is the demonstration
(minutes on a laptop CPU), ``full`` a bigger cohort, grid and model for a GPU. Every stage writes into
the run folder; the report is built from those files alone (`write_demo_report`), so ``medformer
evaluate --run runs/demo`` rebuilds it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medformer.config import PreprocessConfig, build_config, load_config
from medformer.data.cache import PreprocessCache
from medformer.data.inspect import inspect_collection
from medformer.data.manifest import open_collection
from medformer.data.phantom import PhantomConfig, write_cohort
from medformer.data.transforms import Preprocessor
from medformer.evaluate.examples import dice, overlay_rows, predict_labels, segmentation_examples
from medformer.evaluate.figures import (
    grouped_curves,
    label_efficiency,
    objective_curves,
    puzzle_figure,
    run_curves,
    segmentation_overlays,
    study_figure,
)
from medformer.evaluate.report import Image, Section, figure_png, pretext_caption, read_metrics, write_report
from medformer.runtime import prepare_output, resolve_device, seed_everything

log = logging.getLogger("medformer.demo")
SEGMENTATION, CLASSIFICATION = "tumour", "enhancing"  # the cohort's tasks that are fine-tuned
PRETEXT_LOGS = {  # panels of the pre-training task logs: title -> (y label, {metrics key: line label})
    "BrainMVP: the parts of its loss": ("unweighted loss", {
        "brainmvp/md": "MD (template-filled view)", "brainmvp/cmr": "CMR (cross-modal view)",
        "brainmvp/mcl": "MCL (contrastive)"}),
    "jigsaw puzzles": ("fraction of the batch", {
        "puzzle/tiles_correct": "tiles placed right", "puzzle/solved": "puzzles solved"}),
}  # fmt: skip
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}  # BraTS regions: whole tumour, core, enhancing


@dataclass(frozen=True)
class DemoSize:
    """How big a demo run is: cohort, grid, model and step counts. Every fine-tuning run of one task
    gets the same recipe and number of steps, from the pre-trained model or from scratch."""

    name: str
    subjects: int
    voxel_mm: float  # the simulated cohort's voxel size ...
    grid: int  # ... and grid (voxels per axis); 5 mm x 40 spans 200 mm, the whole head
    size: tuple[int, int, int]  # preprocessed arrays (z, y, x): the brain's box, padded to patches
    tumour_radius_mm: tuple[float, float] = (20.0, 35.0)  # whole tumours of ~25-270 ml, median ~100 ml
    model: dict[str, int] = field(default_factory=dict)  # Medformer width / depth / heads
    pretrain_steps: int = 400
    pretrain_batch: int = 4
    pretrain_lr: float = 1e-3
    segmentation_steps: int = 250
    classification_steps: int = 300  # a classification step costs about a third of a segmentation step
    finetune_batch: int = 2
    segmentation_lr: float = 5e-4
    classification_lr: float = 1e-3
    puzzle_grid: int = 3  # 3^3 tiles per 3D puzzle
    fractions: tuple[float, ...] = (0.1, 1.0)
    examples: int = 3  # test subjects drawn with their segmentations

    def steps(self, task: str) -> int:
        return self.segmentation_steps if task == SEGMENTATION else self.classification_steps

    def lr(self, task: str) -> float:
        return self.segmentation_lr if task == SEGMENTATION else self.classification_lr


SIZES: dict[str, DemoSize] = {
    "quick": DemoSize(
        "quick", subjects=12, voxel_mm=5.0, grid=40, size=(32, 40, 32),
        model={"dim": 48, "depth": 2, "heads": 2},
        pretrain_steps=6, pretrain_batch=2, segmentation_steps=6, classification_steps=4,
        puzzle_grid=2, examples=2,
    ),
    "default": DemoSize(
        "default", subjects=80, voxel_mm=5.0, grid=40, size=(32, 40, 32),
        model={"dim": 96, "depth": 4, "heads": 3},
    ),
    "full": DemoSize(
        "full", subjects=200, voxel_mm=3.0, grid=64, size=(56, 64, 48),
        model={"dim": 192, "depth": 8, "heads": 3},
        pretrain_steps=4000, pretrain_batch=8, pretrain_lr=5e-4, segmentation_steps=1500,
        classification_steps=1000, finetune_batch=4, segmentation_lr=3e-4, classification_lr=5e-4,
        fractions=(0.1, 0.3, 1.0), examples=4,
    ),
}  # fmt: skip
TASKS = (SEGMENTATION, CLASSIFICATION)


def run_label(pretrained: bool, fraction: float) -> str:
    """The name of a pair of fine-tuning runs in the report, e.g. "pre-trained, 10% labels"."""
    return f"{'pre-trained' if pretrained else 'scratch'}, {100 * fraction:g}% labels"


def run_folder(pretrained: bool, fraction: float, task: str) -> str:
    return f"finetune/{task}_{'pretrained' if pretrained else 'scratch'}_{100 * fraction:g}"


def preprocess_config(size: DemoSize) -> PreprocessConfig:
    """Crop to the brain, scale intensities per study (0.5-99.5 percentiles), pad to the grid."""
    return PreprocessConfig(crop_foreground=True, intensity="percentile", size=list(size.size))


def available_task(name: str) -> str | None:
    """None when the pretext task ``name`` can be built, else why not (it is then left out)."""
    from medformer.pretext.registry import task_class

    try:
        task_class(name)
    except Exception as e:  # a task module that does not import must not stop the demo
        return f"{type(e).__name__}: {e}"
    return None


def pretext_entries(size: DemoSize) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The pre-training tasks (multimodal puzzle, BrainMVP, MAE, whichever exist) and those left out."""
    candidates = {
        "puzzle": {"task": "puzzle", "grid_3d": size.puzzle_grid, "modality_mode": "multimodal",
                   "loss": "mse+ce"},
        "brainmvp": {"task": "brainmvp", "template_shape": list(size.size),
                     "total_steps": size.pretrain_steps},
        "mae": {"task": "mae", "masking": "block", "block_size": 8, "mask_ratio": 0.75, "decoder_dim": 64,
                "decoder_depth": 1},
    }  # fmt: skip
    entries, missing = [], {}
    for name, entry in candidates.items():
        why = available_task(name)
        if why is None:
            entries.append(entry)
        else:
            missing[name] = why
    return entries, missing


def _stage(number: int, total: int, title: str) -> float:
    print(f"\n== {number}/{total} {title}", flush=True)
    return time.perf_counter()


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def run_demo(
    output: str | Path = "runs/demo",
    size: str | DemoSize = "default",
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the demo into ``output`` and return its results (also in ``results.json``).

    ``size``: a name of `SIZES` or a `DemoSize`; ``threads``: torch CPU threads (default: torch's
    choice, one per core; on a machine shared with other jobs one thread is often faster).
    """
    from medformer.finetune import FinetuneConfig, run_finetune
    from medformer.pretrain import PretrainConfig, run_pretrain

    settings = SIZES[size] if isinstance(size, str) else size
    if threads:
        torch.set_num_threads(threads)
    wall = time.perf_counter()
    out = prepare_output(output)
    seed_everything(seed)
    dev = resolve_device(device)
    for stale in ("pretrain", "finetune"):  # this demo's own runs: a rerun starts them afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    entries, left_out = pretext_entries(settings)
    state: dict[str, Any] = {
        "size": asdict(settings),
        "seed": seed,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "pretext": entries,
        "pretext_left_out": left_out,
        "timings": {},
        "runs": {},
    }
    total = 6
    runs = 2 * len(settings.fractions)
    print(
        f"medformer demo ({settings.name}): {settings.subjects} simulated subjects, Medformer "
        f"{settings.model}; {settings.pretrain_steps} pre-training steps, then {runs} x "
        f"{settings.segmentation_steps} segmentation and {runs} x {settings.classification_steps} "
        f"classification steps on {dev} ({torch.get_num_threads()} threads)",
        flush=True,
    )

    t = _stage(1, total, "simulated brain MRI cohort (T1w, T1c, T2w, FLAIR; tumours; missing modalities)")
    cohort = PhantomConfig(
        n_subjects=settings.subjects,
        seed=seed,
        voxel_size_mm=settings.voxel_mm,
        shape=(settings.grid,) * 3,
        tumour_radius_mm=settings.tumour_radius_mm,
    )
    manifest = write_cohort(out / "data" / "brain_phantom", cohort)
    state["manifest"] = str(manifest)
    state["timings"]["cohort"] = _since(t)

    t = _stage(2, total, "inspect, then preprocess once into the cache")
    collection = open_collection(manifest)
    report = inspect_collection(collection)
    print(report.format())
    state["inspect"] = report.to_dict()
    cache = PreprocessCache(out / "cache", Preprocessor(preprocess_config(settings)))
    prepared, skipped = cache.prepare(collection, skip_bad=True)
    state["cohort"] = cohort_summary(prepared, settings)
    state["cohort"]["skipped"] = len(skipped)
    state["timings"]["inspect + preprocess"] = _since(t)
    _save_state(out, state)

    common = {
        "seed": seed,
        "device": device,
        "cache_dir": str(out / "cache"),
        "data": [{"path": str(manifest)}],
        "preprocess": preprocess_config(settings).model_dump(),
    }
    names = ", ".join(e["task"] for e in entries)
    t = _stage(3, total, f"pre-training without labels: {names}")
    for name, why in left_out.items():
        print(f"  (pretext task {name!r} is not available and is left out: {why})")
    pretrain = build_config(
        PretrainConfig,
        {
            **common,
            "output": str(out / "pretrain"),
            "model": settings.model,
            "pretext": entries,
            "train": {
                "steps": settings.pretrain_steps,
                "batch_size": settings.pretrain_batch,
                "lr": settings.pretrain_lr,
                "warmup_fraction": 0.05,
                "log_every": max(1, settings.pretrain_steps // 30),
                "checkpoint_every": None,
                "keep_last": 1,
            },
        },
        "demo pre-training",
    )
    summary = run_pretrain(pretrain)
    state["pretrain"] = {"folder": "pretrain", "losses": summary.get("losses", {})}
    state["timings"]["pre-training"] = _since(t)
    _save_state(out, state)

    t = _stage(4, total, f"fine-tuning {SEGMENTATION} segmentation and the {CLASSIFICATION} class")
    for fraction in settings.fractions:
        for pretrained in (True, False):
            label = run_label(pretrained, fraction)
            state["runs"][label] = {"pretrained": pretrained, "fraction": fraction, "folders": {}}
            for task in TASKS:
                folder = run_folder(pretrained, fraction, task)
                print(f"\n-- {task}: {label}", flush=True)
                start = time.perf_counter()
                tree = finetune_tree(settings, common, out, folder, task, pretrained, fraction, seed)
                config = build_config(FinetuneConfig, tree, folder)
                test = run_finetune(config).get("test", {})
                state["runs"][label]["folders"][task] = folder
                state["timings"][f"fine-tuning {task}: {label}"] = _since(start)
                shown = {
                    k.rsplit("/", 1)[1]: v for k, v in test.items() if k.endswith(("/dice_mean", "/auc"))
                }
                print("   test: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()), flush=True)
                _save_state(out, state)
    state["timings"]["fine-tuning (all runs)"] = _since(t)

    t = _stage(5, total, "test-set evaluation: BraTS regions and example segmentations")
    state["timings"]["report"] = 0.0
    state["timings"]["total"] = _since(wall)
    _save_state(out, state)
    results = write_demo_report(out, device=str(dev), stage_start=t)
    print(f"\n== 6/{total} report: {out / 'report.html'}")
    _print_headline(json.loads((out / "results.json").read_text()))
    return results


def finetune_tree(
    settings: DemoSize,
    common: dict[str, Any],
    out: Path,
    folder: str,
    task: str,
    pretrained: bool,
    fraction: float,
    seed: int,
) -> dict[str, Any]:
    """One fine-tuning run's config: the same recipe from the pre-trained model and from scratch.

    The model after the last step is scored (validation runs once, at the end): a fixed budget, no
    early-stopping choice on 12 validation subjects to add noise to the comparison.
    """
    steps = settings.steps(task)
    return {
        **common,
        "output": str(out / folder),
        "model": {**settings.model, "init": str(out / "pretrain") if pretrained else None},
        "finetune": {"label_fraction": fraction, "label_seed": seed, "tasks": [task]},
        "augment": {"flip": 0.5, "flip_axes": [-1], "intensity_scale": 0.1, "intensity_shift": 0.1},
        "train": {
            "steps": steps,
            "batch_size": settings.finetune_batch,
            "lr": settings.lr(task),
            "warmup_fraction": 0.1,
            "log_every": max(1, steps // 25),
            "eval_every": steps,
            "checkpoint_every": None,
            "keep_last": 1,
        },
        "eval": {"batch_size": 4},
    }


def _save_state(out: Path, state: dict[str, Any]) -> None:
    (out / "demo.json").write_text(json.dumps(state, indent=1, default=str))


def cohort_summary(collection: Any, settings: DemoSize) -> dict[str, Any]:
    """Subjects, tumours, enhancing tumours and missing modalities per split."""
    modalities = list(collection.modalities)
    per_split: dict[str, dict[str, int]] = {}
    for s in collection.studies:
        row = per_split.setdefault(s.split, {"subjects": 0, "enhancing": 0, "missing a modality": 0})
        row["subjects"] += 1
        row["enhancing"] += int(np.asarray(s.labels.get(CLASSIFICATION, 0)).reshape(-1)[0])
        row["missing a modality"] += int(len(s.modalities) < len(modalities))
    counts = {m: sum(m in s.modalities for s in collection.studies) for m in modalities}
    return {
        "subjects": len(collection.studies),
        "splits": per_split,
        "modalities": counts,
        "voxel_mm": settings.voxel_mm,
        "grid": [settings.grid] * 3,
        "preprocessed": list(settings.size),
    }


# ----------------------------------------------------------------------------------------------------
# The report


def write_demo_report(
    run: str | Path, device: str | None = None, stage_start: float | None = None
) -> dict[str, dict[str, float]]:
    """Score the demo's fine-tuned models on the test split (per class and BraTS region), draw every
    figure and write results.json, report.md and report.html into ``run``. Reads only the run folder
    (``demo.json`` and the runs it names), so a finished demo can be reported again."""
    from medformer.data.dataset import CollectionDataset
    from medformer.finetune import FinetuneConfig, load_run_model, model_folder, open_collections

    run = Path(run)
    state = json.loads((run / "demo.json").read_text())
    size = state["size"]
    dev = resolve_device(device or "auto")
    start = time.perf_counter() if stage_start is None else stage_start

    # the metrics each run wrote, and the test label maps of every segmentation model
    results: dict[str, dict[str, float]] = {}
    maps: dict[str, dict[str, np.ndarray]] = {}
    histories: dict[str, dict[str, list[dict[str, Any]]]] = {task: {} for task in TASKS}
    examples: list = []
    classes: list[str] = []
    for label, info in state["runs"].items():
        row: dict[str, float] = {}
        for task, folder in ((t, run / f) for t, f in info["folders"].items()):
            config = load_config(FinetuneConfig, folder / "config.yaml")
            collections, cache = open_collections(config)
            col = collections[0]
            spec = next(t for t in col.tasks if t.name == SEGMENTATION)
            classes = list(spec.classes or [str(c) for c in range(spec.num_classes)])
            scores = json.loads((folder / "results.json").read_text())["results"].get("test", {})
            row.update(_rename(scores, col.name, classes))
            histories[task][label] = read_metrics(folder)
            if task != SEGMENTATION:
                continue
            model = load_run_model(model_folder(folder), config, collections).to(dev)
            test = CollectionDataset(col, "test", load=cache)
            examples = examples or segmentation_examples(test, spec.key)
            maps[label] = predict_labels(model, test, f"{col.name}/{SEGMENTATION}", device=dev)
            truth = {e.id: e.truth for e in examples}
            for region, labels in REGIONS.items():
                values = [dice(maps[label][i], truth[i], labels) for i in truth if i in maps[label]]
                row[f"{SEGMENTATION}/dice_{region}"] = float(np.mean(values)) if values else float("nan")
        results[label] = row

    headline = _headline(results, state)
    shown = examples[: size["examples"]]
    sections = [
        _configuration(state),
        _data_section(run, state, classes),
        _timings(state, _since(start)),
    ]
    fractions: dict[str, dict[float, dict[str, float]]] = {}
    for label, info in state["runs"].items():
        init = "pre-trained" if info["pretrained"] else "scratch"
        fractions.setdefault(init, {})[float(info["fraction"])] = results[label]
    figure = label_efficiency(
        fractions,
        {
            f"{SEGMENTATION}/dice_mean": "tumour Dice (mean of 3 classes)",
            f"{SEGMENTATION}/dice_WT": "whole-tumour Dice",
            f"{CLASSIFICATION}/auc": "enhancing tumour: AUC",
        },
        "test metrics against the share of training labels",
    )
    sections.append(
        Section(
            "Label efficiency",
            text="Each point is one fine-tuning run scored on the test split: the same recipe and number of "
            "steps, from the pre-trained model (solid) or from random weights (dashed).",
            images=[
                Image(
                    "test metric vs fraction of training labels, pre-trained vs scratch", figure_png(figure)
                )
            ],
        )
    )
    notes = {
        label: {ex.id: f"WT Dice {dice(m[ex.id], ex.truth, REGIONS['WT']):.2f}" for ex in shown if ex.id in m}
        for label, m in maps.items()
    }
    overlay = segmentation_overlays(
        overlay_rows(shown, maps, notes), classes, "test subjects: truth vs each fine-tuned model"
    )
    sections.append(
        Section(
            "Segmentation examples",
            text="Axial slices through the largest tumour cross-section of test subjects, in radiological "
            "view (A anterior at the top, the subject's right R on the left): the true labels, then the "
            "prediction of each fine-tuned model with its whole-tumour Dice on that subject.",
            images=[Image("test subjects: ground truth and predicted tumour classes", figure_png(overlay))],
        )
    )
    pre_run = run / state["pretrain"]["folder"]
    history = read_metrics(pre_run)
    figure = objective_curves(history, "pre-training: loss of each pretext task")
    if figure is not None:
        images = [Image("pre-training loss per objective", figure_png(figure))]
        parts = grouped_curves(history, PRETEXT_LOGS, "pre-training: what each task logs")
        if parts is not None:
            images.append(Image("the parts of BrainMVP's loss; puzzle accuracy", figure_png(parts)))
        sections.append(
            Section(
                "Pre-training loss curves",
                text="One panel per objective (the total, and each pretext task's loss) from the "
                "pre-training run's metrics.jsonl. BrainMVP's contrastive part (MCL) switches on at two "
                "thirds of the run, which lifts its loss there.",
                images=images,
            )
        )
    figure = run_curves(
        {f"{task} runs": histories[task] for task in TASKS}, "fine-tuning: training loss of every run"
    )
    if figure is not None:
        sections.append(
            Section(
                "Fine-tuning curves",
                text="Each run trains for a fixed number of steps; the model after the last step is scored.",
                images=[Image("fine-tuning loss of every run, per task", figure_png(figure))],
            )
        )
    visuals = sorted((pre_run / "visuals").glob("*.png")) if (pre_run / "visuals").is_dir() else []
    if any(e["task"] == "puzzle" for e in state["pretext"]):
        sections.append(
            Section(
                "Puzzle solutions",
                text="Multimodal jigsaw puzzles of training subjects (each tile cut from a random modality, "
                "with a gap so that edges do not match), as shuffled, as the pre-trained model places the "
                "tiles, and the truth. Each tile shows its middle axial slice in radiological view.",
                images=_puzzle_images(pre_run, state["seed"]),
            )
        )
    recon = [p for p in visuals if p.stem.split("_")[0] in ("mae", "brainmvp")]
    if recon:
        sections.append(
            Section(
                "Reconstructions",
                text="What the reconstruction tasks see and give back after pre-training (axial middle "
                "slices, radiological view).",
                images=[Image(pretext_caption(p.stem), p.read_bytes()) for p in recon],
            )
        )
    templates = _templates_image(pre_run)
    if templates is not None:
        sections.append(
            Section(
                "Learned templates",
                text="BrainMVP's modality templates after pre-training: one learnable volume per contrast, "
                "filled into masked blocks (axial, coronal and sagittal mid-slices).",
                images=[templates],
            )
        )
    state["timings"]["report"] = _since(start)
    summary = {
        "what": "simulated brain MRI: pre-training without labels, then fine-tuning with 10% and 100% "
        "of the labels, against training from scratch",
        **headline["lines"],
        "wall time": f"{state['timings'].get('total', 0) + state['timings']['report']:.0f} s",
        "size": size["name"],
    }
    write_report(
        run,
        results,
        "medformer demo: pre-training vs scratch on simulated brain MRI",
        summary,
        sections,
        extra={"headline": headline["values"], "timings": state["timings"]},
        results_note="Test split. tumour: Dice per class (empty in both truth and prediction counts 1), "
        "their mean, and BraTS regions (WT whole tumour, TC tumour core, ET enhancing); enhancing: the "
        "subject-level class, AUC and accuracy.",
        results_position=3,
        results_order=[
            f"{SEGMENTATION}/{m}"
            for m in ("dice_mean", *(f"dice_{r}" for r in REGIONS), *(f"dice_{c}" for c in classes[1:]))
        ]
        + [f"{CLASSIFICATION}/auc", f"{CLASSIFICATION}/acc"],
    )
    _save_state(run, state)
    return results


def _puzzle_images(pre_run: Path, seed: int, count: int = 2) -> list[Image]:
    """Puzzles of the first training subjects solved by the pre-trained model (with its puzzle head,
    from the run's checkpoint); falls back to the figure the task drew when that cannot be done."""
    from medformer.data.dataset import collate
    from medformer.pretext.puzzle import place
    from medformer.pretrain import load_pretrainer

    try:
        pretrainer, datasets, _ = load_pretrainer(pre_run)
        task = pretrainer.tasks["puzzle"]
        images = []
        for name, ds in datasets.items():
            batch = collate([ds[i] for i in range(min(count, len(ds)))])
            torch.manual_seed(seed)  # the same puzzles every time the report is written
            with torch.no_grad():
                views = task.views(batch)
                puzzles = views["puzzles"]
                if puzzles is None or puzzles.ndim != 3:
                    continue
                solved = place(puzzles.tiles, task.solve(pretrainer.model, puzzles, views.get("collection")))
            for b in range(puzzles.tiles.shape[0]):
                used = sorted({puzzles.modalities[int(m)] for m in puzzles.modality[b]})
                fig = puzzle_figure(
                    puzzles.tiles[b].numpy(),
                    solved[b].numpy(),
                    puzzles.ordered()[b].numpy(),
                    puzzles.grid,
                    f"{batch['ids'][b]}: {puzzles.grid}^3 puzzle, tiles from {', '.join(used)}",
                )
                images.append(Image(f"{name}, {batch['ids'][b]}: shuffled, solved, truth", figure_png(fig)))
        return images
    except Exception as e:  # the task's own figure is the fallback
        log.warning("could not draw the puzzles again (%s); using the pre-training figure", e)
        visuals = sorted((pre_run / "visuals").glob("puzzle_*.png"))
        return [Image(pretext_caption(p.stem), p.read_bytes()) for p in visuals]


def _rename(scores: dict[str, float], collection: str, classes: list[str]) -> dict[str, float]:
    """``brain_phantom/tumour/dice_1`` -> ``tumour/dice_necrosis``; classification metrics as they are."""
    row = {}
    for key, value in scores.items():
        task, _, metric = key.removeprefix(f"{collection}/").rpartition("/")
        if task not in (SEGMENTATION, CLASSIFICATION):
            continue
        if metric.startswith("dice_") and metric[5:].isdigit():
            metric = f"dice_{classes[int(metric[5:])]}"
        row[f"{task}/{metric}"] = value
    return row


HEADLINE = {  # summary lines: result key -> name
    f"{SEGMENTATION}/dice_mean": "tumour Dice",
    f"{SEGMENTATION}/dice_WT": "whole-tumour Dice",
    f"{CLASSIFICATION}/auc": "enhancing AUC",
}


def _headline(results: dict[str, dict[str, float]], state: dict[str, Any]) -> dict[str, Any]:
    """Pre-trained vs scratch at each label fraction: tumour Dice (mean of classes, the headline),
    whole-tumour Dice and the class's AUC, as summary lines and as values for results.json."""
    lines, values = {}, {}
    fractions = sorted({float(i["fraction"]) for i in state["runs"].values()})
    for key, name in HEADLINE.items():
        for f in fractions:
            pre = results.get(run_label(True, f), {}).get(key, float("nan"))
            scratch = results.get(run_label(False, f), {}).get(key, float("nan"))
            lines[f"{name}, {100 * f:g}% labels"] = (
                f"pre-trained {pre:.4f} vs scratch {scratch:.4f} ({pre - scratch:+.4f})"
            )
            if key == f"{SEGMENTATION}/dice_mean":
                values[f"{100 * f:g}%"] = {
                    "dice_pretrained": pre,
                    "dice_scratch": scratch,
                    "pretraining_helps": bool(pre > scratch),
                }
    return {"lines": lines, "values": values}


def _print_headline(payload: dict[str, Any]) -> None:
    for key, value in payload["summary"].items():
        if key.startswith(tuple(HEADLINE.values())):
            print(f"{key}: {value}")


def _configuration(state: dict[str, Any]) -> Section:

    size = state["size"]
    hidden = ("template_shape", "total_steps")
    tasks = "; ".join(
        ", ".join(f"{k}={v}" for k, v in e.items() if k not in hidden) for e in state["pretext"]
    )
    fine_tuning = (
        f"{SEGMENTATION} segmentation ({size['segmentation_steps']} steps, lr {size['segmentation_lr']:g}) "
        f"and the {CLASSIFICATION} class ({size['classification_steps']} steps, lr "
        f"{size['classification_lr']:g}) as separate runs, batch {size['finetune_batch']}, warm-up and "
        "cosine decay, left-right flips and intensity jitter; the same recipe from the pre-trained model "
        "and from scratch; the model after the last step is scored"
    )
    items = {
        "size": size["name"],
        "seed": state["seed"],
        "device": f"{state['device']} ({state['threads']} threads)",
        "cohort": f"{size['subjects']} simulated subjects, {size['voxel_mm']:g} mm voxels, "
        f"{size['grid']}^3 grid",
        "preprocessing": "crop to the brain, percentile intensity scaling, pad/crop to "
        f"{tuple(size['size'])}",
        "model": f"Medformer {size['model']}, 3D patches of 8 voxels",
        "pretext tasks": tasks,
        "pre-training": f"{size['pretrain_steps']} steps, batch {size['pretrain_batch']}, "
        f"lr {size['pretrain_lr']:g}, training split without labels",
        "fine-tuning": fine_tuning,
        "label fractions": ", ".join(f"{100 * f:g}%" for f in size["fractions"]) + " (stratified by class)",
    }
    if state.get("pretext_left_out"):
        items["left out"] = "; ".join(f"{k} ({v})" for k, v in state["pretext_left_out"].items())
    return Section("Configuration", items=items)


def _data_section(run: Path, state: dict[str, Any], classes: list[str]) -> Section:
    from medformer.data.dataset import CollectionDataset

    cohort = state["cohort"]
    order = [s for s in ("train", "val", "test") if s in cohort["splits"]]
    keys = ["subjects", "enhancing", "missing a modality"]
    header = ["split", "subjects", "enhancing tumour", "missing a modality"]
    rows = [[s, *(str(cohort["splits"][s][k]) for k in keys)] for s in order]
    text = (
        f"{cohort['subjects']} simulated subjects on real ICBM152 anatomy at {cohort['voxel_mm']:g} mm "
        f"({'x'.join(map(str, cohort['grid']))} grid), four contrasts with tumours labelled necrosis / "
        f"oedema / enhancing; preprocessed to {'x'.join(map(str, cohort['preprocessed']))} (z, y, x). "
        "Modalities present: "
        + ", ".join(f"{m} {n}/{cohort['subjects']}" for m, n in cohort["modalities"].items())
        + ". Images are simulated, not scans."
    )
    images = []
    try:
        collection = open_collection(Path(state["manifest"]))
        cache = PreprocessCache(run / "cache", Preprocessor(preprocess_config(DemoSize(**_size_args(state)))))
        collection, _ = cache.prepare(collection, skip_bad=True, progress=False)
        ds = CollectionDataset(collection, "train", load=cache)
        index = next(
            (i for i, s in enumerate(ds.studies) if len(s.modalities) < len(collection.modalities)), 0
        )
        item = ds[index]
        vols = {
            m: (item["images"][j].numpy() if item["present"][j] else None)
            for j, m in enumerate(item["modalities"])
        }
        label = item["labels"][next(t.key for t in collection.tasks if t.name == SEGMENTATION)].numpy()
        fig = study_figure(vols, label, classes, f"{item['id']} (training subject, as the model sees it)")
        images.append(
            Image(
                "one training subject: every contrast (missing ones marked) and its labels", figure_png(fig)
            )
        )
    except Exception as e:  # the picture is a courtesy; the table carries the facts
        text += f" (example picture not drawn: {e})"
    return Section("Data", text=text, table=(header, rows), images=images)


def _size_args(state: dict[str, Any]) -> dict[str, Any]:
    size = dict(state["size"])
    size["size"] = tuple(size["size"])
    size["fractions"] = tuple(size["fractions"])
    size["tumour_radius_mm"] = tuple(size["tumour_radius_mm"])
    return size


def _timings(state: dict[str, Any], report_seconds: float) -> Section:

    timings = {**state["timings"], "report": report_seconds}
    rows = [[k, f"{v:.1f}"] for k, v in timings.items() if k != "total"]
    total = timings.get("total", 0.0) + report_seconds
    rows.append(["total (wall)", f"{total:.1f}"])
    return Section("Timings", text="Seconds per stage.", table=(["stage", "seconds"], rows))


def _templates_image(pre_run: Path) -> Image | None:
    """Mid-slices of the pre-trained model's modality templates (BrainMVP), or None without any."""
    from medformer.models import Medformer
    from medformer.models.templates import plot_templates

    folder = pre_run / "model"
    if not (folder / "config.json").exists():
        return None
    model = Medformer.from_pretrained(folder)
    if model.templates is None:
        return None
    path = plot_templates(model.templates.arrays(), pre_run / "templates.png")
    return Image("learned modality templates: axial, coronal and sagittal mid-slices", path.read_bytes())
