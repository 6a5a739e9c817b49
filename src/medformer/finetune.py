"""`medformer finetune` and `medformer evaluate`: supervised (multi-)task training and its report.

A fine-tuning run reads its collections, keeps a stratified fraction of the training labels when
asked, builds a model (a Medformer from a preset or from a saved model, or a CNN baseline), trains
every task of every collection with the engine (model selection on the validation split), then scores
the best model on val and test and writes ``results.json``, ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from torch import nn

from medformer.config import (
    AugmentConfig,
    FinetuneSection,
    ModelConfig,
    RunConfig,
    Section,
    dump_config,
    load_config,
)
from medformer.data.augment import Augment
from medformer.data.cache import PreprocessCache
from medformer.data.dataset import CollectionDataset
from medformer.data.manifest import open_collection
from medformer.data.medmnist import MEDMNIST_FLAGS, load_medmnist
from medformer.data.study import Collection
from medformer.data.subsets import label_subset
from medformer.data.transforms import Preprocessor
from medformer.errors import ConfigError
from medformer.evaluate.predict import evaluate
from medformer.evaluate.report import run_sections, segmentation_section, templates_section, write_report
from medformer.losses import SupervisedObjective, task_spec
from medformer.models.templates import templates_for_finetuning
from medformer.runtime import resolve_device, seed_everything


class TemplateUse(Section):
    """Modality templates of a BrainMVP pre-trained model (``model.init``), see models/templates.py."""

    fill_missing: bool = False  # missing modalities from their templates (kept in the saved model)
    mix: int = Field(0, ge=0)  # channel mixing: per training study, 0..mix modalities -> templates


class FinetuneConfig(RunConfig):
    """A fine-tuning run (`configs/*.yaml`): the shared run options plus how the labels are used."""

    output: str = "runs/finetune"
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)  # training batches only
    templates: TemplateUse = Field(default_factory=TemplateUse)


PRIMARY = {
    "binary": "auc",
    "multiclass": "auc",
    "ordinal": "auc",
    "multilabel": "auc",
    "segmentation": "dice_mean",
}


def open_collections(config: RunConfig) -> tuple[list[Collection], PreprocessCache]:
    """Open every data source; file-based collections are preprocessed once into the cache."""
    if not config.data:
        raise ConfigError("config: no data given (add `data: [{path: ...}]` or --set data=[{path: ...}])")
    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.output).parent / ".cache"
    cache = PreprocessCache(cache_dir, Preprocessor(config.preprocess))
    collections = []
    for source in config.data:
        if source.path in MEDMNIST_FLAGS:  # a flag: the official file from $MEDMNIST_ROOT or ~/.medmnist
            col = load_medmnist(source.path, size=source.size)
        else:
            col = open_collection(source.path, size=source.size, skip_bad=source.skip_bad)
        if source.name:
            col.name = source.name
        if any(s.sources for s in col.studies):
            col, skipped = cache.prepare(col, skip_bad=source.skip_bad)
            col.metadata.setdefault("skipped", []).extend(skipped)
        for bad in col.metadata.get("skipped", []):
            print(f"medformer: skipped bad study {bad.study} ({bad.where}: {bad.problem})", file=sys.stderr)
        collections.append(col)
    names = [c.name for c in collections]
    if len(set(names)) != len(names):
        raise ConfigError(f"config: collection names repeat ({names}); give each data entry a `name`")
    return collections, cache


def build_model(
    config: ModelConfig, collections: list[Collection], tasks: list[str] | None = None
) -> nn.Module:
    """A Medformer with every collection and task registered, or a CNN baseline for one collection."""
    if config.arch == "medformer":
        from medformer.models import Medformer, MedformerConfig

        sizes = ("dim", "depth", "heads", "patch_size_2d", "patch_size_3d", "tokenizer")
        sizes += ("stem_width_3d", "collection_stems")
        overrides = {
            k: v for k, v in config.model_dump().items() if k in (*sizes, "drop_path") and v is not None
        }
        if config.init:
            training = {"drop_path": config.drop_path} if config.drop_path is not None else {}
            model = Medformer.from_pretrained(
                model_folder(config.init), strict=False, checkpointing=config.checkpointing, **training
            )
        else:
            model = Medformer(
                MedformerConfig.from_preset(config.preset, checkpointing=config.checkpointing, **overrides)
            )
        for col in collections:
            model.add_collection(col.name, col.ndim)
            for m in col.modalities:
                model.add_modality(m)
            for spec in col.tasks:
                if (tasks is None or spec.name in tasks) and model.task_key(
                    spec, col.name
                ) not in model.tasks:
                    model.add_task(spec, collection=col.name)
        return model
    if len(collections) != 1:
        raise ConfigError(
            f"model.arch={config.arch} is a single-collection baseline; got {len(collections)} sources"
        )
    col = collections[0]
    specs = [s for s in col.tasks if tasks is None or s.name in tasks]
    from medformer.models import ResNetBaseline, UNetBaseline

    if config.arch == "unet":
        return UNetBaseline(col.modalities, specs, ndim=col.ndim, collection=col.name)
    depth = 18 if config.arch == "resnet18" else 50
    return ResNetBaseline(col.ndim, col.modalities, specs, depth=depth, stem=config.stem, collection=col.name)


def model_folder(path: str | Path) -> Path:
    """A saved model folder, or a run folder: its ``best/`` (fine-tuning) or ``model/`` (pre-training)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    for sub in ("best", "model"):
        if (path / sub / "config.json").is_file():
            return path / sub
    raise ConfigError(
        f"model.init: {path} is neither a saved model (config.json) nor a run folder with model/"
    )


