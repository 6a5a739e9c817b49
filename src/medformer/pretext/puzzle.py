"""Multimodal jigsaw puzzles solved with the Sinkhorn operator (Taleb et al. 2019/2021).

A puzzle, read top to bottom (`make_puzzles`, then `JigsawPuzzle.loss`):

    image (M modalities of one subject, co-registered) -> a g x g (2D) or g^3 (3D) grid of cells
    -> in each cell cut a tile a little smaller than the cell at a random offset (gap + jitter: the
       tiles' edges do not meet, so the answer cannot be read from matching borders)
    -> each tile from a randomly chosen modality of that subject ("multimodal"; "single" takes one
       modality per puzzle: the paper's ablation)          -> tiles in true order (B, N, *tile)
    -> shuffle by a random permutation sigma: tile i belongs at position sigma[i]
    -> embed every tile with the shared encoder (Medformer or CNN, `tile_encoder.py`)
    -> score tile i against position j: <f(tile_i), q(position_j)> -> X (B, N, N)
    -> Sinkhorn(X / tau) = S, a soft permutation (`sinkhorn.py`)
    -> loss: MSE(S^T tiles, tiles in true order) (the paper's), or cross-entropy -log S[i, sigma[i]]
    -> metrics from the hard permutation (Hungarian matching on X): tiles placed right, puzzles solved,
       Kendall's tau between predicted and true order.

Our choices where the paper leaves them open (all arguments of `JigsawPuzzle`):

- **Scores are pairwise**: position ``j`` has an embedding ``q_j``, an MLP of its cell's normalised
  centre coordinates, and ``X[i, j]`` is a scaled dot product. One head serves every grid size, so the
  difficulty schedule (grid grows as accuracy rises) needs no new output layer, and a 2D and a 3D
  collection share one task.
- **Tiles are embedded alone** (as in the paper), optionally followed by ``context_layers``
  transformer layers over the N tile embeddings of a puzzle (no position input: permutation
  equivariant), which lets tiles be compared with each other.
- **Tile size**: the cell size minus ``gap`` (a fraction of the cell), the tile placed at a uniformly
  random offset inside its cell; the puzzle's origin moves by the leftover pixels of the grid.
- **Identical tiles** (e.g. empty background of a shape mask) make the index metric ambiguous: the
  extra metric ``cells_correct`` counts a grid cell right when the reassembled content equals the
  true content there.
- **Synthetic modalities** (filled by a cross-modal translator, `medformer.generate`) may be drawn
  for tiles when ``synthetic: true``; they are never written into ``present``, so no downstream target
  or input can use them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medformer.errors import ConfigError
from medformer.pretext.base import PretextTask
from medformer.pretext.registry import register_task
from medformer.pretext.sinkhorn import hungarian, kendall_tau, log_sinkhorn, sample_gumbel
from medformer.pretext.tile_encoder import embed_tiles, tile_feature_dim

log = logging.getLogger(__name__)

GRID_RANGE = {2: (2, 5), 3: (2, 4)}  # tested grid sizes per dimensionality (2x2..5x5, 2^3..4^3)


# ----------------------------------------------------------------------------------------------------
# Puzzle construction


@dataclass
class Puzzles:
    """A batch of shuffled puzzles. ``tiles[b, i]`` belongs at grid position ``perm[b, i]`` (row-major
    cell index); ``modality[b, i]`` is the index of the modality it was cut from."""

    tiles: Tensor  # (B, N, *tile), shuffled
    perm: Tensor  # (B, N) long
    modality: Tensor  # (B, N) long, index into `modalities`
    grid: int  # tiles per axis
    modalities: tuple[str, ...]
    synthetic: Tensor  # (B, N) bool: the tile was cut from a synthetic (translated) image

    @property
    def ndim(self) -> int:
        return self.tiles.dim() - 2

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]

    def ordered(self) -> Tensor:
        """The tiles in their true order: ``ordered[b, perm[b, i]] = tiles[b, i]``."""
        return place(self.tiles, self.perm)


def place(tiles: Tensor, positions: Tensor) -> Tensor:
    """Put tile ``i`` at ``positions[i]``: ``(B, N, *t)`` -> ``(B, N, *t)`` in position order."""
    index = positions.view(*positions.shape, *[1] * (tiles.dim() - 2)).expand_as(tiles)
    return torch.empty_like(tiles).scatter_(1, index, tiles)


def tile_shape(spatial: Sequence[int], grid: int, gap: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(cell size, tile size) per axis for a ``grid`` per axis puzzle of an image of shape ``spatial``."""
    cell = tuple(s // grid for s in spatial)
    tile = tuple(c - int(gap * c + 0.5) for c in cell)  # gap rounded half up
    if min(tile) < 2:
        raise ConfigError(
            f"a {grid}-per-axis puzzle of a {'x'.join(map(str, spatial))} image leaves tiles of "
            f"{'x'.join(map(str, tile))}: use a smaller grid or gap, or larger images"
        )
    return cell, tile


def make_puzzles(
    images: Tensor,
    allowed: Tensor,
    grid: int,
    gap: float = 0.15,
    mode: Literal["multimodal", "single"] = "multimodal",
    modalities: Sequence[str] = (),
    synthetic: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Puzzles:
    """Cut, label and shuffle one puzzle per sample of ``images (B, M, *spatial)``.

    ``allowed (B, M)``: the modalities tiles may come from (at least one per sample); ``synthetic``
    ``(B, M)`` marks translated images (carried into `Puzzles.synthetic`). Random draws use
    ``generator`` (default: torch's global one, which the engine seeds and checkpoints).
    """
    b, _, *spatial = images.shape
    ndim, device = len(spatial), images.device
    n = grid**ndim
    if not allowed.any(1).all():
        raise ValueError("every sample needs at least one allowed modality to cut puzzle tiles from")
    cell, tile = tile_shape(spatial, grid, gap)

    def randint(high: int, *shape: int) -> Tensor:  # uniform in [0, high]
        return torch.randint(0, high + 1, shape, generator=generator, device="cpu").to(device)

    # where each tile starts: puzzle origin + cell corner + jitter inside the cell
    cells = torch.stack(torch.meshgrid(*[torch.arange(grid)] * ndim, indexing="ij"), -1).reshape(n, ndim)
    start = cells.to(device) * torch.tensor(cell, device=device)
    origin = torch.stack([randint(s - grid * c, b) for s, c in zip(spatial, cell)], -1)  # (B, d)
    jitter = torch.stack([randint(c - t, b, n) for c, t in zip(cell, tile)], -1)  # (B, N, d)
    start = origin[:, None] + start[None] + jitter  # (B, N, d)

    # which modality each tile is cut from
    weights = allowed.float().cpu()
    if mode == "multimodal":
        modality = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        modality = torch.multinomial(weights, 1, generator=generator).expand(b, n)
    modality = modality.to(device)

    # gather all tiles at once: images[b, modality, start_0 + 0..t_0, start_1 + 0..t_1, ...]
    index: list[Tensor] = [
        torch.arange(b, device=device).view(b, 1, *[1] * ndim),
        modality.view(b, n, *[1] * ndim),
    ]
    for axis, t in enumerate(tile):
        shape = [1] * ndim
        shape[axis] = t
        index.append(start[..., axis].view(b, n, *[1] * ndim) + torch.arange(t, device=device).view(shape))
    ordered = images[tuple(index)]  # (B, N, *tile)

    perm = torch.argsort(torch.rand(b, n, generator=generator), dim=1).to(device)  # tile i -> perm[i]
    shuffled = torch.gather(ordered, 1, perm.view(b, n, *[1] * ndim).expand_as(ordered))
    from_synthetic = torch.zeros(b, n, dtype=torch.bool, device=device)
    if synthetic is not None:
        from_synthetic = torch.gather(synthetic.to(device, torch.bool), 1, modality)
    return Puzzles(
        tiles=shuffled,
        perm=perm,
        modality=torch.gather(modality, 1, perm),
        grid=grid,
        modalities=tuple(modalities),
        synthetic=torch.gather(from_synthetic, 1, perm),
    )


# ----------------------------------------------------------------------------------------------------
# Scoring tiles against positions, and the metrics of a solution


def cell_centres(grid: int, ndim: int, device: torch.device | str | None = None) -> Tensor:
    """Normalised centre coordinates in (-1, 1) of the ``grid^ndim`` cells, row-major: ``(N, ndim)``."""
    axis = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) / grid * 2 - 1
    return torch.stack(torch.meshgrid(*[axis] * ndim, indexing="ij"), -1).reshape(-1, ndim)


class PositionScorer(nn.Module):
    """``X[i, j] = <a(f_i), q_j> / sqrt(h)``: tile features against position embeddings (any grid size).

    ``a``: LayerNorm + MLP of the tile feature, then ``context_layers`` transformer layers across the
    puzzle's tiles; ``q_j``: an MLP of cell ``j``'s normalised centre (one per dimensionality).
    """

    def __init__(self, in_dim: int, dim: int = 256, context_layers: int = 0):
        super().__init__()
        self.dim = dim
        self.tile = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.context = None
        if context_layers:
            layer = nn.TransformerEncoderLayer(
                dim, max(1, dim // 64), 2 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            self.context = nn.TransformerEncoder(layer, context_layers, enable_nested_tensor=False)
        self.position = nn.ModuleDict(
            {f"{d}d": nn.Sequential(nn.Linear(d, dim), nn.GELU(), nn.Linear(dim, dim)) for d in (2, 3)}
        )

    def forward(self, features: Tensor, grid: int, ndim: int) -> Tensor:
        """``features (B, N, in_dim)`` -> scores ``(B, N, N)``."""
        a = self.tile(features)
        if self.context is not None:
            a = self.context(a)
        q = self.position[f"{ndim}d"](cell_centres(grid, ndim, features.device).to(a.dtype))
        return a @ q.T / math.sqrt(self.dim)


@torch.no_grad()
def puzzle_metrics(scores: Tensor, puzzles: Puzzles) -> dict[str, float]:
    """Hard solution by Hungarian matching on the scores, and how good it is (means over the batch).

    ``tiles_correct``: tiles placed at their own position; ``solved``: puzzles with every tile right;
    ``kendall_tau``: rank correlation of predicted and true positions; ``cells_correct``: cells whose
    reassembled content equals the truth (identical tiles are interchangeable).
    """
    pred = hungarian(scores)
    right = pred == puzzles.perm
    assembled = place(puzzles.tiles, pred).flatten(2)
    truth = puzzles.ordered().flatten(2)
    same = (assembled - truth).abs().amax(-1) <= 1e-6
    return {
        "tiles_correct": float(right.float().mean()),
        "solved": float(right.all(1).float().mean()),
        "kendall_tau": float(kendall_tau(pred, puzzles.perm).mean()),
        "cells_correct": float(same.float().mean()),
    }


# ----------------------------------------------------------------------------------------------------
# The pretext task


@register_task("puzzle")
class JigsawPuzzle(PretextTask):
    """Solve multimodal jigsaw puzzles with a Sinkhorn network; see the module docstring.

    Puzzle: ``grid_2d`` / ``grid_3d`` tiles per axis (2..5 / 2..4), ``gap`` the fraction of each cell
    left out around its tile (its place inside the cell is random), ``modality_mode`` one modality per
    tile (``multimodal``) or per puzzle (``single``), ``modalities`` restricts which ones. Solver:
    Sinkhorn with temperature ``tau``, ``iterations`` rounds, ``gumbel`` noise while training; ``loss``
    ``mse`` (the paper's), ``ce`` or ``mse+ce``; ``head_dim`` and ``context_layers`` shape the scorer.
    ``schedule``: start at ``schedule_start`` tiles per axis and add one whenever the running mean
    (momentum ``schedule_momentum``) of tiles placed right passes ``schedule_threshold``.
    ``synthetic``: tiles may come from modalities that ``translators`` (folders written by
    ``medformer generate``) or ``filler`` (a `medformer.generate.ModalityFiller`) synthesise.
    """

    def __init__(
        self,
        grid_2d: int = 3,
        grid_3d: int = 2,
        gap: float = 0.15,
        modality_mode: Literal["multimodal", "single"] = "multimodal",
        modalities: list[str] | None = None,
        loss: Literal["mse", "ce", "mse+ce"] = "mse",
        tau: float = 1.0,
        iterations: int = 20,
        gumbel: float = 0.0,
        head_dim: int = 256,
        context_layers: int = 0,
        schedule: bool = False,
        schedule_start: int = 2,
        schedule_threshold: float = 0.9,
        schedule_momentum: float = 0.98,
        synthetic: bool = False,
        translators: list[str] | None = None,
        filler: nn.Module | None = None,
        start_step: int = 0,
    ):
        super().__init__(start_step)
        for name, value, (lo, hi) in (
            ("grid_2d", grid_2d, GRID_RANGE[2]),
            ("grid_3d", grid_3d, GRID_RANGE[3]),
        ):
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
        if not 0 <= gap < 0.9 or tau <= 0 or iterations < 1 or gumbel < 0:
            raise ValueError("need 0 <= gap < 0.9, tau > 0, iterations >= 1 and gumbel >= 0")
        if schedule and not 2 <= schedule_start <= max(grid_2d, grid_3d):
            raise ValueError(f"schedule_start must be in [2, max(grid_2d, grid_3d)], got {schedule_start}")
        if not 0 < schedule_threshold <= 1 or not 0 <= schedule_momentum < 1:
            raise ValueError("need 0 < schedule_threshold <= 1 and 0 <= schedule_momentum < 1")
        self.grid_2d, self.grid_3d, self.gap = grid_2d, grid_3d, gap
        self.modality_mode, self.modalities = modality_mode, modalities
        self.loss_kind, self.tau, self.iterations, self.gumbel = loss, tau, iterations, gumbel
        self.head_dim, self.context_layers = head_dim, context_layers
        self.schedule, self.schedule_threshold, self.schedule_momentum = (
            schedule, schedule_threshold, schedule_momentum,
        )  # fmt: skip
        self.synthetic = synthetic
        if translators and filler is None:
            from medformer.generate import ModalityFiller

            filler = ModalityFiller.from_pretrained(translators)
        if synthetic and filler is None:
            log.info("puzzle: synthetic=true without translators: only batches that carry `synthetic` use it")
        self.filler = filler
        if filler is not None:
            filler.requires_grad_(False).eval()
        self.scorer: PositionScorer | None = None
        # difficulty schedule state (a buffer: saved in checkpoints): grid now, running tiles-correct
        start = schedule_start if schedule else 0
        self.register_buffer("grid_now", torch.tensor([min(start, grid_2d), min(start, grid_3d)]))
        self.register_buffer("running", torch.zeros(2))

    def attach(self, model: nn.Module) -> None:
        self.scorer = PositionScorer(tile_feature_dim(model), self.head_dim, self.context_layers)

    def train(self, mode: bool = True) -> JigsawPuzzle:
        super().train(mode)
        if self.filler is not None:
            self.filler.eval()  # the translator is frozen: batch norm / dropout stay in inference mode
        return self

    # -- views ---------------------------------------------------------------------------------------
    def grid(self, ndim: int) -> int:
        """Tiles per axis now (the schedule's current level, else the configured grid)."""
        final = self.grid_2d if ndim == 2 else self.grid_3d
        return int(self.grid_now[ndim - 2]) if self.schedule else final

    def allowed(self, batch: Mapping[str, Any]) -> Tensor:
        """Which modalities each sample's tiles may come from: present (+ synthetic, when allowed),
        restricted to ``self.modalities``."""
        allowed = batch["present"].bool().clone()
        if self.synthetic and "synthetic" in batch:
            allowed |= batch["synthetic"].to(allowed.device).bool()
        if self.modalities is not None:
            keep = torch.tensor([m in self.modalities for m in batch["modalities"]])
            allowed &= keep.to(allowed.device)
        return allowed

    def views(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if self.filler is not None and self.synthetic:
            from medformer.generate import fill_missing

            batch = fill_missing(batch, self.filler)
        images = batch["images"].float()
        allowed = self.allowed(batch)
        keep = allowed.any(1)
        if not keep.any():
            return {"puzzles": None}
        if not keep.all():  # samples without an allowed modality sit this task out
            images, allowed = images[keep], allowed[keep]
        synthetic = batch.get("synthetic")
        puzzles = make_puzzles(
            images, allowed, self.grid(images.dim() - 2), self.gap, self.modality_mode,
            batch["modalities"], None if synthetic is None else synthetic[keep.to(synthetic.device)],
            generator,
        )  # fmt: skip
        return {"puzzles": puzzles, "collection": batch.get("collection")}

    # -- loss ----------------------------------------------------------------------------------------
    def scores(self, model: nn.Module, puzzles: Puzzles, collection: str | None = None) -> Tensor:
        """Tile -> position scores ``(B, N, N)`` for a batch of puzzles."""
        if self.scorer is None:
            raise RuntimeError("JigsawPuzzle.attach(model) was not called (Pretrainer does it)")
        b, n = puzzles.tiles.shape[:2]
        features = embed_tiles(
            model, puzzles.tiles.flatten(0, 1), puzzles.modality.flatten(), puzzles.modalities, collection
        )
        return self.scorer(features.view(b, n, -1).float(), puzzles.grid, puzzles.ndim)

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        puzzles: Puzzles | None = views["puzzles"]
        if puzzles is None:
            return None, {}
        scores = self.scores(model, puzzles, views.get("collection"))
        terms: dict[str, Tensor] = {}
        with torch.autocast(scores.device.type, enabled=False):  # Sinkhorn and the losses in fp32
            log_alpha = scores.float()
            if self.training and self.gumbel > 0:
                log_alpha = log_alpha + self.gumbel * sample_gumbel(log_alpha.shape, log_alpha)
            log_s = log_sinkhorn(log_alpha / self.tau, self.iterations)  # (B, N, N): tile i -> position j
            if "mse" in self.loss_kind:
                tiles = puzzles.tiles.flatten(2).float()
                reordered = log_s.exp().transpose(1, 2) @ tiles  # position j <- sum_i S[i, j] tile_i
                terms["mse"] = F.mse_loss(reordered, puzzles.ordered().flatten(2).float())
            if "ce" in self.loss_kind:
                terms["ce"] = -log_s.gather(2, puzzles.perm[..., None]).mean()
        loss = sum(terms.values())
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs.update(puzzle_metrics(scores, puzzles))
        logs["grid"] = float(puzzles.grid)
        if self.training and self.schedule:
            self._advance(puzzles.ndim, logs["tiles_correct"])
        return loss, logs

    def _advance(self, ndim: int, tiles_correct: float) -> None:
        """Difficulty schedule: running mean of tiles-correct; past the threshold, one more tile per axis."""
        i, final = ndim - 2, (self.grid_2d if ndim == 2 else self.grid_3d)
        m = self.schedule_momentum
        self.running[i] = m * self.running[i] + (1 - m) * tiles_correct
        if self.running[i] >= self.schedule_threshold and self.grid_now[i] < final:
            self.grid_now[i] += 1
            self.running[i] = 0.0

    # -- pictures ------------------------------------------------------------------------------------
    @torch.no_grad()
    def solve(self, model: nn.Module, puzzles: Puzzles, collection: str | None = None) -> Tensor:
        """The hard solution: the position given to each tile ``(B, N)`` (Hungarian matching)."""
        return hungarian(self.scores(model, puzzles, collection))

    @torch.no_grad()
    def visualise(
        self, model: nn.Module, batch: Mapping[str, Any], index: int = 0, projection: str = "slice"
    ) -> Any | None:
        """A figure: the shuffled puzzle, the model's solution (wrong tiles framed red) and the truth."""
        views = self.views(batch)
        puzzles: Puzzles | None = views["puzzles"]
        if puzzles is None:
            return None
        pred = self.solve(model, puzzles, views.get("collection"))
        return plot_puzzle(puzzles, pred, index, projection)


# ----------------------------------------------------------------------------------------------------
# Pictures


def _mosaic(tiles: Tensor, grid: int, ndim: int, projection: str = "slice") -> Tensor:
    """Tiles in position order ``(N, *t)`` -> one 2D picture with 1-pixel seams (NaN). 3D: the middle
    slice (``projection="slice"``) or the maximum along the first axis (``"mip"``, for masks) of each
    tile; the grid's slabs side by side."""
    if ndim == 3:
        tiles = tiles.amax(1) if projection == "mip" else tiles[:, tiles.shape[1] // 2]  # (N, h, w)
    h, w = tiles.shape[-2:]
    slabs = grid if ndim == 3 else 1
    out = torch.full((grid * (h + 1) - 1, slabs * grid * (w + 1) + (slabs - 1) * 2 - 1), float("nan"))
    for k, t in enumerate(tiles.float().cpu()):
        z, rest = divmod(k, grid * grid) if ndim == 3 else (0, k)
        r, c = divmod(rest, grid)
        x0 = z * (grid * (w + 1) + 2) + c * (w + 1)
        out[r * (h + 1) : r * (h + 1) + h, x0 : x0 + w] = t
    return out


def plot_puzzle(puzzles: Puzzles, pred: Tensor, index: int = 0, projection: str = "slice") -> Any:
    """Figure of puzzle ``index``: shuffled (tiles in shuffled order), solution, truth (3D tiles shown by
    their middle slice, or with ``projection="mip"`` their maximum intensity projection)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    g, d = puzzles.grid, puzzles.ndim
    tiles, perm, guess = puzzles.tiles[index], puzzles.perm[index], pred[index]
    panels = {
        "shuffled": _mosaic(tiles, g, d, projection),
        "solution": _mosaic(place(tiles[None], guess[None])[0], g, d, projection),
        "truth": _mosaic(place(tiles[None], perm[None])[0], g, d, projection),
    }
    right = int((guess == perm).sum())
    fig = Figure(figsize=(3.2 * len(panels) * (g if d == 3 else 1) ** 0.5, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    h, w = tiles.shape[-2:]
    finite = torch.cat([p[~p.isnan()] for p in panels.values()])
    lo, hi = float(finite.min()), float(finite.max()) or 1.0
    for ax, (title, image) in zip(axes, panels.items()):
        ax.imshow(image.numpy(), cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title if title != "solution" else f"solution ({right}/{len(perm)} tiles right)")
        ax.set_axis_off()
    wrong = [int(p) for i, p in enumerate(guess) if p != perm[i]]  # positions given a wrong tile
    for k in wrong:
        z, rest = divmod(k, g * g) if d == 3 else (0, k)
        r, c = divmod(rest, g)
        x0 = z * (g * (w + 1) + 2) + c * (w + 1)
        axes[1].add_patch(Rectangle((x0 - 0.5, r * (h + 1) - 0.5), w, h, fill=False, ec="red", lw=1.5))
    names = ", ".join(sorted({puzzles.modalities[int(i)] for i in puzzles.modality[index]}))
    shown = "middle slices" if projection == "slice" else "maximum projections"
    size = f"{g}x{g} puzzle" if d == 2 else f"{g}^3 puzzle ({shown} of the tiles, slabs left to right)"
    fig.suptitle(f"{size}, tiles from: {names}", fontsize=9)
    fig.tight_layout()
    return fig


METRICS = ("tiles_correct", "solved", "kendall_tau", "cells_correct")


def plot_puzzle_metrics(
    history: Sequence[Mapping[str, Any]], path: str | Path, prefix: str = "puzzle"
) -> Path:
    """Training curves of the puzzle metrics from a run's ``metrics.jsonl`` records, saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name in METRICS:
        key = f"{prefix}/{name}" if prefix else name
        points = [(r["step"], r[key]) for r in history if key in r and "split" not in r]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("step")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("jigsaw puzzle (training batches)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


@torch.no_grad()
def evaluate_puzzles(
    model: nn.Module,
    task: JigsawPuzzle,
    batches: Sequence[Mapping[str, Any]] | Any,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean puzzle metrics over ``batches`` (e.g. a test loader), with puzzles drawn from a fixed seed
    so that models are compared on the same puzzles."""
    from medformer.train.engine import to_device

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training, task.training
    model.eval()
    task.eval()
    sums: dict[str, float] = {}
    count = 0
    try:
        for batch in batches:
            batch = to_device(batch, torch.device(device))
            views = task.views(batch, generator=generator)
            puzzles = views["puzzles"]
            if puzzles is None:
                continue
            metrics = puzzle_metrics(task.scores(model, puzzles, views.get("collection")), puzzles)
            k = puzzles.tiles.shape[0]
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value * k
            count += k
    finally:
        model.train(was_training[0])
        task.train(was_training[1])
    return {name: value / max(count, 1) for name, value in sums.items()} | {"puzzles": float(count)}


__all__ = [
    "JigsawPuzzle",
    "PositionScorer",
    "Puzzles",
    "cell_centres",
    "evaluate_puzzles",
    "make_puzzles",
    "place",
    "plot_puzzle",
    "plot_puzzle_metrics",
    "puzzle_metrics",
    "tile_shape",
]
