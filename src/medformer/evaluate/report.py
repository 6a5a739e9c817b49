"""A run's results as files people read: ``results.json``, ``report.md`` and a self-contained
``report.html`` (every image embedded as PNG data, so the page can be mailed or archived alone).

A report is a title, a summary (key: value lines), the results table and any number of sections; a
`Section` holds a paragraph, key-value items, a table and images, each optional. `run_sections` finds
what a run folder holds (loss curves per objective from ``metrics.jsonl``, validation curves, the
figures the pretext tasks drew into ``visuals/``) so every command's report shows what exists.
The Markdown file refers to the same pictures, written as PNG files into ``report_files/``.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medformer.evaluate.figures import objective_curves

STYLE = (
    "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;"
    "padding:0 1em;color:#222;line-height:1.45}"
    "h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}"
    "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:4px 10px;"
    "text-align:left}th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%;height:auto}"
    "nav a{margin-right:1em}ul.items{list-style:none;padding-left:0}"
)


@dataclass
class Image:
    """A picture of the report: PNG bytes and the caption under it."""

    caption: str
    png: bytes


@dataclass
class Section:
    """One titled part of a report; empty parts are left out."""

    title: str
    text: str = ""
    items: Mapping[str, Any] = field(default_factory=dict)
    table: tuple[list[str], list[list[str]]] | None = None
    images: list[Image] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's ``metrics.jsonl`` (empty when the run has none)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: Sequence[Mapping[str, Any]], keep) -> dict[str, tuple[list[float], list[float]]]:
    """Finite numeric values of the keys ``keep(key)`` accepts, as (steps, values) per key."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for k, v in row.items():
            if keep(k) and isinstance(v, (int, float)) and math.isfinite(v):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(v)
    return series


def validation_curves(history: Sequence[Mapping[str, Any]]) -> Any | None:
    """Validation metrics over steps (one line each), or None without any evaluations."""
    from medformer.evaluate.figures import _figure

    rows = [r for r in history if r.get("split") == "val" and "step" in r]
    series = _series(rows, lambda k: k not in ("step", "split", "epoch"))
    if not series:
        return None
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=name.removeprefix("val/"), marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("validation metrics")
    fig.tight_layout()
    return fig


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def results_table(
    results: Mapping[str, Mapping[str, float]], order: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """``{column: {"<task>/<metric>": value}}`` -> header and rows (task, metric, one value per column;
    columns are splits for a fine-tuning run, runs for a comparison such as the demo's). Rows follow
    ``order`` where given, then the remaining keys sorted."""
    columns = list(results)
    present = {k for col in results.values() for k in col}
    keys = [k for k in order or () if k in present] + sorted(present - set(order or ()))
    rows = []
    for key in keys:
        task, _, metric = key.rpartition("/")
        rows.append([task, metric, *[_fmt(results[c].get(key, "")) for c in columns]])
    return ["task", "metric", *columns], rows


def run_sections(run: str | Path, history: Sequence[Mapping[str, Any]] | None = None) -> list[Section]:
    """What a run folder holds that a report shows: loss curves per objective and validation curves
    (``metrics.jsonl``), and the figures its pretext tasks drew (``visuals/*.png``)."""
    run = Path(run)
    history = read_metrics(run) if history is None else history
    sections = []
    fig = objective_curves(history, f"training loss per objective ({run.name})")
    if fig is not None:
        sections.append(
            Section("Loss curves", images=[Image("training loss of each objective", figure_png(fig))])
        )
    fig = validation_curves(history)
    if fig is not None:
        sections.append(
            Section("Validation", images=[Image("validation metrics during training", figure_png(fig))])
        )
    visuals = sorted((run / "visuals").glob("*.png")) if (run / "visuals").is_dir() else []
    if visuals:
        images = [Image(pretext_caption(p.stem), p.read_bytes()) for p in visuals]
        sections.append(Section("Pretext tasks", images=images))
    return sections


def pretext_caption(stem: str) -> str:
    """A caption for ``visuals/<task>_<collection>.png``."""
    task, _, collection = stem.partition("_")
    what = {
        "puzzle": "jigsaw puzzle: shuffled tiles, the model's solution and the truth",
        "mae": "masked autoencoder: original, masked input and reconstruction",
        "brainmvp": "BrainMVP: template- and cross-modal-filled views and their reconstructions",
        "contrastive": "contrastive views and their similarity",
        "crossdim": "2D slice vs 3D volume embeddings",
        "source": "source prediction",
    }.get(task, task)
    return f"{what} ({collection})" if collection else what


def write_report(
    run: str | Path,
    results: Mapping[str, Mapping[str, float]],
    title: str,
    summary: Mapping[str, Any] | None = None,
    sections: Sequence[Section] | None = None,
    extra: Mapping[str, Any] | None = None,
    results_note: str = "",
    results_position: int = 0,
    results_order: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``report.html`` into ``run``.

    ``sections`` default to what `run_sections` finds in the run folder; the results table (with
    ``results_note`` above it, rows in ``results_order``) goes before section number
    ``results_position``. ``extra`` is stored in ``results.json`` beside title, summary and results.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    sections = list(run_sections(run) if sections is None else sections)
    payload = {"title": title, "summary": dict(summary or {}), "results": results, **dict(extra or {})}
    (run / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    header, rows = results_table(results, results_order)
    table = Section("Results", text=results_note, table=(header, rows)) if rows else None
    parts = list(sections)
    if table:
        parts.insert(min(results_position, len(parts)), table)
    (run / "report.md").write_text(_markdown(run, title, summary or {}, parts))
    (run / "report.html").write_text(_html(title, summary or {}, parts))
    return {"json": run / "results.json", "md": run / "report.md", "html": run / "report.html"}


def _markdown(run: Path, title: str, summary: Mapping[str, Any], sections: Sequence[Section]) -> str:
    files = run / "report_files"
    if files.is_dir():
        for old in files.glob("*.png"):
            old.unlink()
    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in summary.items()]
    for section in sections:
        md += ["", f"## {section.title}", ""]
        if section.text:
            md += [section.text, ""]
        md += [f"- **{k}**: {_fmt(v)}" for k, v in section.items.items()]
        if section.items:
            md.append("")
        if section.table:
            header, rows = section.table
            md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            md += ["| " + " | ".join(r) + " |" for r in rows]
            md.append("")
        for i, image in enumerate(section.images):
            files.mkdir(exist_ok=True)
            name = f"{section.anchor}-{i + 1}.png"
            (files / name).write_bytes(image.png)
            md += [f"![{image.caption}](report_files/{name})", "", f"*{image.caption}*", ""]
    return "\n".join(md).rstrip() + "\n"


def _cell(text: str) -> str:
    """A table cell; numbers (and nan) are right-aligned."""
    try:
        float(text)
    except ValueError:
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="num">{html.escape(text)}</td>'


def _html(title: str, summary: Mapping[str, Any], sections: Sequence[Section]) -> str:
    import base64

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    if len(sections) > 2:
        body.append(
            "<nav>" + "".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections) + "</nav>"
        )
    if summary:
        body.append(
            "<ul>" + "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in summary.items())
        )
        body.append("</ul>")
    for section in sections:
        body.append(f'<h2 id="{section.anchor}">{esc(section.title)}</h2>')
        if section.text:
            body += [f"<p>{esc(p)}</p>" for p in section.text.split("\n\n")]
        if section.items:
            items = "".join(
                f"<li><b>{esc(str(k))}</b>: {esc(_fmt(v))}</li>" for k, v in section.items.items()
            )
            body.append(f'<ul class="items">{items}</ul>')
        if section.table:
            header, rows = section.table
            body.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows]
            body.append("</table>")
        for image in section.images:
            data = base64.b64encode(image.png).decode()
            body.append(
                f'<figure><img alt="{esc(image.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(image.caption)}</figcaption></figure>"
            )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


