"""Domain shift: how much of a site/scanner shift do the adaptation methods recover?

Two parts, each a *source* site with labels and a *target* site whose images differ:

- ``medmnist``: a Medformer trained on BreastMNIST (2D ultrasound, benign/malignant, real data, official
  splits). Each documented shift of `medformer.data.shifts` (intensity, contrast, noise, blur,
  resolution) applied to the training, validation and test images makes a target site; test AUC.
- ``brain``: tumour segmentation on the simulated brain MRI cohort acquired on the 3 T profile; the
  target is the same subjects on the 1.5 T profile (`second_scanner`: other TR/TE/TI, relaxation
  times, bias field, noise and gain); test whole-tumour Dice.

Per shift and seed, six arms are scored on the target's test split:

- ``source-only``: the source model as it is;
- ``tent``: after test-time entropy minimisation of its LayerNorm affine parameters (TENT, Wang et al.
  2021) on the unlabelled target test images;
- ``adapter``: adapter-only: a new collection whose latent tokens start from the source's and are
  trained with MAE on the unlabelled target training images, body and heads frozen;
- ``coral`` / ``dann``: trained further on source labels + deep CORAL (Sun & Saenko 2016) / a
  gradient-reversal domain classifier (DANN, Ganin & Lempitsky 2015) between source and unlabelled
  target features;
- ``target-supervised``: fine-tuned on the target training images *with* their labels: the upper bound
  no unsupervised method should beat.

    python benchmarks/domain_shift.py --quick            # pipeline check (a few minutes)
    python benchmarks/domain_shift.py --parts medmnist   # 3 seeds (about 50 min on 2 CPU cores)
    python benchmarks/domain_shift.py --parts brain      # 3 seeds (about 6 min)

Writes benchmarks/results/domain_shift_<part>{_quick}.{json,md,png} after every seed. The numbers are
reported as they come: an arm that does not beat source-only is shown as such.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medformer.adapt import (
    AlignmentObjective,
    adapter_parameter_names,
    add_adapted_collection,
    freeze_all_but,
    tent_on_dataset,
)
from medformer.config import PreprocessConfig, TrainConfig
from medformer.data.cache import PreprocessCache
from medformer.data.dataset import CollectionDataset
from medformer.data.manifest import open_collection
from medformer.data.medmnist import load_medmnist
from medformer.data.phantom import PhantomConfig, write_cohort
from medformer.data.shifts import DEFAULT_STRENGTH, Shift, second_scanner, shift_collection
from medformer.data.study import Collection
from medformer.data.transforms import Preprocessor
from medformer.evaluate.examples import mean_region_dice
from medformer.evaluate.predict import evaluate
from medformer.losses import SupervisedObjective
from medformer.models import Medformer, MedformerConfig
from medformer.pretext import MAE, Pretrainer
from medformer.train import fit
from medformer.train.optim import default_param_groups

ROOT = Path(__file__).resolve().parents[1]
FLAG = "breastmnist"
ARMS = ("source-only", "tent", "adapter", "coral", "dann", "target-supervised")
ALIGN_WEIGHT = {"coral": 10.0, "dann": 0.3}
SETTINGS = {  # per part, quick: a pipeline check; full: the reported run
    "medmnist": {
        "quick": {"seeds": [0, 1], "source_steps": 150, "adapt_steps": 40, "dim": 32, "depth": 2},
        "full": {"seeds": [0, 1, 2], "source_steps": 600, "adapt_steps": 200, "dim": 64, "depth": 4},
        "common": {"metric": "auc", "batch": 32, "lr": 1e-3, "align_weight": ALIGN_WEIGHT},
    },
    "brain": {
        "quick": {"seeds": [0], "subjects": 16, "source_steps": 20, "adapt_steps": 6, "dim": 32, "depth": 2},
        "full": {"seeds": [0, 1, 2], "subjects": 80, "source_steps": 250, "adapt_steps": 100, "dim": 64,
                 "depth": 4},
        "common": {"metric": "dice_WT", "batch": 2, "lr": 5e-4, "align_weight": ALIGN_WEIGHT},
    },
}  # fmt: skip
TITLES = {
    "medmnist": f"{FLAG} (test AUC)",
    "brain": "simulated brain MRI, 3 T -> 1.5 T (test whole-tumour Dice)",
}


def train_config(steps: int, lr: float, seed: int, batch: int = 32) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=batch, lr=lr, device="cpu", progress=False, seed=seed,
        log_every=max(steps, 1), checkpoint_every=None, keep_last=1, warmup_fraction=0.1,
    )  # fmt: skip


def score(model: torch.nn.Module, dataset: CollectionDataset, metric: str) -> float:
    """The test metric of the dataset's task: ``auc`` or, for the tumour, the whole-tumour Dice
    (``dice_WT``: every tumour label against background, averaged over subjects)."""
    if metric == "dice_WT":
        return mean_region_dice(model, dataset, f"{dataset.collection.name}/tumour", (1, 2, 3))
    metrics = evaluate(model, dataset, 256)
    return float(next(v for k, v in metrics.items() if k.endswith(f"/{metric}")))


def adaptation_arms(
    model: Medformer,
    source: Collection,
    target: Collection,
    s: dict[str, Any],
    seed: int,
    tmp: Path,
    load: Any = None,
) -> dict[str, float]:
    """Every arm for one (source model, target site): ``{arm: target test metric}``. ``target`` is
    named like ``source`` (the source model applies to it as it is); its labels are read by the
    target-supervised arm only."""
    metric, batch = s["metric"], s["batch"]
    test = CollectionDataset(target, "test", load=load)
    row = {"source-only": score(model, test, metric)}

    m = copy.deepcopy(model)
    tent_on_dataset(m, test, batch_size=2 * batch, epochs=1, lr=1e-3)
    row["tent"] = score(m, test, metric)

    m = copy.deepcopy(model)
    renamed = replace(target, name="target")
    add_adapted_collection(m, "target", target.ndim, target.modalities, target.tasks, like=source.name)
    freeze_all_but(m, adapter_parameter_names(m, "target"))
    wrapper = Pretrainer(m, [MAE(decoder_dim=32, decoder_depth=1, decoder_heads=2)])
    unlabelled = CollectionDataset(renamed, load=load)  # MAE never reads labels
    fit(wrapper, wrapper.objectives(), {"target": unlabelled},
        train_config(s["adapt_steps"], 1e-2, seed, batch), tmp / "adapter")  # fmt: skip
    row["adapter"] = score(m, CollectionDataset(renamed, "test", load=load), metric)

    sources = {source.name: CollectionDataset(source, load=load)}
    for method in ("coral", "dann"):
        m = copy.deepcopy(model)
        align = AlignmentObjective(source.name, CollectionDataset(target, load=load), s["dim"], method, batch,
                                   total_steps=s["adapt_steps"], seed=seed)  # fmt: skip
        groups = default_param_groups(m, 0.05) + align.parameter_groups()
        config = train_config(s["adapt_steps"], s["lr"] / 3, seed, batch)
        weights = {align.name: s["align_weight"][method]}
        fit(
            m,
            [SupervisedObjective(), align],
            sources,
            config,
            tmp / method,
            weights=weights,
            param_groups=groups,
        )
        row[method] = score(m, test, metric)

    m = copy.deepcopy(model)
    fit(m, [SupervisedObjective()], {source.name: CollectionDataset(target, load=load)},
        train_config(s["adapt_steps"], s["lr"] / 3, seed, batch), tmp / "upper")  # fmt: skip
    row["target-supervised"] = score(m, test, metric)
    return row


def source_model(col: Collection, s: dict[str, Any], seed: int, tmp: Path, load: Any = None) -> Medformer:
    torch.manual_seed(seed)
    model = Medformer(MedformerConfig(dim=s["dim"], depth=s["depth"], heads=2), collections=[col])
    fit(model, [SupervisedObjective()], {col.name: CollectionDataset(col, load=load)},
        train_config(s["source_steps"], s["lr"], seed, s["batch"]), tmp / "source")  # fmt: skip
    return model.eval()


def run_seed(seed: int, s: dict[str, Any], tmp: Path) -> dict[str, dict[str, float]]:
    """MedMNIST: every arm on every image shift for one seed: ``{shift: {arm: test AUC}}`` (plus the
    unshifted reference)."""
    col = load_medmnist(FLAG)
    model = source_model(col, s, seed, tmp / f"{seed}")
    out: dict[str, dict[str, float]] = {
        "none": {"source-only": score(model, CollectionDataset(col, "test"), "auc")}
    }
    for kind in DEFAULT_STRENGTH:
        shift = Shift(kind)
        shifted = shift_collection(col, shift, ("train", "val", "test"), seed=seed)  # named like the source
        out[shift.name] = adaptation_arms(model, col, shifted, s, seed, tmp / f"{seed}{kind}")
        cells = "  ".join(f"{a} {v:.3f}" for a, v in out[shift.name].items())
        print(f"seed {seed} {shift.name:16s} {cells}", flush=True)
    return out


def brain_cohorts(root: Path, s: dict[str, Any]) -> tuple[Collection, Collection, PreprocessCache]:
    """The simulated cohort on the 3 T profile (source site) and the same subjects on the 1.5 T
    profile (`second_scanner`: other TR/TE/TI, relaxation, bias field, noise, gain), segmentation only."""
    cohort = PhantomConfig(n_subjects=s["subjects"], seed=0, voxel_size_mm=5.0, shape=(40, 40, 40),
                           tumour_radius_mm=(20.0, 35.0))  # fmt: skip
    cols = []
    for name, config in (("3T", cohort), ("1.5T", second_scanner(cohort))):
        col = open_collection(write_cohort(root / name, config, progress=False))
        cols.append(replace(col, tasks=[t for t in col.tasks if t.name == "tumour"]))
    preprocess = PreprocessConfig(crop_foreground=True, intensity="percentile", size=[32, 40, 32])
    return cols[0], cols[1], PreprocessCache(root / "cache", Preprocessor(preprocess))


def run_brain_seed(seed: int, s: dict[str, Any], tmp: Path) -> dict[str, dict[str, float]]:
    """Simulated brain MRI, tumour segmentation: trained on the 3 T site, scored on the 1.5 T site."""
    source, target, cache = brain_cohorts(tmp / "cohorts", s)
    model = source_model(source, s, seed, tmp / f"brain{seed}", load=cache)
    out = {"none": {"source-only": score(model, CollectionDataset(source, "test", load=cache), s["metric"])}}
    out["second scanner"] = adaptation_arms(model, source, target, s, seed, tmp / f"brain{seed}", load=cache)
    cells = "  ".join(f"{a} {v:.3f}" for a, v in out["second scanner"].items())
    print(f"seed {seed} second scanner   {cells}", flush=True)
    return out


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for shift in per_seed[0]:
        table[shift] = {}
        for arm in per_seed[0][shift]:
            values = np.array([r[shift][arm] for r in per_seed])
            table[shift][arm] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }
    return table


def markdown(part: str, table: dict, settings: dict, seconds: float, quick: bool, seeds: int) -> str:
    lines = [
        f"# Domain shift: {TITLES[part]}, {'quick' if quick else 'full'} run",
        "",
        f"Target-site test {settings['metric']}, mean ± SD over {seeds} seed(s); Medformer dim "
        f"{settings['dim']}, depth {settings['depth']}; source {settings['source_steps']} steps, each "
        f"adaptation {settings['adapt_steps']} steps; {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
        "| shift | " + " | ".join(ARMS) + " |",
        "|---|" + "---|" * len(ARMS),
    ]
    for shift, row in table.items():
        cells = [f"{row[a]['mean']:.3f} ± {row[a]['sd']:.3f}" if a in row else "" for a in ARMS]
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    lines += ["", "'none' is the source site's own test split (no shift). Shifts: `medformer.data.shifts`."]
    return "\n".join(lines) + "\n"


def plot(part: str, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = [s for s in table if s != "none"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(shifts) + 2), 4.4))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        means = [table[s][arm]["mean"] for s in shifts]
        sds = [table[s][arm]["sd"] for s in shifts]
        ax.bar(np.arange(len(shifts)) + i * width, means, width, yerr=sds, label=arm, capsize=2)
    ax.axhline(table["none"]["source-only"]["mean"], color="k", ls="--", lw=1, label="no shift")
    ax.set_xticks(np.arange(len(shifts)) + 0.4 - width / 2, shifts)
    ax.set_ylabel(SETTINGS[part]["common"]["metric"])
    ax.set_ylim(0.4 if part == "medmnist" else 0.0, 1.0)
    ax.legend(ncol=3, fontsize=8)
    ax.set_title(f"{TITLES[part]}:\nadaptation under controlled shifts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pipeline check (a few minutes)")
    parser.add_argument("--parts", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--root", default=os.environ.get("MEDMNIST_ROOT"), help="MedMNIST folder")
    args = parser.parse_args()
    if args.root:
        os.environ["MEDMNIST_ROOT"] = args.root
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    for part in args.parts:
        settings = {**SETTINGS[part]["quick" if args.quick else "full"], **SETTINGS[part]["common"]}
        run = run_seed if part == "medmnist" else run_brain_seed
        start = time.perf_counter()
        name = f"domain_shift_{part}" + ("_quick" if args.quick else "")
        per_seed: list[dict[str, dict[str, float]]] = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in settings["seeds"]:
                per_seed.append(run(seed, settings, Path(tmp)))
                write(part, per_seed, settings, time.perf_counter() - start, name, args.quick)  # nothing lost


def write(
    part: str, per_seed: list, settings: dict[str, Any], seconds: float, name: str, quick: bool
) -> None:
    """``benchmarks/results/<name>.{json,md,png}`` from the seeds run so far."""
    table = summarise(per_seed)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    shifts = dict(DEFAULT_STRENGTH) if part == "medmnist" else "second_scanner (SCANNER_15T)"
    record = {
        "settings": settings,
        "seconds": seconds,
        "table": table,
        "per_seed": per_seed,
        "shifts": shifts,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(part, table, settings, seconds, quick, len(per_seed))
    (out / f"{name}.md").write_text(text)
    plot(part, table, out / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