def training_studies(col: Collection, section: FinetuneSection) -> list:
    """The training split, cut to a stratified label fraction (by the collection's first task)."""
    studies = col.split("train")
    if section.label_fraction < 1 and col.tasks:
        task = next((t for t in col.tasks if t.kind != "segmentation"), col.tasks[0])
        studies = label_subset(studies, task, section.label_fraction, section.label_seed)
    return studies


def regression_scales(model: nn.Module, collections: list[Collection]) -> dict[str, tuple[float, float]]:
    """Mean and SD of each regression label on the training split: targets are standardised."""
    scales = {}
    for col in collections:
        for spec in col.tasks:
            key = f"{col.name}/{spec.name}"
            if spec.kind != "regression" or key not in model.tasks:
                continue
            values = np.array([s.labels[spec.key] for s in col.split("train") if spec.key in s.labels], float)
            if len(values):
                scales[key] = (float(values.mean()), float(values.std() or 1.0))
    return scales


def selection_score(metrics: dict[str, float], model: nn.Module) -> float:
    """One number for model selection: the mean of each task's primary metric (AUC, Dice, -MAE)."""
    scores = []
    for key in model.tasks:
        kind = task_spec(model, key).kind
        if kind == "regression" and f"{key}/mae" in metrics:
            scores.append(-metrics[f"{key}/mae"])
        elif f"{key}/{PRIMARY.get(kind, '')}" in metrics:
            scores.append(metrics[f"{key}/{PRIMARY[kind]}"])
    finite = [s for s in scores if np.isfinite(s)]
    return float(np.mean(finite)) if finite else float("nan")


