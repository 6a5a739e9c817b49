"""Jigsaw puzzle benchmark: can the Sinkhorn puzzle task be learned on real medical images, and at what
CPU cost? A 3x3 puzzle on PneumoniaMNIST (2D chest X-rays, 28x28) and a 2^3 puzzle on AdrenalMNIST3D
(3D adrenal shape masks, 28^3), each with a small Medformer and with a CNN tile encoder.

    MEDMNIST_ROOT=/path/to/medmnist python benchmarks/puzzles.py            # full run
    MEDMNIST_ROOT=/path/to/medmnist python benchmarks/puzzles.py --quick    # pipeline check (minutes)

Training goes through the library's own path (`Pretrainer` + `medformer.train.fit`); the test score is
the mean over one puzzle per test image, drawn from a fixed seed (the same puzzles for every model):
tiles placed right (the target is > 90%), puzzles fully solved, Kendall's tau, and cells whose
reassembled content is right. AdrenalMNIST3D images are binary masks of a small organ, so many 3D tiles
are empty and identical: which of two empty tiles goes where cannot be known, so the tile-index metric
has a ceiling below 1, reported as ``tiles_correct_ceiling`` (expected best score: one right tile per
group of identical tiles). CPU time is the process CPU time of training (all threads).

Writes benchmarks/results/puzzles.{json,md} (``--quick``: puzzles_quick.*) and, per run, a picture of
a test puzzle solved by the model and the training curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from medformer.config import TrainConfig
from medformer.data.dataset import CollectionDataset, collate
from medformer.data.medmnist import load_medmnist
from medformer.models import Medformer, MedformerConfig
from medformer.pretext import Pretrainer
from medformer.pretext.puzzle import JigsawPuzzle, evaluate_puzzles, plot_puzzle_metrics
from medformer.pretext.tile_encoder import CNNTileEncoder
from medformer.train import fit

# tiles per axis and gap per set. AdrenalMNIST3D: 14-voxel cells; a 1-voxel gap (tiles of 13^3 with a
# 0-1 voxel jitter) keeps most tiles non-empty (ceiling 0.94), the default 0.15 (2 voxels) leaves many
# empty (ceiling 0.83). Training steps (batch 32) chosen from learning curves on 2 busy CPU cores; the
# 3D CNN reaches its ceiling within 20 steps but costs ~4.5 CPU s per step (full-resolution 3D convs).
SETS = {"pneumoniamnist": {"grid": 3, "gap": 0.15}, "adrenalmnist3d": {"grid": 2, "gap": 0.07}}
STEPS = {
    "pneumoniamnist": {"medformer": 1500, "cnn": 1500},
    "adrenalmnist3d": {"medformer": 1000, "cnn": 200},
}
QUICK_STEPS, QUICK_TEST = 20, 200
MEDFORMER = {"dim": 128, "depth": 4, "heads": 4}  # a small body: the tiles have 4-8 tokens each
PUZZLE = {"loss": "mse+ce", "head_dim": 256}
TRAIN = {"batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_fraction": 0.05, "log_every": 50}


def build(arch: str, flag: str, ndim: int, collection: Any) -> torch.nn.Module:
    if arch == "cnn":
        return CNNTileEncoder(ndim, channels=(32, 64, 128), dim=256)
    model = Medformer(MedformerConfig.from_preset("tiny", **MEDFORMER))
    model.add_collection(collection)
    return model


def tiles_ceiling(task: JigsawPuzzle, loader: DataLoader, seed: int) -> float:
    """Expected best tile-index score when identical tiles are interchangeable: per puzzle, the number
    of distinct tiles over the number of tiles (the same puzzles as the evaluation: same seed)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in loader:
        puzzles = task.views(batch, generator=generator)["puzzles"]
        flat = puzzles.tiles.flatten(2)
        for tiles in flat:
            total += len(torch.unique(tiles, dim=0)) / len(tiles)
            count += 1
    return total / max(count, 1)


