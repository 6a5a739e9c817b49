"""The pictures of a run's report: loss curves per objective, label efficiency, segmentation overlays.

Every figure is a `matplotlib.figure.Figure` built without pyplot (no GUI backend, nothing left open),
so reports draw in headless jobs. Slices of 3D volumes are shown the way radiologists read them:
axial, anterior at the top and the subject's right on the viewer's left, with the orientation letters
drawn on the image. Volumes are ``(z, y, x)`` arrays in RAS, the order medformer's preprocessing yields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

# Okabe-Ito colours (readable with colour-vision deficiencies), one per foreground class in order
CLASS_COLOURS = ("#D55E00", "#009E73", "#F0E442", "#56B4E9", "#CC79A7", "#0072B2", "#E69F00")
LINE_STYLES = {"pre-trained": dict(ls="-", marker="o"), "scratch": dict(ls="--", marker="s")}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def axial(volume: np.ndarray, index: int) -> np.ndarray:
    """Axial slice ``index`` of a ``(z, y, x)`` RAS volume in radiological view: rows run anterior to
    posterior, columns from the subject's right to its left."""
    return np.asarray(volume)[index][::-1, ::-1]


def orientation_letters(ax: Any, colour: str = "#ffd54f") -> None:
    """Mark an axial panel with A (top), P (bottom), R (left) and L (right)."""
    style = dict(color=colour, fontsize=7, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.98, "A", ha="center", va="top", **style)
    ax.text(0.5, 0.02, "P", ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, "R", ha="left", va="center", **style)
    ax.text(0.98, 0.5, "L", ha="right", va="center", **style)


# ----------------------------------------------------------------------------------------------------
# Curves


