"""Label-fraction subsets are stratified, seeded and nested in the labelled studies."""

from collections import Counter

import numpy as np
import pytest

from medformer.data.study import Study, TaskSpec
from medformer.data.subsets import label_subset

TASK = TaskSpec("y", "multiclass", num_classes=3)


def _studies(counts=(600, 300, 100)):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(0).shuffle(labels)
    return [
        Study(f"s{i}", images={"x": np.zeros((2, 2))}, labels={"y": int(y)}) for i, y in enumerate(labels)
    ]


def test_fraction_keeps_class_proportions():
    sub = label_subset(_studies(), TASK, 0.1, seed=1)
    assert Counter(s.labels["y"] for s in sub) == {0: 60, 1: 30, 2: 10}


def test_tiny_fraction_keeps_every_class_and_seeds_differ():
    a = label_subset(_studies(), TASK, 0.001, seed=0)
    b = label_subset(_studies(), TASK, 0.001, seed=1)
    assert {s.labels["y"] for s in a} == {0, 1, 2}
    assert [s.id for s in a] != [s.id for s in b]
    assert [s.id for s in a] == [s.id for s in label_subset(_studies(), TASK, 0.001, seed=0)]


def test_unlabelled_studies_are_never_chosen_and_full_fraction_keeps_all_labelled():
    studies = _studies((10, 10, 10))
    studies[0].labels.pop("y")
    assert len(label_subset(studies, TASK, 1.0)) == 29
    assert all("y" in s.labels for s in label_subset(studies, TASK, 0.5))


def test_bad_fraction():
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(_studies(), TASK, 0.0)
