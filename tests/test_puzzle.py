"""Jigsaw puzzles: construction (2D/3D, gap and jitter, modality per tile), the task, metrics, schedule."""

from __future__ import annotations

import monai.networks.nets  # noqa: F401  (MONAI's import takes seconds: paid at collection, not in a test)
import pytest
import torch

from medformer.errors import ConfigError
from medformer.models import Medformer, MedformerConfig
from medformer.pretext import Pretrainer, build_tasks
from medformer.pretext.puzzle import (
    JigsawPuzzle,
    Puzzles,
    cell_centres,
    evaluate_puzzles,
    make_puzzles,
    place,
    plot_puzzle_metrics,
    puzzle_metrics,
    tile_shape,
)
from medformer.pretext.sinkhorn import permutation_matrix
from medformer.pretext.tile_encoder import CNNTileEncoder, embed_tiles

pytestmark = pytest.mark.usefixtures("one_thread")


def coordinate_images(b: int, m: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Every voxel holds its flat index + 10^6 * modality: a tile says where and from what it was cut."""
    n = torch.tensor(spatial).prod().item()
    flat = torch.arange(n, dtype=torch.float32).view(*spatial)
    return torch.stack([flat + 1_000_000 * k for k in range(m)])[None].repeat(b, 1, *[1] * len(spatial))


def batch_of(images: torch.Tensor, present: torch.Tensor | None = None, **extra) -> dict:
    b, m = images.shape[:2]
    return {
        "images": images,
        "present": torch.ones(b, m, dtype=torch.bool) if present is None else present,
        "modalities": tuple(f"m{k}" for k in range(m)),
        "collection": "toy",
        "ndim": images.dim() - 2,
        **extra,
    }


def tiny_medformer(modalities=("m0", "m1", "m2")) -> Medformer:
    cfg = MedformerConfig(dim=32, depth=1, heads=2, patch_size_2d=4, patch_size_3d=4)
    return Medformer(cfg, modalities=modalities, collections=["toy"])


# -- construction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial,grid", [((28, 28), 3), ((30, 31), 5), ((16, 16, 16), 2), ((24, 24, 24), 4)])
def test_tiles_are_crops_of_their_own_cell_and_perm_says_where_they_belong(spatial, grid) -> None:
    torch.manual_seed(0)
    images = coordinate_images(3, 2, spatial)
    p = make_puzzles(images, torch.ones(3, 2, dtype=torch.bool), grid, gap=0.2, modalities=("a", "b"))
    ndim, n = len(spatial), grid ** len(spatial)
    cell, tile = tile_shape(spatial, grid, 0.2)
    assert p.tiles.shape == (3, n, *tile) and p.ndim == ndim and p.num_tiles == n
    assert sorted(p.perm[0].tolist()) == list(range(n))
    ordered = p.ordered()
    for b in range(3):
        for j in range(n):
            first = int(ordered[b, j].flatten()[0]) % 1_000_000  # the tile's first voxel
            corner = torch.tensor(torch.unravel_index(torch.tensor(first), spatial))
            cell_index = torch.tensor(torch.unravel_index(torch.tensor(j), (grid,) * ndim))
            low = cell_index * torch.tensor(cell)
            leftover = torch.tensor(spatial) - grid * torch.tensor(cell)
            # inside its cell (up to the puzzle's shift by the leftover pixels), jitter within the gap
            assert (
                (corner >= low) & (corner <= low + leftover + torch.tensor(cell) - torch.tensor(tile))
            ).all()
            # a contiguous crop: the same as slicing the image there
            crop = images[b, 0][tuple(slice(c, c + t) for c, t in zip(corner.tolist(), tile))]
            torch.testing.assert_close(ordered[b, j] % 1_000_000, crop)
    # shuffled tile i is the ordered tile at perm[i]
    torch.testing.assert_close(p.tiles[1, 0], ordered[1, p.perm[1, 0]])


def test_gap_zero_tiles_the_image_exactly_and_jitter_moves_tiles() -> None:
    images = coordinate_images(1, 1, (12, 12))
    p = make_puzzles(images, torch.ones(1, 1, dtype=torch.bool), 3, gap=0.0)
    mosaic = p.ordered().view(3, 3, 4, 4).permute(0, 2, 1, 3).reshape(12, 12)
    torch.testing.assert_close(mosaic, images[0, 0])
    torch.manual_seed(0)
    corners = {
        int(make_puzzles(images, torch.ones(1, 1, dtype=torch.bool), 3, gap=0.5).ordered()[0, 4, 0, 0])
        for _ in range(40)
    }
    assert len(corners) > 3  # the centre tile starts at several places inside its cell


def test_each_tile_comes_from_an_allowed_modality() -> None:
    torch.manual_seed(0)
    images = coordinate_images(4, 3, (20, 20))
    allowed = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    p = make_puzzles(images, allowed, 5, modalities=("a", "b", "c"))
    source = (p.tiles.flatten(2)[..., 0] // 1_000_000).long()
    assert torch.equal(source, p.modality)  # the recorded modality is where the pixels came from
    for b in range(4):
        assert set(p.modality[b].tolist()) <= set(torch.nonzero(allowed[b]).flatten().tolist())
    assert len(set(p.modality[2].tolist())) == 3  # 25 tiles from 3 modalities: all of them occur
    single = make_puzzles(images, allowed, 5, mode="single")
    assert all(len(set(row.tolist())) == 1 for row in single.modality)
    with pytest.raises(ValueError, match="allowed modality"):
        make_puzzles(images, torch.zeros(4, 3, dtype=torch.bool), 3)


def test_puzzles_are_reproducible_with_a_generator() -> None:
    images = coordinate_images(2, 2, (16, 16, 16))
    draws = [
        make_puzzles(
            images, torch.ones(2, 2, dtype=torch.bool), 2, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0].tiles, draws[1].tiles) and torch.equal(draws[0].perm, draws[1].perm)


def test_tiles_too_small_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="smaller grid"):
        tile_shape((8, 8), 5, 0.2)


def test_place_inverts_the_shuffle_and_cell_centres_are_row_major() -> None:
    tiles = torch.arange(6.0).view(1, 6, 1)
    perm = torch.tensor([[3, 0, 5, 1, 2, 4]])
    placed = place(tiles, perm)
    assert placed[0, 3, 0] == 0 and placed[0, 0, 0] == 1
    c = cell_centres(2, 2)
    assert c.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    assert cell_centres(3, 3).shape == (27, 3)


# -- metrics -----------------------------------------------------------------------------------------


def _puzzles(tiles: torch.Tensor, perm: torch.Tensor, grid: int = 2) -> Puzzles:
    b, n = perm.shape
    return Puzzles(
        tiles, perm, torch.zeros(b, n, dtype=torch.long), grid, ("a",), torch.zeros(b, n, dtype=bool)
    )


def test_metrics_of_a_right_a_swapped_and_an_ambiguous_solution() -> None:
    perm = torch.tensor([[2, 0, 3, 1], [1, 0, 3, 2]])
    tiles = torch.randn(2, 4, 3, 3)
    right = puzzle_metrics(permutation_matrix(perm) * 10, _puzzles(tiles, perm))
    assert right == {"tiles_correct": 1.0, "solved": 1.0, "kendall_tau": 1.0, "cells_correct": 1.0}
    swapped = perm.clone()
    swapped[0, :2] = perm[0, :2].flip(0)  # two tiles of the first puzzle exchanged
    m = puzzle_metrics(permutation_matrix(swapped) * 10, _puzzles(tiles, perm))
    assert m["tiles_correct"] == pytest.approx(6 / 8) and m["solved"] == 0.5
    assert m["cells_correct"] == pytest.approx(6 / 8) and 0 < m["kendall_tau"] < 1
    same = tiles.clone()
    same[0, 0] = same[0, 1] = 0.0  # the exchanged tiles look the same: the picture is still right
    m = puzzle_metrics(permutation_matrix(swapped) * 10, _puzzles(same, perm))
    assert m["tiles_correct"] == pytest.approx(6 / 8) and m["cells_correct"] == 1.0


# -- the task ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "ce", "mse+ce"])
def test_loss_trains_the_medformer_and_the_scorer(loss: str) -> None:
    torch.manual_seed(0)
    model = tiny_medformer()
    task = JigsawPuzzle(loss=loss, head_dim=16, gumbel=0.5)
    trainer = Pretrainer(model, [task])
    batch = batch_of(torch.rand(2, 3, 24, 24))
    value, logs = task(model, batch)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert set(logs) >= {"tiles_correct", "solved", "kendall_tau", "cells_correct", "grid"}
    assert ("mse" in logs) == ("mse" in loss) and ("ce" in logs) == ("ce" in loss)
    assert model.input_adaptformer.modality_embed["m1"].grad is not None
    scorer = trainer.tasks["puzzle"].scorer
    assert all(p.grad is not None for p in [*scorer.tile.parameters(), *scorer.position["2d"].parameters()])
    assert all(p.grad is None for p in scorer.position["3d"].parameters())  # a 2D batch
    assert logs["grid"] == 3


def test_medformer_tile_embedding_does_not_depend_on_the_other_tiles() -> None:
    torch.manual_seed(0)
    model = tiny_medformer().eval()
    tiles, modality = torch.rand(6, 8, 8), torch.tensor([0, 2, 1, 0, 2, 2])
    full = embed_tiles(model, tiles, modality, ("m0", "m1", "m2"), "toy")
    alone = embed_tiles(model, tiles[3:4], modality[3:4], ("m0", "m1", "m2"), "toy")
    torch.testing.assert_close(full[3:4], alone, atol=1e-5, rtol=1e-5)
    other = embed_tiles(model, tiles[3:4], torch.tensor([1]), ("m0", "m1", "m2"), "toy")
    assert not torch.allclose(alone, other)  # the modality embedding is part of the tile's tokens


def test_a_3d_puzzle_with_the_cnn_tile_encoder() -> None:
    torch.manual_seed(0)
    encoder = CNNTileEncoder(3, channels=(4, 8), dim=16)
    task = JigsawPuzzle(grid_3d=2, head_dim=16, context_layers=1)
    Pretrainer(encoder, [task])
    value, logs = task(encoder, batch_of(torch.rand(2, 1, 16, 16, 16)))
    value.backward()
    assert torch.isfinite(value) and logs["grid"] == 2
    assert encoder.proj.weight.grad is not None


def test_the_puzzle_is_learned_on_an_easy_image_family() -> None:
    """Brightness ramps: a tile's position can be read from its content; 60 steps solve 2x2 puzzles."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    encoder = CNNTileEncoder(2, channels=(8, 16), dim=32)
    task = JigsawPuzzle(grid_2d=2, head_dim=32, loss="mse+ce", gap=0.25)
    trainer = Pretrainer(encoder, [task])
    opt = torch.optim.Adam(trainer.parameters(), lr=3e-3)

    def sample(b: int) -> dict:
        scale = 0.5 + torch.rand(b, 1, 1, 1)
        return batch_of(scale * (yy + 2 * xx) + 0.05 * torch.randn(b, 1, 16, 16))

    before = evaluate_puzzles(encoder, task, [sample(32) for _ in range(2)], seed=1)
    for _ in range(60):
        loss, _ = task(encoder, sample(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_puzzles(encoder, task, [sample(32) for _ in range(2)], seed=1)
    assert after["puzzles"] == 64
    assert after["tiles_correct"] > 0.9 > before["tiles_correct"]
    assert after["solved"] > 0.8 and after["kendall_tau"] > 0.9


def test_evaluation_uses_the_same_puzzles_for_the_same_seed() -> None:
    torch.manual_seed(0)
    encoder = CNNTileEncoder(2, channels=(4,), dim=8)
    task = JigsawPuzzle(head_dim=8)
    Pretrainer(encoder, [task])
    batches = [batch_of(torch.rand(4, 1, 18, 18))]
    assert evaluate_puzzles(encoder, task, batches, seed=3) == evaluate_puzzles(
        encoder, task, batches, seed=3
    )
    assert encoder.training and task.training  # modes restored


def test_difficulty_schedule_grows_the_grid_and_is_saved() -> None:
    task = JigsawPuzzle(grid_2d=4, grid_3d=3, schedule=True, schedule_start=2, schedule_momentum=0.5)
    assert task.grid(2) == 2 and task.grid(3) == 2
    task._advance(2, 0.5)
    assert task.grid(2) == 2  # running mean 0.25: below the threshold
    for _ in range(5):
        task._advance(2, 1.0)
    assert task.grid(2) == 3 and task.grid(3) == 2  # one step up, per dimensionality
    for _ in range(20):
        task._advance(2, 1.0)
    assert task.grid(2) == 4  # and never past grid_2d
    restored = JigsawPuzzle(grid_2d=4, grid_3d=3, schedule=True)
    restored.load_state_dict(task.state_dict(), strict=False)
    assert restored.grid(2) == 4
    assert JigsawPuzzle(grid_2d=4).grid(2) == 4  # without a schedule: the configured grid


def test_training_step_drives_the_schedule() -> None:
    torch.manual_seed(0)
    encoder = CNNTileEncoder(2, channels=(4,), dim=8)
    task = JigsawPuzzle(grid_2d=3, head_dim=8, schedule=True, schedule_threshold=0.01, schedule_momentum=0.0)
    Pretrainer(encoder, [task])
    batch = batch_of(torch.rand(4, 1, 18, 18))
    grids = []
    for _ in range(6):
        _, logs = task(encoder, batch)
        grids.append(logs["grid"])
    assert grids[0] == 2 and grids[-1] == 3 and grids == sorted(grids)


def test_synthetic_modalities_are_used_only_when_allowed() -> None:
    torch.manual_seed(0)
    images = coordinate_images(2, 2, (12, 12))
    present = torch.tensor([[True, False], [True, False]])
    synthetic = torch.tensor([[False, True], [False, True]])
    batch = batch_of(images, present, synthetic=synthetic)
    allowed = JigsawPuzzle(grid_2d=4, synthetic=True).views(batch)["puzzles"]
    assert allowed.modality.eq(1).any() and torch.equal(allowed.synthetic, allowed.modality.eq(1))
    real_only = JigsawPuzzle(grid_2d=4).views(batch)["puzzles"]
    assert real_only.modality.eq(0).all() and not real_only.synthetic.any()


def test_samples_without_an_allowed_modality_sit_out() -> None:
    images = coordinate_images(3, 2, (12, 12))
    present = torch.tensor([[True, False], [False, True], [True, True]])
    task = JigsawPuzzle(modalities=["m1"])
    puzzles = task.views(batch_of(images, present))["puzzles"]
    assert puzzles.tiles.shape[0] == 2 and puzzles.modality.eq(1).all()
    assert JigsawPuzzle(modalities=["other"]).loss(tiny_medformer(), {"puzzles": None}) == (None, {})


def test_pictures_of_a_solution_and_of_the_metrics(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_medformer()
    for spatial, grid in (((24, 24), 3), ((16, 16, 16), 2)):
        task = JigsawPuzzle(grid_2d=grid, grid_3d=grid, head_dim=8)
        Pretrainer(model, [task])
        for projection in ("slice", "mip"):
            fig = task.visualise(model, batch_of(torch.rand(2, 3, *spatial)), projection=projection)
            assert len(fig.axes) == 3 and fig.axes[1].get_title().startswith("solution (")
            fig.savefig(tmp_path / f"puzzle_{len(spatial)}d_{projection}.png")
            assert (tmp_path / f"puzzle_{len(spatial)}d_{projection}.png").stat().st_size > 1000
    history = [{"step": s, "puzzle/tiles_correct": s / 10, "puzzle/solved": s / 20} for s in range(1, 6)]
    assert plot_puzzle_metrics(history, tmp_path / "metrics.png").stat().st_size > 1000


def test_registered_for_configs() -> None:
    tasks, weights = build_tasks([{"task": "puzzle", "grid_2d": 4, "loss": "ce", "weight": 0.5}])
    assert isinstance(tasks[0], JigsawPuzzle) and tasks[0].grid(2) == 4 and weights == {"puzzle": 0.5}
    with pytest.raises(ConfigError, match="grid_2"):
        build_tasks([{"task": "puzzle", "grid_2": 4}])
    with pytest.raises(ConfigError, match="grid_2d must be in"):
        build_tasks([{"task": "puzzle", "grid_2d": 9}])
