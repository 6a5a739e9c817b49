"""Batches that mix collections: each micro-batch holds studies of one collection (one shape).

Which collection the next batch comes from is drawn with probability

- ``proportional``: p_c ~ n_c (every study seen about once per epoch),
- ``uniform``: p_c = 1 / K (small collections are revisited more often),
- ``temperature``: p_c ~ n_c ** (1 / T) (between the two; T=1 is proportional),
- a mapping ``{name: share}``: p_c ~ share_c, fixed shares chosen by hand (e.g. less of a small set that
  overfits, more of one still learning when the others have converged),
- a mapping ``{name: [share of epoch 0, share of epoch 1, ...]}``: shares that change epoch by epoch (the
  last one holds for the rest of the run; a single number is a fixed share). A set that peaks early and
  then overfits can be drawn often at first and rarely later, while a slow one gets its turn. A share
  of 0 leaves a collection out of an epoch.

Distributed mode: all ranks draw the same global sequence (same seed) of batches of
``batch_size * world_size`` indices and rank r keeps ``indices[r::world_size]``. So every rank works on
the same collection at each step (the model runs the same heads, as DDP requires) and the ranks' shares
are disjoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from medformer.data.dataset import collate

Strategy = Literal["proportional", "uniform", "temperature"]
Shares = Mapping[str, float | Sequence[float]]


class MultiCollectionSampler:
    """Yields ``(collection_name, indices)`` per micro-batch; ``state_dict`` makes it resumable."""

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: int,
        strategy: Strategy | Shares = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
        shuffle: bool = True,
    ):
        if not sizes or any(n <= 0 for n in sizes.values()):
            raise ValueError(f"every collection needs at least one study, got sizes {dict(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.names = list(sizes)
        self.sizes = np.array([sizes[n] for n in self.names])
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle = shuffle
        self.schedule = self._schedule(strategy, temperature)  # (epochs, collections); last row holds
        # one epoch = as many global batches as the data fills (at least one per collection)
        self.num_batches = num_batches or max(int(self.sizes.sum()) // self.global_batch, len(self.names))
        self.epoch = 0
        self.start = 0  # batches of the current epoch already consumed (for exact resume)

    def _schedule(self, strategy: Strategy | Shares, temperature: float) -> np.ndarray:
        n = self.sizes.astype(np.float64)
        if isinstance(strategy, Mapping):
            shares = dict(strategy)
            if set(shares) != set(self.names):
                raise ValueError(f"sampling shares {shares} must name every collection {self.names}")
            rows = [np.atleast_1d(np.asarray(shares[name], dtype=np.float64)) for name in self.names]
            if any(r.ndim != 1 or r.size == 0 or not np.all(r >= 0) or not r.any() for r in rows):
                raise ValueError(f"sampling shares {shares} must be >= 0, and > 0 in some epoch for each one")
            epochs = max(r.size for r in rows)
            w = np.stack([np.pad(r, (0, epochs - r.size), mode="edge") for r in rows], 1)
            empty = np.flatnonzero(w.sum(1) == 0)
            if empty.size:
                raise ValueError(f"sampling shares {shares} leave epoch {int(empty[0])} with no collection")
        elif strategy == "proportional":
            w = n[None]
        elif strategy == "uniform":
            w = np.ones_like(n)[None]
        elif strategy == "temperature":
            w = (n ** (1.0 / temperature))[None]
        else:
            raise ValueError(f"unknown sampling strategy {strategy!r}")
        return w / w.sum(1, keepdims=True)

    def probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Each collection's probability of being drawn for a batch of ``epoch`` (default: the current)."""
        epoch = self.epoch if epoch is None else epoch
        return self.schedule[min(epoch, len(self.schedule) - 1)]

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def global_schedule(self) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (collection index, global indices), identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        which = rng.choice(len(self.names), size=self.num_batches, p=self.probabilities())
        pools = [self._permutation(rng, n) for n in self.sizes]
        cursor = [0] * len(self.names)
        out = []
        for c in which:
            n, take = int(self.sizes[c]), []
            while len(take) < self.global_batch:  # cycle (reshuffled) when a collection runs out
                if cursor[c] >= n:
                    pools[c], cursor[c] = self._permutation(rng, n), 0
                k = min(self.global_batch - len(take), n - cursor[c])
                take.extend(pools[c][cursor[c] : cursor[c] + k])
                cursor[c] += k
            out.append((int(c), np.asarray(take)))
        return out

    def _permutation(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        schedule = self.global_schedule()
        for i in range(self.start, len(schedule)):
            c, idx = schedule[i]
            self.start = i + 1
            yield self.names[c], idx[self.rank :: self.world_size].tolist()
        self.epoch, self.start = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.start, self.seed = int(state["epoch"]), int(state["start"]), int(state["seed"])


class _GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Maps (collection, local indices) to indices of the concatenated dataset, for DataLoader."""

    def __init__(self, sampler: MultiCollectionSampler, offsets: dict[str, int]):
        self.sampler, self.offsets = sampler, offsets

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for name, idx in self.sampler:
            yield [self.offsets[name] + i for i in idx]


def multi_collection_loader(
    datasets: Mapping[str, Dataset],
    sampler: MultiCollectionSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over several collections' datasets that yields one-collection batches."""
    if list(datasets) != sampler.names:
        raise ValueError(f"datasets {list(datasets)} and sampler collections {sampler.names} differ")
    offsets, total = {}, 0
    for name, ds in datasets.items():
        offsets[name] = total
        total += len(ds)
    return DataLoader(
        ConcatDataset(list(datasets.values())),
        batch_sampler=_GlobalBatchSampler(sampler, offsets),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