def run_finetune(config: FinetuneConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, select on val, score on val and test, write the report. Returns the results."""
    from medformer.train import fit

    seed_everything(config.seed)
    device = resolve_device(config.device)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes files
    if main_process:
        dump_config(config, out / "config.yaml")
    collections, cache = open_collections(config)
    model = build_model(config.model, collections, config.finetune.tasks).to(device)
    scales = regression_scales(model, collections)
    train_sets = {
        c.name: CollectionDataset(c, load=cache, studies=training_studies(c, config.finetune))
        for c in collections
    }
    val_sets = {c.name: CollectionDataset(c, "val", load=cache) for c in collections if c.split("val")}

    def validate(m: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for ds in val_sets.values():
            metrics.update(evaluate(m, ds, config.eval.batch_size, device, targets_scale=scales))
        return {**{f"val/{k}": v for k, v in metrics.items()}, "val/score": selection_score(metrics, m)}

    from medformer.train.optim import finetune_param_groups

    groups = finetune_param_groups(
        model, config.finetune.mode, config.train.lr, config.train.weight_decay, config.finetune.layer_decay
    )
    augment = templates_for_finetuning(
        model, config.templates.fill_missing, config.templates.mix, Augment(config.augment)
    )
    objective = SupervisedObjective(targets_scale=scales, augment=augment, mixup=config.finetune.mixup)
    train = config.train.model_copy(
        update={
            "seed": config.seed,
            "device": config.device,
            "select_metric": config.train.select_metric or "val/score",
        }
    )
    result = fit(
        model,
        [objective],
        train_sets,
        train,
        out,
        evaluate=validate if val_sets else None,
        param_groups=groups,
        resume=resume,
    )
    if not main_process:
        return {}
    best = out / "best" if (out / "best").exists() else out / "model"
    return evaluate_run(
        out, model_dir=best, config=config, collections=collections, cache=cache, fit_result=result
    )


def evaluate_run(
    run: str | Path,
    model_dir: str | Path | None = None,
    config: FinetuneConfig | None = None,
    collections: list[Collection] | None = None,
    cache: PreprocessCache | None = None,
    fit_result: Any = None,
    device: str | None = None,
    output: str | Path | None = None,
    tent: bool = False,
) -> dict[str, Any]:
    """Score a run's best (else final) model on val and test; write results.json and the report
    (into the run folder, or ``output``). ``device`` overrides the run's.

    ``tent``: before scoring a split, adapt a copy of the model to that split's images by test-time
    entropy minimisation of its LayerNorm affine parameters (TENT, `medformer.adapt.tta`; labels are
    not read): for a test site whose images differ from the training site's."""
    run = Path(run)
    if config is None:
        if not (run / "config.yaml").exists():
            raise ConfigError(f"{run}: not a run folder (no config.yaml)")
        config = load_config(FinetuneConfig, run / "config.yaml")
    if collections is None:
        collections, cache = open_collections(config)
    if model_dir is None:
        model_dir = run / "best" if (run / "best").exists() else run / "model"
    device = resolve_device(device or config.device)
    model = load_run_model(Path(model_dir), config, collections).to(device)
    scales = regression_scales(model, collections)
    results: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        metrics: dict[str, float] = {}
        for col in collections:
            if col.split(split):
                ds = CollectionDataset(col, split, load=cache)
                scored = model
                if tent:
                    from medformer.adapt.tta import tent_on_dataset

                    scored = copy.deepcopy(model)
                    tent_on_dataset(scored, ds, config.eval.batch_size, device, collection=col.name)
                metrics.update(evaluate(scored, ds, config.eval.batch_size, device, config.eval.hd95, scales))
        if metrics:
            results[split] = metrics
    summary = {
        "model": f"{config.model.arch} ({config.model.preset})"
        if config.model.arch == "medformer"
        else config.model.arch,
        "init": config.model.init or "random",
        "mode": config.finetune.mode,
        "label fraction": config.finetune.label_fraction,
        "collections": ", ".join(f"{c.name} ({len(c)} studies, {c.ndim}D)" for c in collections),
        "model folder": str(model_dir),
    }
    if tent:
        summary["test-time adaptation"] = "TENT: LayerNorm affine parameters, one pass per scored split"
    if fit_result is not None:
        summary["steps"] = getattr(fit_result, "step", "")
        summary["best step"] = getattr(fit_result, "best_step", "")
    skipped = [s for c in collections for s in c.metadata.get("skipped", [])]
    if skipped:
        summary["skipped studies"] = "; ".join(f"{s.where}: {s.problem}" for s in skipped)
    sections = run_sections(run)
    tests = [CollectionDataset(c, "test", load=cache) for c in collections if c.split("test")]
    for section in (
        segmentation_section(model, tests, device),
        templates_section(model, Path(output or run)),
    ):
        if section is not None:
            sections.append(section)
    write_report(output or run, results, f"medformer fine-tuning: {run.name}", summary, sections)
    return results


def load_run_model(model_dir: Path, config: FinetuneConfig, collections: list[Collection]) -> nn.Module:
    """A run's saved model: Medformer folders load with `from_pretrained`, baselines from safetensors."""
    if config.model.arch == "medformer":
        from medformer.models import Medformer

        return Medformer.from_pretrained(model_dir)
    from safetensors.torch import load_file

    model = build_model(config.model, collections, config.finetune.tasks)
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        raise ConfigError(f"{model_dir}: no model.safetensors")
    model.load_state_dict(load_file(str(weights)))
    return model
