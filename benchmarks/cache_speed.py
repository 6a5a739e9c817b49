"""Preprocessing cache benchmark: the first epoch reads and preprocesses NIfTI files, the second reads
the cache. Target: the second epoch at least 10x faster.

    python benchmarks/cache_speed.py [--subjects 24] [--shape 160 192 160]

Writes benchmarks/results/cache_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medformer.config import PreprocessConfig
from medformer.data.cache import PreprocessCache
from medformer.data.dataset import CollectionDataset
from medformer.data.manifest import open_collection
from medformer.data.transforms import Preprocessor

MODALITIES = ("T1w", "T2w", "FLAIR")


def write_subjects(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Head-like volumes (an ellipsoid of tissue in air) at 1 mm in LPS-ish orientation."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (zz**2 / 0.8 + yy**2 / 0.7 + xx**2 / 0.8) < 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(n):
        folder = root / f"sub-{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, m in enumerate(MODALITIES):
            vol = (head * (100 + 50 * j) + rng.normal(0, 5, shape)).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, affine), folder / f"{m}.nii.gz")


def epoch_time(dataset: CollectionDataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    config = PreprocessConfig(spacing=[1.5, 1.5, 1.5], size=[96, 96, 96])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "subjects"
        write_subjects(root, args.subjects, tuple(args.shape))
        collection = open_collection(root)
        cache = PreprocessCache(Path(tmp) / "cache", Preprocessor(config))
        ds = CollectionDataset(collection, split=None, load=cache)
        first = epoch_time(ds)
        second = epoch_time(ds)
        cache_mb = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*")) / 2**20
    result = {
        "subjects": args.subjects,
        "modalities": len(MODALITIES),
        "input_shape": args.shape,
        "preprocess": config.model_dump(mode="json"),
        "first_epoch_s": round(first, 3),
        "second_epoch_s": round(second, 3),
        "speedup": round(first / second, 1),
        "target_speedup": 10,
        "cache_MiB": round(cache_mb, 1),
        "machine": {
            "cpu": _cpu(),
            "cores": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_speed.json").write_text(json.dumps(result, indent=1))
    (out / "cache_speed.md").write_text(
        "# Preprocessing cache: first vs second epoch\n\n"
        f"{args.subjects} subjects x {len(MODALITIES)} modalities, NIfTI {tuple(args.shape)} at 1 mm -> "
        "RAS, 1.5 mm, foreground crop, percentile scaling, 96^3.\n\n"
        "| first epoch (s) | second epoch (s) | speed-up | target |\n|---|---|---|---|\n"
        f"| {first:.2f} | {second:.2f} | {first / second:.1f}x | >= 10x |\n\n"
        f"Machine: {result['machine']}\n"
    )
    print(json.dumps(result, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
