"""Adapter-only adaptation: take a trained Medformer to a new site, scanner or collection by learning only
the new collection's latent embeddings (and the heads of tasks it brings that the model lacks).

The body, the tokenizers and every other collection's and task's embeddings stay frozen (bit-identical),
so the adapted model gives exactly the same outputs as before on the collections it already knew: the
new collection is an *adapter* (Medformer's "dynamic input-output adaptation") of a few hundred to a few
thousand numbers, beside the millions a full fine-tuning would change.

What the adapter learns from:

- the new collection's unlabelled images, with the pretext tasks (``adapt.pretext``, default MAE): the
  latent tokens learn to tell the frozen body what these images look like;
- and/or a few labels (``adapt.label_fraction``): the supervised task losses.

``adapt.like`` names a trained collection to start from: its latent tokens are copied, and so are the
heads and task tokens of its tasks that the new collection shares by name (kind and classes must
agree). Copied heads stay frozen unless ``adapt.train_heads``; a task the model does not know gets a
fresh head, trained when there are labels.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from medformer.config import RunConfig, Section, dump_config
from medformer.data.dataset import CollectionDataset
from medformer.data.study import Collection, TaskSpec
from medformer.data.subsets import label_subset
from medformer.errors import ConfigError
from medformer.evaluate.predict import evaluate
from medformer.losses import SupervisedObjective
from medformer.runtime import resolve_device, seed_everything


class AdaptSection(Section):
    """What adaptation learns and from what (see the module docstring)."""

    collection: str | None = None  # the new collection's name (default: the data entry's name)
    like: str | None = None  # a trained collection to start from (default: the model's only one, if so)
    label_fraction: float = Field(0.0, ge=0, le=1)  # labelled training studies used; 0: none
    label_seed: int = 0
    pretext: list[dict[str, Any]] = Field(default_factory=lambda: [{"task": "mae"}])  # [] for none
    train_heads: bool = False  # also train the heads copied from ``like`` (needs labels)


class AdaptConfig(RunConfig):
    """An adaptation run: ``model.init`` (the trained model) and one ``data`` entry (the new collection)."""

    output: str = "runs/adapt"
    adapt: AdaptSection = Field(default_factory=AdaptSection)

    def model_post_init(self, context: Any) -> None:
        from medformer.pretext.registry import check_entries

        check_entries(self.adapt.pretext, "adapt.pretext")


# -- the model surgery ----------------------------------------------------------------------------------
def _compatible(a: TaskSpec, b: TaskSpec) -> bool:
    return a.kind == b.kind and a.num_classes == b.num_classes


def add_adapted_collection(
    model: nn.Module,
    name: str,
    ndim: int,
    modalities: list[str],
    tasks: list[TaskSpec],
    like: str | None = None,
) -> dict[str, str]:
    """Register collection ``name`` with its modalities and tasks; start it from collection ``like``.

    Returns ``{task key: "copied" | "new"}``: whether each task's head and task token came from
    ``like``'s task of the same name or are freshly initialised.
    """
    if name in model.collections:
        raise ConfigError(f"collection {name!r} is already part of the model; name the new one differently")
    model.add_collection(name, ndim)
    for m in modalities:
        model.add_modality(m)
    embeds = model.input_adaptformer
    if like is not None:
        if like not in model.collections:
            known = sorted(model.collections)
            raise ConfigError(f"adapt.like: {like!r} is not a collection of the model ({known})")
        with torch.no_grad():
            embeds.collection_embed[name].copy_(embeds.collection_embed[like])
    origin: dict[str, str] = {}
    for spec in tasks:
        key = model.add_task(spec, collection=name)
        old = f"{like}/{spec.name}" if like is not None else None
        if old in model.tasks and _compatible(model.tasks[old].spec, spec):
            model.heads[key].load_state_dict(model.heads[old].state_dict())
            with torch.no_grad():
                embeds.task_embed[key].copy_(embeds.task_embed[old])
            origin[key] = "copied"
        else:
            origin[key] = "new"
    return origin


def adapter_parameter_names(
    model: nn.Module, collection: str, train_tasks: list[str] = (), modalities: list[str] = ()
) -> list[str]:
    """The parameters an adapter trains: the collection's latent tokens, the given tasks' heads and task
    tokens, and the embeddings of the given (new) modalities."""
    prefixes = [f"input_adaptformer.collection_embed.{collection}"]
    prefixes += [f"input_adaptformer.modality_embed.{m}" for m in modalities]
    for key in train_tasks:
        prefixes += [f"input_adaptformer.task_embed.{key}", f"output_adaptformer.heads.{key}."]
    return [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p) for p in prefixes)]


def freeze_all_but(model: nn.Module, names: list[str]) -> dict[str, int]:
    """``requires_grad`` only for ``names``; returns the trained and total parameter counts."""
    keep = set(names)
    unknown = keep - {n for n, _ in model.named_parameters()}
    if unknown:
        raise KeyError(f"no such parameters: {sorted(unknown)}")
    trained = total = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        total += p.numel()
        trained += p.numel() if n in keep else 0
    return {"trained": trained, "total": total}


class OnModel:
    """An engine objective that runs on ``wrapper.model`` (e.g. supervised losses next to pretext tasks,
    whose engine model is the `Pretrainer`)."""

    def __init__(self, objective: Any):
        self.objective, self.name = objective, objective.name

    def __call__(self, wrapper: nn.Module, batch: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        return self.objective(wrapper.model, batch)


# -- the run --------------------------------------------------------------------------------------------
def _few_labels(col: Collection, section: AdaptSection) -> Collection:
    """The collection with the labels of all but a stratified ``label_fraction`` of training studies
    removed (0: no labels at all); val and test keep theirs for scoring."""
    train = col.split("train")
    keep: set[str] = set()
    if section.label_fraction > 0 and col.tasks:
        task = next((t for t in col.tasks if t.kind != "segmentation"), col.tasks[0])
        keep = {s.id for s in label_subset(train, task, section.label_fraction, section.label_seed)}
    studies = [s if s.split != "train" or s.id in keep else replace(s, labels={}) for s in col.studies]
    return replace(col, studies=studies)


def run_adapt(config: AdaptConfig, progress: bool = True) -> dict[str, Any]:
    """Adapt ``model.init`` to the one collection in ``data``; save ``model/``, write ``results.json``."""
    from medformer.finetune import model_folder, open_collections
    from medformer.models import Medformer
    from medformer.pretext import Pretrainer
    from medformer.pretext.registry import build_tasks
    from medformer.train import fit

    if not config.model.init:
        raise ConfigError("adapt: model.init (--init RUN) must name the trained model to adapt")
    if len(config.data) != 1:
        raise ConfigError(f"adapt: give exactly one data entry (the new collection), got {len(config.data)}")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    (col,), cache = open_collections(config)
    section = config.adapt
    col.name = section.collection or col.name
    model = Medformer.from_pretrained(model_folder(config.model.init))
    like = section.like
    if like is None and len(model.collections) == 1:
        like = next(iter(model.collections))
    if like is not None and model.collections.get(like) not in (None, col.ndim):
        like = None  # a 2D collection cannot start a 3D one: its latents describe other images
    new_modalities = [m for m in col.modalities if m not in model.modalities]
    origin = add_adapted_collection(model, col.name, col.ndim, col.modalities, col.tasks, like)
    labelled = section.label_fraction > 0
    train_tasks = [k for k, o in origin.items() if labelled and (o == "new" or section.train_heads)]
    names = adapter_parameter_names(model, col.name, train_tasks, new_modalities)
    counts = freeze_all_but(model, names)

    data = _few_labels(col, section)
    objectives: list[Any] = []
    tasks, weights = build_tasks(section.pretext)
    wrapper = Pretrainer(model, tasks)
    objectives += wrapper.objectives()
    if labelled:
        objectives.append(OnModel(SupervisedObjective()))
    if not objectives:
        raise ConfigError("adapt: nothing to learn from: set adapt.pretext and/or adapt.label_fraction > 0")
    train = config.train.model_copy(
        update={"seed": config.seed, "device": config.device, "progress": progress and config.train.progress}
    )
    dataset = CollectionDataset(data, "train", load=cache)
    result = fit(wrapper.to(device), objectives, {col.name: dataset}, train, out, weights=weights)
    model.save(out / "model")

    params = {
        **counts,
        "full_finetuning": counts["total"],
        "fraction": counts["trained"] / counts["total"],
        "trained_parameters": names,
    }
    results: dict[str, Any] = {"steps": result.step, "like": like, "tasks": origin, "parameters": params}
    for split in ("val", "test"):
        if col.tasks and col.split(split):
            ds = CollectionDataset(col, split, load=cache)
            results[split] = evaluate(model, ds, config.eval.batch_size, device)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
