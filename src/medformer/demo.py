"""`medformer demo`: the workflow on built-in data, with nothing of the user's needed.

Today it runs the stages that exist: generate the simulated brain MRI cohort, inspect it, preprocess
it once into the cache, and run a Medformer over a batch with missing modalities for every task of
the cohort. Pre-training and fine-tuning stages join as the training engine lands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from medformer.config import PreprocessConfig
from medformer.data.cache import PreprocessCache
from medformer.data.dataset import CollectionDataset, collate
from medformer.data.inspect import inspect_collection
from medformer.data.manifest import open_collection
from medformer.data.phantom import PhantomConfig, write_cohort
from medformer.data.transforms import Preprocessor
from medformer.runtime import prepare_output, resolve_device, seed_everything


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(
    output: str | Path = "runs/demo", quick: bool = False, seed: int = 0, device: str = "auto"
) -> dict:
    """Run the demo into ``output``; returns (and writes ``summary.json``) what each stage produced."""
    from medformer.models import Medformer, MedformerConfig

    out = prepare_output(output)
    seed_everything(seed)
    dev = resolve_device(device)
    summary: dict[str, Any] = {"quick": quick, "seed": seed, "device": str(dev)}

    t = _stage("1/4 simulated brain MRI cohort (T1w, T1c, T2w, FLAIR; simulated tumours)")
    # 3 mm voxels on a 64^3 grid hold the whole brain (192 mm field of view)
    cohort = PhantomConfig(n_subjects=8 if quick else 40, seed=seed, voxel_size_mm=3.0, shape=(64, 64, 64))
    manifest = write_cohort(out / "data" / "brain_phantom", cohort)
    summary["cohort"] = {"manifest": str(manifest), "subjects": cohort.n_subjects, "seconds": _since(t)}

    t = _stage("2/4 inspect")
    collection = open_collection(manifest)
    report = inspect_collection(collection)
    print(report.format())
    summary["inspect"] = report.to_dict()

    t = _stage("3/4 preprocess once into the cache")
    cache = PreprocessCache(
        out / "cache", Preprocessor(PreprocessConfig(crop_foreground=False, size=[64, 64, 64]))
    )
    collection, skipped = cache.prepare(collection, skip_bad=True)
    summary["preprocess"] = {"studies": len(collection), "skipped": len(skipped), "seconds": _since(t)}

    t = _stage("4/4 Medformer over a batch with missing modalities")
    model = Medformer(MedformerConfig.from_preset("tiny"))
    model.add_collection(collection)
    model.to(dev).eval()
    studies = sorted(collection.studies, key=lambda s: len(s.modalities))[:2]  # include missing modalities
    batch = collate([CollectionDataset(collection, None, load=cache, studies=studies)[i] for i in range(2)])
    with torch.no_grad():
        outputs = model({**batch, "images": batch["images"].to(dev), "present": batch["present"].to(dev)})
    shapes = {k: list(v.shape) for k, v in outputs.items()}
    for k, v in shapes.items():
        print(f"  {k}: output {v}")
    print(f"  modalities present per study: {batch['present'].int().tolist()} of {list(batch['modalities'])}")
    summary["model"] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "outputs": shapes,
        "seconds": _since(t),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nDone. Summary: {out / 'summary.json'}")
    print("Pre-training, fine-tuning and the report are not part of this version's demo yet.")
    return summary


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)
