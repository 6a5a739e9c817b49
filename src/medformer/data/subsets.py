"""Label-efficiency subsets: a stratified fraction of a split's labelled studies.

Fine-tuning "with 10% of the labels" keeps 10% of the training studies of each class (at least one
per class), drawn with a seed, so repetitions with different seeds give different subsets and a
seed always gives the same one. Tasks without classes (multilabel, regression, segmentation) draw a
plain random subset.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from medformer.data.study import Study, TaskSpec


def label_subset(studies: list[Study], task: TaskSpec, fraction: float, seed: int = 0) -> list[Study]:
    """The studies (in their original order) whose labels a `fraction` run may use."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labelled = [i for i, s in enumerate(studies) if s.labels.get(task.key) is not None]
    if fraction == 1:
        return [studies[i] for i in labelled]
    rng = np.random.default_rng(seed)
    groups: dict[object, list[int]] = defaultdict(list)
    stratify = task.kind in ("binary", "multiclass", "ordinal")
    for i in labelled:
        key = int(np.asarray(studies[i].labels[task.key]).reshape(-1)[0]) if stratify else 0
        groups[key].append(i)
    keep: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        n = max(1, round(fraction * len(members)))
        keep.extend(rng.choice(members, size=n, replace=False).tolist())
    return [studies[i] for i in sorted(keep)]