def _steps(history: Sequence[Mapping[str, Any]], key: str, split: str | None = None) -> tuple[list, list]:
    points = [
        (r["step"], r[key])
        for r in history
        if r.get("split") == split and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def objective_curves(history: Sequence[Mapping[str, Any]], title: str) -> Figure | None:
    """One panel per training objective (``loss`` and every ``loss/<objective>``) against the step;
    None when the history has no losses."""
    keys = sorted(
        {k for r in history if not r.get("split") for k in r if k == "loss" or k.startswith("loss/")}
    )
    keys = [k for k in keys if _steps(history, k)[0]]
    if not keys:
        return None
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    fig = _figure(3.3 * cols, 2.7 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        xs, ys = _steps(history, key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1.3, color="#0072B2")
        ax.set_title("total loss" if key == "loss" else key.removeprefix("loss/"), fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _step_panel(ax: Any, title: str, ylabel: str) -> None:
    """Titles, labels, grid and legend of a panel of values against the optimizer step."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def grouped_curves(
    history: Sequence[Mapping[str, Any]],
    panels: Mapping[str, tuple[str, Mapping[str, str]]],
    title: str,
) -> Figure | None:
    """Logged training values in panels: ``{panel title: (y label, {metrics.jsonl key: line label})}``;
    panels (and lines) without data are left out, None when nothing is left."""
    found = {
        name: (ylabel, {k: label for k, label in keys.items() if _steps(history, k)[0]})
        for name, (ylabel, keys) in panels.items()
    }
    found = {name: entry for name, entry in found.items() if entry[1]}
    if not found:
        return None
    fig = _figure(3.8 * len(found), 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(found), squeeze=False)).ravel()
    for ax, (name, (ylabel, keys)) in zip(axes, found.items()):
        for i, (key, label) in enumerate(keys.items()):
            xs, ys = _steps(history, key)
            ax.plot(xs, ys, lw=1.3, label=label, color=("#0072B2", "#D55E00", "#009E73", "#CC79A7")[i % 4])
        _step_panel(ax, name, ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run_curves(
    panels: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], title: str, key: str = "loss"
) -> Figure | None:
    """Several runs side by side: ``{panel title: {run name: metrics history}}``, the training ``key``
    of each run against the step (runs named "scratch ..." dashed); None without any data."""
    panels = {name: runs for name, runs in panels.items() if any(_steps(h, key)[0] for h in runs.values())}
    if not panels:
        return None
    fig = _figure(4.6 * len(panels), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, (name, runs) in zip(axes, panels.items()):
        for i, (run, history) in enumerate(runs.items()):
            xs, ys = _steps(history, key)
            style = LINE_STYLES["scratch" if run.startswith("scratch") else "pre-trained"]
            colour = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")[i // 2 % 4]
            ax.plot(xs, ys, color=colour, ls=style["ls"], lw=1.3, label=run)
        _step_panel(ax, name, f"training {key}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def label_efficiency(
    results: Mapping[str, Mapping[float, Mapping[str, float]]],
    metrics: Mapping[str, str],
    title: str = "label efficiency",
) -> Figure:
    """Test metric against the fraction of training labels, one line per initialisation.

    ``results``: initialisation (e.g. "pre-trained", "scratch") -> label fraction -> metrics;
    ``metrics``: metric key -> axis label, one panel each.
    """
    fig = _figure(3.6 * len(metrics), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    fractions = sorted({f for per in results.values() for f in per})
    for ax, (key, label) in zip(axes, metrics.items()):
        for i, (init, per_fraction) in enumerate(results.items()):
            xs = [f for f in fractions if math.isfinite(per_fraction.get(f, {}).get(key, math.nan))]
            ys = [per_fraction[f][key] for f in xs]
            if not xs:
                continue
            style = LINE_STYLES.get(init, dict(ls="-", marker="^"))
            colour = ("#0072B2", "#D55E00", "#009E73")[i % 3]
            ax.plot([100 * x for x in xs], ys, color=colour, label=init, ms=6, lw=1.6, **style)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.3f}", (100 * x, y), textcoords="offset points", xytext=(4, 5), fontsize=7,
                            color=colour)  # fmt: skip
        if not ax.lines:
            ax.text(0.5, 0.5, "not defined on this test split", ha="center", va="center", fontsize=8,
                    color="#555", transform=ax.transAxes)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
        ax.set_xlabel("training labels used", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.08 * (hi - lo))  # room for the value labels
    drawn = [ax for ax in axes if ax.lines]
    if drawn:
        drawn[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Images and segmentation overlays


def study_figure(
    images: Mapping[str, np.ndarray | None], label: np.ndarray | None, classes: Sequence[str], title: str
) -> Figure:
    """Every modality of one study (None: missing) and its label map over the first present one, at
    the axial slice with the most foreground."""
    present = [a for a in images.values() if a is not None]
    area = (np.asarray(label) > 0).sum((1, 2)) if label is not None else None
    k = int(area.argmax()) if area is not None and area.any() else present[0].shape[0] // 2
    cols = len(images) + (label is not None)
    fig = _figure(2.3 * cols, 2.9)
    axes = np.atleast_1d(fig.subplots(1, cols))
    fg = list(classes[1:])
    for ax, (name, volume) in zip(
        axes, [*images.items(), *([("label", present[0])] if label is not None else [])]
    ):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
        if volume is None:
            ax.set_facecolor("#222")
            ax.text(0.5, 0.5, "missing", color="white", ha="center", va="center", transform=ax.transAxes)
            continue
        img = axial(volume, k)
        inside = img[img > 0]
        ax.imshow(img, cmap="gray", vmin=0, vmax=float(np.percentile(inside, 99.5)) if inside.size else 1.0)
        if name == "label" and label is not None:
            overlay = np.ma.masked_equal(axial(label, k), 0)
            cmap = ListedColormap(list(CLASS_COLOURS[: len(fg)]))
            ax.imshow(overlay, cmap=cmap, vmin=0.5, vmax=len(fg) + 0.5, alpha=0.6, interpolation="nearest")
        orientation_letters(ax)
    if label is not None and fg:
        fig.legend(
            handles=[Patch(color=CLASS_COLOURS[i], label=n) for i, n in enumerate(fg)],
            loc="lower center",
            ncol=len(fg),
            fontsize=8,
            frameon=False,
        )
    fig.suptitle(f"{title}, axial slice {k}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if label is not None else 0, 1, 1))
    return fig


@dataclass
class OverlayRow:
    """One study for `segmentation_overlays`: a background volume, the true label map and predictions
    (all ``(z, y, x)``), drawn at the axial slice with the most tumour in the truth."""

    study: str
    image: np.ndarray
    image_name: str
    truth: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # prediction name -> text under its title

    @property
    def slice_index(self) -> int:
        area = (np.asarray(self.truth) > 0).sum((1, 2))
        return int(area.argmax()) if area.any() else self.truth.shape[0] // 2


def segmentation_overlays(rows: Sequence[OverlayRow], classes: Sequence[str], title: str) -> Figure:
    """A grid: one row per study; the image, the truth and each prediction over it (axial slices,
    radiological view, one colour per class)."""
    names = list(rows[0].predictions)
    cols = 2 + len(names)
    fig = _figure(2.3 * cols, 2.5 * len(rows) + 0.9)
    axes = np.asarray(fig.subplots(len(rows), cols, squeeze=False))
    fg = list(classes[1:]) if len(classes) > 1 else ["foreground"]
    cmap = ListedColormap(list(CLASS_COLOURS[: len(fg)]))
    for r, row in enumerate(rows):
        k = row.slice_index
        background = axial(row.image, k)
        inside = background[background > 0]
        hi = float(np.percentile(inside, 99.5)) if inside.size else float(background.max() or 1.0)
        panels = {row.image_name: None, "truth": row.truth, **row.predictions}
        for c, (name, labels) in enumerate(panels.items()):
            ax = axes[r, c]
            ax.imshow(background, cmap="gray", vmin=0, vmax=hi, interpolation="nearest")
            if labels is not None:
                overlay = np.ma.masked_equal(axial(labels, k), 0)
                ax.imshow(
                    overlay, cmap=cmap, vmin=0.5, vmax=len(fg) + 0.5, alpha=0.6, interpolation="nearest"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            orientation_letters(ax)
            heading = f"{row.study}: {name}, axial {k}" if c == 0 else name
            note = row.notes.get(name, "")
            ax.set_title(heading + (f"\n{note}" if note else ""), fontsize=8)
    fig.legend(
        handles=[Patch(color=CLASS_COLOURS[i], label=n) for i, n in enumerate(fg)],
        loc="lower center",
        ncol=len(fg),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


# ----------------------------------------------------------------------------------------------------
# Jigsaw puzzles


def _slab_mosaic(tiles: np.ndarray, grid: int, slab: int) -> np.ndarray:
    """The ``grid x grid`` tiles of axial slab ``slab`` of a 3D puzzle (tiles ``(N, d, h, w)`` in cell
    order, row-major over (z, y, x)) as one picture in radiological view, 1-pixel NaN seams."""
    _, d, h, w = tiles.shape
    out = np.full((grid * (h + 1) - 1, grid * (w + 1) - 1), np.nan)
    for y in range(grid):
        for x in range(grid):
            tile = tiles[slab * grid * grid + y * grid + x]
            r, c = grid - 1 - y, grid - 1 - x  # anterior cells at the top, the subject's right on the left
            out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = axial(tile, d // 2)
    return out


def puzzle_figure(
    shuffled: np.ndarray, solution: np.ndarray, truth: np.ndarray, grid: int, title: str
) -> Figure:
    """A 3D jigsaw puzzle, one row per stage: the tiles as shuffled, as the model placed them (wrong
    cells framed red) and the truth; one column per axial slab, inferior to superior. Tiles are
    ``(N, d, h, w)`` arrays in cell order (row-major over z, y, x); each shows its middle axial slice."""
    from matplotlib.patches import Rectangle

    panels = {"shuffled": shuffled, "model's solution": solution, "truth": truth}
    fig = _figure(2.6 * grid, 2.7 * len(panels) + 0.5)
    axes = np.asarray(fig.subplots(len(panels), grid, squeeze=False))
    finite = np.concatenate([p.ravel() for p in panels.values()])
    lo, hi = float(np.nanmin(finite)), float(np.nanmax(finite))
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    _, _, h, w = truth.shape
    wrong = ~np.isclose(solution, truth).reshape(len(truth), -1).all(1)
    names = ["inferior", *(["middle"] * (grid - 2)), "superior"] if grid > 1 else ["slab"]
    for r, (stage, tiles) in enumerate(panels.items()):
        for z in range(grid):
            ax = axes[r, z]
            ax.imshow(_slab_mosaic(tiles, grid, z), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            orientation_letters(ax)
            ax.set_title(f"{stage}: {names[z]} slab", fontsize=8)
            if stage != "model's solution":
                continue
            for y in range(grid):
                for x in range(grid):
                    if wrong[z * grid * grid + y * grid + x]:
                        row, col = grid - 1 - y, grid - 1 - x
                        ax.add_patch(Rectangle((col * (w + 1) - 0.5, row * (h + 1) - 0.5), w, h, fill=False,
                                               edgecolor="red", lw=1.5))  # fmt: skip
    fig.suptitle(f"{title}: {int((~wrong).sum())}/{len(wrong)} cells right", fontsize=10)
    fig.tight_layout()
    return fig
