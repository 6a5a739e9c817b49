"""`medformer pretrain`: self-supervised pre-training of one Medformer on many collections at once.

A pre-training run opens its collections like fine-tuning does (the same ``data:`` entries, the same
preprocessing cache), drops their labels, builds a Medformer with every collection and modality
registered, wraps it with the configured pretext tasks in a `Pretrainer` and trains it with the same
engine (run folder, ``--resume``, torchrun, progress bar, checkpoints). The result::

    output/
      model/                 the pre-trained Medformer (Medformer.save): medformer finetune --init output
      model_ema/             the same for the EMA weights (when train.ema_decay is set)
      checkpoints/           Medformer + pretext heads + optimizer state, for --resume
      metrics.jsonl          loss/<task> and each task's own logs
      loss_curves.png        one panel per task's loss
      visuals/<task>_<collection>.png   what each task does on a few training studies

The pretext heads (decoders, projectors) stay in the checkpoints; ``model/`` holds the network that is
kept, without them.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from medformer.config import RunConfig, Section, dump_config
from medformer.data.dataset import CollectionDataset, collate
from medformer.data.study import Collection
from medformer.errors import ConfigError
from medformer.finetune import build_model, open_collections
from medformer.pretext import Pretrainer
from medformer.pretext.registry import build_tasks, check_entries
from medformer.runtime import resolve_device, seed_everything

log = logging.getLogger("medformer.pretrain")


class PretrainSection(Section):
    """Which images pre-training reads, and what it draws afterwards."""

    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    visualise: bool = True  # loss curves and one figure per task and collection, after training
    visual_samples: int = Field(4, ge=1)  # studies per figure


class PretrainConfig(RunConfig):
    """A pre-training run: the shared run options, the pretext tasks and which splits to use.

    ``pretext`` is a list of ``{task: <name>, weight: 1.0, start_step: 0, name: ..., <task options>}``
    (see `medformer.pretext.registry`); entries are checked when the config is loaded.
    """

    output: str = "runs/pretrain"
    pretext: list[dict[str, Any]] = Field(default_factory=lambda: [{"task": "mae"}])
    pretrain: PretrainSection = Field(default_factory=PretrainSection)

    def model_post_init(self, context: Any) -> None:
        check_entries(self.pretext, "pretext")
        if self.model.arch != "medformer":
            raise ConfigError(f"model.arch: pre-training trains a Medformer, not {self.model.arch!r}")


def unlabeled(collection: Collection, splits: list[str]) -> tuple[Collection, list]:
    """The collection without its tasks (labels are never read) and its studies in ``splits``."""
    studies = [s for s in collection.studies if s.split in splits]
    if not studies:
        raise ConfigError(
            f"pretrain.splits: collection {collection.name!r} has no studies in {splits} "
            f"(it has {collection.split_counts()})"
        )
    return replace(collection, tasks=[]), studies


def build_pretrainer(
    config: PretrainConfig,
) -> tuple[Pretrainer, dict[str, CollectionDataset], dict[str, float]]:
    """The run's unlabeled datasets, the Medformer with its pretext tasks, and the tasks' loss weights."""
    collections, cache = open_collections(config)
    datasets = {}
    for col in collections:
        col, studies = unlabeled(col, config.pretrain.splits)
        datasets[col.name] = CollectionDataset(col, load=cache, studies=studies)
    model = build_model(config.model, [ds.collection for ds in datasets.values()])
    tasks, weights = build_tasks(config.pretext)
    return Pretrainer(model, tasks), datasets, weights


def run_pretrain(config: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    """Pre-train, save ``model/`` and the figures; returns a summary (paths, steps, last losses)."""
    from medformer.train import fit

    seed_everything(config.seed)
    device = resolve_device(config.device)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        dump_config(config, out / "config.yaml")
    pretrainer, datasets, weights = build_pretrainer(config)
    pretrainer.to(device)
    model = pretrainer.model
    train = config.train.model_copy(update={"seed": config.seed, "device": config.device})
    result = fit(pretrainer, pretrainer.objectives(), datasets, train, out, weights=weights, resume=resume)
    summary: dict[str, Any] = {"output": str(out), "model": str(out / "model"), "steps": result.step}
    if not main_process:
        return summary
    model.save(out / "model")  # the engine wrote the Pretrainer's state dict here; keep the Medformer only
    if result.ema_dir is not None:
        summary["model_ema"] = str(save_ema_model(model, result.ema_dir))
    last = next((r for r in reversed(result.history) if "split" not in r), {})
    summary["losses"] = {k: v for k, v in last.items() if k.startswith("loss")}
    if config.pretrain.visualise:
        write_figures(pretrainer, datasets, result.history, out, config)
    return summary


def save_ema_model(model: nn.Module, directory: Path) -> Path:
    """Rewrite the engine's EMA state dict (of the Pretrainer) as a loadable Medformer folder."""
    state = load_file(str(directory / "model.safetensors"))
    ema = copy.deepcopy(model)
    ema.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    ema.save(directory)
    return directory


def write_figures(
    pretrainer: Pretrainer,
    datasets: dict[str, CollectionDataset],
    history: list[dict[str, Any]],
    out: Path,
    config: PretrainConfig,
) -> None:
    """``loss_curves.png`` and ``visuals/<task>_<collection>.png`` (a failing figure is logged, not
    raised: the trained model is already saved)."""
    from medformer.pretext.figures import loss_curves
    from medformer.train.engine import to_device

    keys = ["loss", *(f"loss/{name}" for name in pretrainer.tasks)]
    loss_curves(history, keys, f"pre-training losses ({out.name})").savefig(out / "loss_curves.png", dpi=100)
    device = next(pretrainer.parameters()).device
    folder = out / "visuals"
    folder.mkdir(exist_ok=True)
    pretrainer.eval()
    torch.manual_seed(config.seed)
    for name, ds in datasets.items():
        n = min(config.pretrain.visual_samples, len(ds))
        batch = to_device(collate([ds[i] for i in range(n)]), device)
        for task_name, task in pretrainer.tasks.items():
            try:
                with torch.no_grad():
                    fig = task.visualise(pretrainer.model, batch)
                if fig is not None:
                    fig.savefig(folder / f"{task_name}_{name}.png", dpi=100)
            except Exception as e:  # a figure must not cost a finished run its summary
                log.warning("could not draw %s on %s: %s", task_name, name, e)
    pretrainer.train()


def load_pretrainer(run: str | Path) -> tuple[Pretrainer, dict[str, CollectionDataset], PretrainConfig]:
    """A finished pre-training run's `Pretrainer` (the Medformer with its task heads) from its newest
    checkpoint, with its unlabeled datasets and config: to draw what the tasks do after the run."""
    from medformer.config import load_config
    from medformer.train import checkpoint as ckpt

    run = Path(run)
    config = load_config(PretrainConfig, run / "config.yaml")
    latest = ckpt.find_latest(run / "checkpoints")
    if latest is None:
        raise ConfigError(f"{run}: no checkpoint to load the pretext heads from")
    pretrainer, datasets, _ = build_pretrainer(config)
    ckpt.load_weights(pretrainer, latest)
    return pretrainer.eval(), datasets, config