# ----------------------------------------------------------------------------------------------------
# Sections drawn from a model


def segmentation_section(
    model: Any, datasets: Sequence[Any], device: Any = "cpu", limit: int = 3
) -> Section | None:
    """Example slices of every segmentation task the model runs on ``datasets`` (e.g. the test
    splits): truth vs prediction over the image, axial, radiological view; None without such a task."""
    from medformer.evaluate.examples import dice, overlay_rows, predict_labels, segmentation_examples
    from medformer.evaluate.figures import segmentation_overlays
    from medformer.losses import task_spec

    images = []
    for ds in datasets:
        collection = ds.collection
        for key in model.tasks_for(collection.name, collection.ndim):
            spec = task_spec(model, key)
            if spec.kind != "segmentation" or collection.ndim != 3:
                continue
            examples = segmentation_examples(ds, spec.key, limit)
            if not examples:
                continue
            maps = predict_labels(model, ds, key, [e.id for e in examples], device)
            foreground = tuple(range(1, spec.num_classes))
            notes = {
                "prediction": {e.id: f"Dice {dice(maps[e.id], e.truth, foreground):.2f}" for e in examples}
            }
            classes = list(spec.classes or [str(c) for c in range(spec.num_classes)])
            fig = segmentation_overlays(
                overlay_rows(examples, {"prediction": maps}, notes), classes, f"{key}: truth vs prediction"
            )
            images.append(Image(f"{key}: {len(examples)} test studies, truth vs prediction", figure_png(fig)))
    if not images:
        return None
    text = (
        "Axial slices through the largest labelled cross-section, radiological view (A anterior at the top, "
        "the subject's right R on the left); the Dice over all foreground classes of each study."
    )
    return Section("Segmentation examples", text=text, images=images)


def templates_section(model: Any, where: Path) -> Section | None:
    """Mid-slices of a model's learned modality templates (BrainMVP), or None without any."""
    from medformer.models.templates import plot_templates

    templates = getattr(model, "templates", None)
    if templates is None or not templates.modalities:
        return None
    path = plot_templates(templates.arrays(), where / "templates.png")
    text = "One learnable volume per modality, filled into masked blocks during BrainMVP pre-training."
    return Section(
        "Learned templates", text=text, images=[Image("learned modality templates", path.read_bytes())]
    )


def write_pretrain_report(run: str | Path, output: str | Path | None = None) -> dict[str, dict[str, float]]:
    """The report of a pre-training run (no labels, so no test metrics): its configuration, the last
    logged value of each loss, loss curves per objective, the pretext tasks' figures and the
    templates. Returns ``{"last step": {loss key: value}}``."""
    import yaml

    from medformer.models import Medformer

    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    history = read_metrics(run)
    last = next((r for r in reversed(history) if not r.get("split")), {})
    losses = {k: float(v) for k, v in last.items() if k.startswith("loss") and isinstance(v, (int, float))}
    results = {"last step": losses} if losses else {}
    summary = {
        "pretext tasks": ", ".join(str(e.get("task")) for e in config.get("pretext", [])),
        "data": ", ".join(str(d.get("path")) for d in config.get("data", [])),
        "model": config.get("model", {}),
        "steps": last.get("step", ""),
    }
    sections = run_sections(run, history)
    if (run / "model" / "config.json").exists():
        section = templates_section(Medformer.from_pretrained(run / "model"), Path(output or run))
        if section is not None:
            sections.append(section)
    write_report(output or run, results, f"medformer pre-training: {run.name}", summary, sections)
    return results
