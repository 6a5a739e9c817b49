"""Domain shifts for the benchmarks: each does what its table row says, deterministically, and only to
the splits asked for; the second scanner changes the acquisition and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from _engine_helpers import collection
from medformer.data.phantom import SCANNER_15T, PhantomConfig
from medformer.data.shifts import DEFAULT_STRENGTH, Shift, second_scanner, shift_collection


def image(seed: int = 0, shape: tuple[int, ...] = (1, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(DEFAULT_STRENGTH))
def test_every_shift_keeps_shape_and_range_and_changes_the_image(kind):
    x = image()
    y = Shift(kind)(x, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    assert np.abs(y - x).mean() > 0.01


def test_shifts_do_what_the_table_says():
    x = image()
    assert np.allclose(Shift("intensity", 0.5)(x), 0.5 * x + 0.25)
    assert np.allclose(Shift("contrast", 2.0)(x), x**2)
    assert np.allclose(Shift("resolution", 1.0)(x), x, atol=1e-6)  # factor 1: nothing lost
    assert Shift("blur", 1.0)(x).std() < 0.6 * x.std()  # white noise loses most of its variance
    noisy = Shift("noise", 0.1)(np.full((1, 64, 64), 0.5, np.float32), np.random.default_rng(0))
    assert abs(noisy.std() - 0.1) < 0.01
    volume = image(shape=(1, 8, 8, 8))
    assert Shift("resolution", 2.0)(volume).shape == volume.shape
    with pytest.raises(ValueError, match="unknown shift"):
        Shift("rotate")


def test_shift_collection_is_deterministic_and_touches_only_the_asked_splits():
    col = collection("c", 2, 12)
    splits = ["train", "val", "test"] * 4
    for s, split in zip(col.studies, splits):
        s.split = split
    a = shift_collection(col, Shift("noise"), seed=3, name="shifted")
    b = shift_collection(col, Shift("noise"), seed=3)
    assert a.name == "shifted" and b.name == "c"
    for orig, sa, sb in zip(col.studies, a.studies, b.studies):
        assert np.array_equal(sa.images["T1"], sb.images["T1"])
        assert (orig.split != "test") == np.array_equal(sa.images["T1"], orig.images["T1"])
    tests = [s.images["T1"] for s in a.studies if s.split == "test"]
    assert not np.array_equal(tests[0] - col.studies[2].images["T1"], tests[1] - col.studies[5].images["T1"])


def test_second_scanner_changes_only_the_acquisition():
    config = PhantomConfig(n_subjects=3, seed=4)
    other = second_scanner(config)
    assert other.scanner == SCANNER_15T and other.scanner.t1w != config.scanner.t1w
    assert other.scanner.flair.ti != config.scanner.flair.ti and other.scanner.noise > config.scanner.noise
    assert (other.n_subjects, other.seed, other.shape) == (config.n_subjects, config.seed, config.shape)
