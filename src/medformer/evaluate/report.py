"""A run's results as files people read: ``results.json``, ``report.md`` and a self-contained
``report.html`` (plots embedded as PNG data), with loss curves drawn from ``metrics.jsonl``."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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


def _plot(series: dict, ylabel: str, title: str, log: bool = False, **style: Any):
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=name, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def loss_curves(history: Sequence[Mapping[str, Any]]):
    """Training losses per objective/task over steps (one line each), or None without any."""
    rows = [r for r in history if "step" in r and not r.get("split")]
    series = _series(rows, lambda k: k == "loss" or k.startswith("loss/"))
    return _plot(series, "training loss", "Training loss", log=True, lw=1.2) if series else None


def validation_curves(history: Sequence[Mapping[str, Any]]):
    """Validation metrics over steps, or None without any evaluations."""
    rows = [r for r in history if r.get("split") == "val" and "step" in r]
    series = _series(rows, lambda k: k not in ("step", "split", "epoch"))
    return _plot(series, "validation metric", "Validation", marker="o", ms=3) if series else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def results_table(results: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[str]]]:
    """``{split: {"<task>/<metric>": value}}`` -> header and rows (task, metric, one column per split)."""
    splits = list(results)
    keys = sorted({k for split in results.values() for k in split})
    rows = []
    for key in keys:
        task, _, metric = key.rpartition("/")
        rows.append([task, metric, *[_fmt(results[s].get(key, "")) for s in splits]])
    return ["task", "metric", *splits], rows


def write_report(
    run: str | Path,
    results: Mapping[str, Mapping[str, float]],
    title: str,
    summary: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``report.html`` into the run folder."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    history = read_metrics(run)
    payload = {"title": title, "summary": dict(summary or {}), "results": results}
    (run / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    header, rows = results_table(results)
    figures = {
        name: fig
        for name, fig in (("loss", loss_curves(history)), ("val", validation_curves(history)))
        if fig
    }
    images = {name: _png(fig) for name, fig in figures.items()}
    for name, data in images.items():
        (run / f"{name}_curves.png").write_bytes(base64.b64decode(data))

    md = [f"# {title}", ""]
    for k, v in (summary or {}).items():
        md.append(f"- **{k}**: {v}")
    md += ["", "## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    for name in images:
        md += ["", f"![{name} curves]({name}_curves.png)"]
    (run / "report.md").write_text("\n".join(md) + "\n")

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    if summary:
        body.append(
            "<ul>" + "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in summary.items())
        )
        body.append("</ul>")
    body.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    body.append("</table>")
    for name, data in images.items():
        body.append(f"<h2>{'Training loss' if name == 'loss' else 'Validation'}</h2>")
        body.append(f'<img alt="{name} curves" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    (run / "report.html").write_text(page)
    return {"json": run / "results.json", "md": run / "report.md", "html": run / "report.html"}