def run(
    flag: str, arch: str, steps: int, test_limit: int | None, work: Path, figures: Path, tag: str
) -> dict:
    collection = load_medmnist(flag)
    grid, gap = SETS[flag]["grid"], SETS[flag]["gap"]
    torch.manual_seed(0)
    model = build(arch, flag, collection.ndim, collection)
    task = JigsawPuzzle(grid_2d=grid, grid_3d=grid, gap=gap, **PUZZLE)
    pretrainer = Pretrainer(model, [task])
    train = CollectionDataset(collection, "train")
    test = CollectionDataset(collection, "test")
    if test_limit is not None:
        test = CollectionDataset(collection, studies=test.studies[:test_limit])
    config = TrainConfig(
        steps=steps, device="cpu", checkpoint_every=None, keep_last=1, progress=False, **TRAIN
    )
    out = work / f"{flag}_{arch}"
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fit(pretrainer, pretrainer.objectives(), {collection.name: train}, config, out)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall

    loader = DataLoader(test, batch_size=100, collate_fn=collate)
    metrics = evaluate_puzzles(model, task, loader, seed=0)
    name = f"puzzles_{flag}_{arch}{tag}"
    sample = next(iter(DataLoader(test, batch_size=8, collate_fn=collate)))
    fig = task.visualise(model, sample, projection="mip" if collection.ndim == 3 else "slice")  # 3D: masks
    fig.savefig(figures / f"{name}.png", dpi=100)
    plot_puzzle_metrics(result.history, figures / f"{name}_curves.png")
    row = {
        "set": flag,
        "puzzle": f"{grid}x{grid}" if collection.ndim == 2 else f"{grid}^3",
        "gap": gap,
        "encoder": "Medformer (dim 128, depth 4)" if arch == "medformer" else "CNN (MONAI residual units)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": TRAIN["batch_size"],
        "train_cpu_seconds": round(cpu, 1),
        "train_wall_seconds": round(wall, 1),
        **{f"test_{k}": v for k, v in metrics.items()},
        "tiles_correct_ceiling": tiles_ceiling(task, loader, seed=0),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run: checks the pipeline")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--arch", nargs="+", default=["medformer", "cnn"], choices=["medformer", "cnn"])
    ap.add_argument("--steps", type=int, help="override the training steps of every run")
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if "MEDMNIST_ROOT" not in os.environ:
        raise SystemExit("set MEDMNIST_ROOT to the folder holding pneumoniamnist.npz and adrenalmnist3d.npz")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "_quick" if args.quick else ""
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for flag in args.sets:
            for arch in args.arch:
                steps = args.steps or (QUICK_STEPS if args.quick else STEPS[flag][arch])
                rows.append(run(flag, arch, steps, QUICK_TEST if args.quick else None, Path(work), out, tag))
                write(rows, args, out / f"puzzles{tag}", time.perf_counter() - start)


def write(rows: list[dict], args: argparse.Namespace, stem: Path, seconds: float) -> None:
    """Results so far as JSON and a Markdown table (rewritten after every run: nothing is lost)."""
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    summary = {
        "quick": args.quick,
        "wall_seconds": round(seconds, 1),
        "machine": machine,
        "medformer": MEDFORMER,
        "puzzle": PUZZLE,
        "train": TRAIN,
        "results": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Jigsaw puzzles (Sinkhorn) on MedMNIST"
        + (" — quick pipeline check, not a result" if args.quick else ""),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, "
        f"torch {machine['torch']}. Puzzle options: {PUZZLE}; training: {TRAIN}.",
        "",
        "| set | puzzle (gap) | encoder | steps | train CPU s | tiles right | ceiling | solved | Kendall tau "
        "| cells right |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['puzzle']} ({r['gap']}) | {r['encoder']} | {r['steps']} | "
            f"{r['train_cpu_seconds']:.0f} | "
            f"{r['test_tiles_correct']:.3f} | {r['tiles_correct_ceiling']:.3f} | {r['test_solved']:.3f} | "
            f"{r['test_kendall_tau']:.3f} | {r['test_cells_correct']:.3f} |"
        )
    lines += [
        "",
        "Test: one puzzle per test image (fixed seed). *tiles right*: tiles given their own position "
        "(Hungarian matching on the scores); *ceiling*: the best expected value of that metric when "
        "identical tiles are interchangeable; *cells right*: grid cells whose reassembled content is right.",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
