"""Domain shift: how much of a site/scanner shift do the adaptation methods recover, on real data?

A Medformer is trained on BreastMNIST (2D ultrasound, benign/malignant) with all its training labels:
the *source*. Each documented shift of `medformer.data.shifts` (intensity, contrast, noise, blur,
resolution) is applied to the training, validation and test images to make a *target* site. Per shift
and seed, five arms are scored on the shifted test split (MedMNIST AUC):

- ``source-only``: the source model as it is;
- ``tent``: the source model after test-time entropy minimisation of its LayerNorm affine parameters
  (TENT, Wang et al. 2021) on the unlabelled shifted test images;
- ``adapter``: adapter-only: a new collection whose latent tokens (32 numbers at dim 32) start from
  the source's and are trained with MAE on the unlabelled shifted training images, body and head frozen;
- ``coral``: the source model trained further on source labels + deep CORAL (Sun & Saenko 2016) between
  source and unlabelled target features;
- ``target-supervised``: the source model fine-tuned on the shifted training images *with* their labels:
  the upper bound no unsupervised method should beat.

    python benchmarks/domain_shift.py --quick    # pipeline check, 2 seeds, few steps (a few minutes)
    python benchmarks/domain_shift.py            # 3 seeds, longer training (est. ~25 min, 2 CPU cores)

Writes benchmarks/results/domain_shift{_quick}.{json,md,png}. The numbers are reported as they come:
an arm that does not beat source-only is shown as such.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
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
from medformer.config import TrainConfig
from medformer.data.dataset import CollectionDataset
from medformer.data.medmnist import load_medmnist
from medformer.data.shifts import DEFAULT_STRENGTH, Shift, shift_collection
from medformer.evaluate.predict import evaluate
from medformer.losses import SupervisedObjective
from medformer.models import Medformer, MedformerConfig
from medformer.pretext import MAE, Pretrainer
from medformer.train import fit

ROOT = Path(__file__).resolve().parents[1]
FLAG = "breastmnist"
ARMS = ("source-only", "tent", "adapter", "coral", "target-supervised")
SETTINGS = {  # quick: a pipeline check; full: the reported run
    "quick": {"seeds": [0, 1], "source_steps": 150, "adapt_steps": 40, "dim": 32, "depth": 2},
    "full": {"seeds": [0, 1, 2], "source_steps": 600, "adapt_steps": 200, "dim": 64, "depth": 4},
}


def train_config(steps: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=32, lr=lr, device="cpu", progress=False, seed=seed,
        log_every=max(steps, 1), checkpoint_every=None, keep_last=1, warmup_fraction=0.1,
    )  # fmt: skip


def auc(model: torch.nn.Module, dataset: CollectionDataset) -> float:
    metrics = evaluate(model, dataset, 256)
    return float(next(v for k, v in metrics.items() if k.endswith("/auc")))


def run_seed(seed: int, s: dict[str, Any], tmp: Path) -> dict[str, dict[str, float]]:
    """Every arm on every shift for one seed: ``{shift: {arm: test AUC}}`` (plus the clean reference)."""
    torch.manual_seed(seed)
    col = load_medmnist(FLAG)
    model = Medformer(MedformerConfig(dim=s["dim"], depth=s["depth"], heads=2), collections=[col])
    fit(model, [SupervisedObjective()], {FLAG: CollectionDataset(col)},
        train_config(s["source_steps"], 1e-3, seed), tmp / f"source{seed}")  # fmt: skip
    model.eval()
    out: dict[str, dict[str, float]] = {"none": {"source-only": auc(model, CollectionDataset(col, "test"))}}
    for kind in DEFAULT_STRENGTH:
        shift = Shift(kind)
        shifted = shift_collection(col, shift, ("train", "val", "test"), seed=seed)  # named like the source
        test = CollectionDataset(shifted, "test")
        row = {"source-only": auc(model, test)}

        m = copy.deepcopy(model)
        tent_on_dataset(m, test, batch_size=64, epochs=1, lr=1e-3)
        row["tent"] = auc(m, test)

        m = copy.deepcopy(model)
        target = copy.copy(shifted)
        target.name = "target"
        add_adapted_collection(m, "target", 2, target.modalities, target.tasks, like=FLAG)
        freeze_all_but(m, adapter_parameter_names(m, "target"))
        wrapper = Pretrainer(m, [MAE(decoder_dim=32, decoder_depth=1, decoder_heads=2)])
        unlabelled = CollectionDataset(target)  # MAE never reads labels
        fit(wrapper, wrapper.objectives(), {"target": unlabelled},
            train_config(s["adapt_steps"], 1e-2, seed), tmp / f"adapter{seed}{kind}")  # fmt: skip
        row["adapter"] = auc(m, CollectionDataset(target, "test"))

        m = copy.deepcopy(model)
        align = AlignmentObjective(FLAG, CollectionDataset(shifted), s["dim"], "coral", 32, seed=seed)
        steps = train_config(s["adapt_steps"], 3e-4, seed)
        fit(m, [SupervisedObjective(), align], {FLAG: CollectionDataset(col)}, steps,
            tmp / f"coral{seed}{kind}", weights={align.name: 10.0})  # fmt: skip
        row["coral"] = auc(m, test)

        m = copy.deepcopy(model)
        fit(m, [SupervisedObjective()], {FLAG: CollectionDataset(shifted)},
            train_config(s["adapt_steps"], 3e-4, seed), tmp / f"upper{seed}{kind}")  # fmt: skip
        row["target-supervised"] = auc(m, test)
        out[shift.name] = row
        print(
            f"seed {seed} {shift.name:16s} " + "  ".join(f"{a} {v:.3f}" for a, v in row.items()), flush=True
        )
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


def markdown(table: dict, settings: dict, seconds: float, quick: bool, seeds: int) -> str:
    lines = [
        f"# Domain shift on {FLAG} ({'quick' if quick else 'full'} run)",
        "",
        f"Test AUC, mean ± SD over {seeds} seed(s); Medformer dim {settings['dim']}, depth "
        f"{settings['depth']}; source {settings['source_steps']} steps, each adaptation "
        f"{settings['adapt_steps']} steps; {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
        "| shift | " + " | ".join(ARMS) + " |",
        "|---|" + "---|" * len(ARMS),
    ]
    for shift, row in table.items():
        cells = [f"{row[a]['mean']:.3f} ± {row[a]['sd']:.3f}" if a in row else "" for a in ARMS]
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    lines += ["", "Shifts: see `medformer.data.shifts`; 'none' is the unshifted test split."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = [s for s in table if s != "none"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        means = [table[s][arm]["mean"] for s in shifts]
        sds = [table[s][arm]["sd"] for s in shifts]
        ax.bar(np.arange(len(shifts)) + i * width, means, width, yerr=sds, label=arm, capsize=2)
    ax.axhline(table["none"]["source-only"]["mean"], color="k", ls="--", lw=1, label="no shift")
    ax.set_xticks(np.arange(len(shifts)) + 0.4 - width / 2, shifts)
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.4, 1.0)
    ax.legend(ncol=3, fontsize=8)
    ax.set_title(f"{FLAG}: adaptation under controlled shifts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pipeline check (a few minutes)")
    parser.add_argument("--root", default=os.environ.get("MEDMNIST_ROOT"), help="MedMNIST folder")
    args = parser.parse_args()
    if args.root:
        os.environ["MEDMNIST_ROOT"] = args.root
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    settings = SETTINGS["quick" if args.quick else "full"]
    start = time.perf_counter()
    name = "domain_shift_quick" if args.quick else "domain_shift"
    per_seed: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in settings["seeds"]:
            per_seed.append(run_seed(seed, settings, Path(tmp)))
            write(per_seed, settings, time.perf_counter() - start, name, args.quick)  # nothing lost


def write(per_seed: list, settings: dict[str, Any], seconds: float, name: str, quick: bool) -> None:
    """``benchmarks/results/<name>.{json,md,png}`` from the seeds run so far."""
    table = summarise(per_seed)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "seconds": seconds, "table": table, "per_seed": per_seed,
              "shifts": {k: v for k, v in DEFAULT_STRENGTH.items()}}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(table, settings, seconds, quick, len(per_seed))
    (out / f"{name}.md").write_text(text)
    plot(table, out / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
