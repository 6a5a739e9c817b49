"""Small matplotlib figures the pretext tasks draw of themselves (written as PNG into the run folder).

Figures are built with `matplotlib.figure.Figure` directly (no pyplot, no GUI backend), so drawing works
in a headless training job and never leaks open windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor


def middle_slice(image: Tensor) -> np.ndarray:
    """A 2D picture of one image ``(*spatial)``: itself in 2D; in 3D the middle slice of the first axis
    (axial for ``(z, y, x)`` RAS volumes) in radiological view: anterior at the top, the subject's right
    on the viewer's left."""
    x = image.detach().float().cpu()
    if x.dim() == 3:
        x = x[x.shape[0] // 2].flip(0, 1)
    return x.numpy()


def image_grid(columns: Mapping[str, Tensor], title: str, max_rows: int = 4, modality: int = 0) -> Any:
    """One row per sample, one column per entry of ``columns`` (each ``(B, M, *spatial)``), one modality;
    NaN pixels are drawn blue."""
    import matplotlib
    from matplotlib.figure import Figure

    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#3b6ea8")  # NaN (e.g. a hidden patch): blue
    names = list(columns)
    rows = min(max_rows, next(iter(columns.values())).shape[0])
    fig = Figure(figsize=(2.2 * len(names), 2.2 * rows + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(rows, len(names), squeeze=False))
    for r in range(rows):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(middle_slice(columns[name][r, modality]), cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def similarity_figure(views: Mapping[str, Tensor], similarity: Tensor, title: str, max_rows: int = 4) -> Any:
    """Two views of a few samples beside the cosine-similarity matrix of their embeddings (the diagonal,
    each sample with its own other view, should stand out)."""
    from matplotlib.figure import Figure

    names = list(views)
    rows = min(max_rows, next(iter(views.values())).shape[0])
    fig = Figure(figsize=(2.0 * len(names) + 4.2, max(2.0 * rows, 3.5)), layout="constrained")
    grid = fig.add_gridspec(rows, len(names) + 2)
    for r in range(rows):
        for c, name in enumerate(names):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(middle_slice(views[name][r, 0]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    ax = fig.add_subplot(grid[:, len(names) :])
    im = ax.imshow(similarity.detach().float().cpu().numpy(), cmap="viridis", vmin=-1, vmax=1)
    ax.set_xlabel(names[1] if len(names) > 1 else "")
    ax.set_ylabel(names[0])
    ax.set_title("cosine similarity", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def loss_curves(history: Sequence[Mapping[str, Any]], keys: Sequence[str], title: str) -> Any:
    """One panel per key (e.g. ``loss/mae``): its logged values against the step."""
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(k in r for r in history)]
    fig = Figure(figsize=(4.0 * max(len(keys), 1), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(keys), 1), squeeze=False)[0])
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in history if key in r and "split" not in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig
