"""Reports: sections in Markdown and self-contained HTML, the numbers of results.json, radiological
orientation of the slices, and `medformer evaluate` on a pre-training run folder."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image as PILImage

from medformer.cli import main
from medformer.evaluate.examples import Example, dice, overlay_rows
from medformer.evaluate.figures import axial, label_efficiency, objective_curves, segmentation_overlays
from medformer.evaluate.report import Image, Section, figure_png, results_table, write_report


def _png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_report_has_every_section_and_the_numbers_of_results_json(tmp_path: Path) -> None:
    results = {"run a": {"t/dice": 0.51234, "t/auc": float("nan")}, "run b": {"t/dice": 0.25}}
    sections = [
        Section("Configuration", items={"steps": 10, "lr": 0.001}),
        Section(
            "Pictures", text="two images", images=[Image("first", _png()), Image("second", _png((0, 0, 0)))]
        ),
        Section("Table", table=(["a", "b"], [["x", "1.5"]])),
    ]
    write_report(
        tmp_path, results, "my run", {"what": "a test"}, sections, extra={"more": 1}, results_position=1
    )
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["more"] == 1 and payload["summary"] == {"what": "a test"}
    assert payload["results"]["run a"]["t/dice"] == 0.51234

    md = (tmp_path / "report.md").read_text()
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles == ["Configuration", "Results", "Pictures", "Table"]  # results before section 1
    assert "| t | dice | 0.5123 | 0.2500 |" in md and "| t | auc | nan |  |" in md
    linked = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert [(tmp_path / p).read_bytes() for p in linked] == [_png(), _png((0, 0, 0))]

    page = (tmp_path / "report.html").read_text()
    assert [t for t in re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', page)] == titles
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert '<td class="num">0.5123</td>' in page and "<td>t</td>" in page


def test_results_table_follows_the_given_row_order() -> None:
    header, rows = results_table({"val": {"t/b": 1.0, "t/a": 2.0, "t/c": 3.0}}, order=["t/c", "t/x"])
    assert header == ["task", "metric", "val"]
    assert [r[1] for r in rows] == ["c", "a", "b"]


def test_axial_slices_are_radiological() -> None:
    volume = np.zeros((3, 4, 5))  # (z, y, x) in RAS
    volume[1, 3, 4] = 1.0  # most anterior row (y = 3) and the subject's far right (x = 4)
    view = axial(volume, 1)
    assert view.shape == (4, 5)
    assert view[0, 0] == 1.0  # anterior at the top, the subject's right on the viewer's left


def test_segmentation_overlay_and_label_efficiency_figures() -> None:
    truth = np.zeros((4, 6, 6), np.uint8)
    truth[2, 1:4, 1:4] = 2
    truth[2, 2, 2] = 3
    ex = Example("s1", np.random.rand(2, 4, 6, 6).astype(np.float32), ("T1w", "FLAIR"), (True, True), truth)
    assert ex.background()[0] == "FLAIR"
    pred = truth.copy()
    pred[2, 1, 1] = 0
    assert 0 < dice(pred, truth, (1, 2, 3)) < 1 and dice(truth, truth, (1, 2, 3)) == 1.0
    assert dice(np.zeros_like(truth), np.zeros_like(truth), (1,)) == 1.0
    rows = overlay_rows([ex], {"model": {"s1": pred}}, {"model": {"s1": "Dice 0.9"}})
    assert rows[0].slice_index == 2 and rows[0].notes == {"model": "Dice 0.9"}
    fig = segmentation_overlays(rows, ["background", "necrosis", "oedema", "enhancing"], "t")
    assert len(fig.axes) == 3 and fig.axes[2].get_title() == "model\nDice 0.9"
    results = {
        "pre-trained": {0.1: {"d": 0.4, "auc": float("nan")}, 1.0: {"d": 0.6}},
        "scratch": {0.1: {"d": 0.3}},
    }
    fig = label_efficiency(results, {"d": "Dice", "auc": "AUC"})
    dice_ax, auc_ax = fig.axes
    assert len(dice_ax.lines) == 2 and not auc_ax.lines  # NaN points are left out
    assert dice_ax.get_xlabel() == "training labels used" and dice_ax.get_ylabel() == "Dice"
    assert PILImage.open(io.BytesIO(figure_png(fig))).size[0] > 100


def test_objective_curves_one_panel_per_objective() -> None:
    history = [
        {"step": s, "loss": 3.0 / s, "loss/mae": 1.0 / s, "loss/puzzle": 2.0 / s, "lr": 0.1}
        for s in (1, 2, 3)
    ] + [{"step": 3, "split": "val", "val/loss": 9.0}]
    fig = objective_curves(history, "t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["total loss", "mae", "puzzle"]
    assert all(ax.get_xlabel() == "optimizer step" for ax in fig.axes if ax.get_visible())
    assert objective_curves([{"step": 1, "lr": 0.1}], "t") is None


def test_evaluate_writes_a_report_for_a_pretraining_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "pretrain"
    (run / "visuals").mkdir(parents=True)
    config = {
        "pretext": [{"task": "mae"}, {"task": "puzzle"}],
        "data": [{"path": "x.csv"}],
        "model": {"dim": 8},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": s, "loss": 1.0 / s, "loss/mae": 0.5 / s, "loss/puzzle": 0.5 / s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "visuals" / "puzzle_brain.png").write_bytes(_png())
    assert main(["evaluate", "--run", str(run)]) == 0
    payload = json.loads((run / "results.json").read_text())
    assert payload["results"] == {"last step": {"loss": 0.5, "loss/mae": 0.25, "loss/puzzle": 0.25}}
    md = (run / "report.md").read_text()
    assert re.findall(r"^## (.+)$", md, flags=re.M) == ["Results", "Loss curves", "Pretext tasks"]
    assert "jigsaw puzzle" in md and "report.html" in capsys.readouterr().out
