"""`medformer demo --quick` end to end: cohort, pre-training, fine-tuning from the pre-trained model and
from scratch at 10% and 100% of the labels, test scores and the report, whose numbers must be those of
results.json; `medformer evaluate` rebuilds the same report from the run folder."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from medformer.cli import main
from medformer.demo import available_task

SECTIONS = [
    "Configuration",
    "Data",
    "Timings",
    "Results",
    "Label efficiency",
    "Segmentation examples",
    "Pre-training loss curves",
    "Fine-tuning curves",
    "Reconstructions",
    "Learned templates",
]
RUNS = ["pre-trained, 10% labels", "scratch, 10% labels", "pre-trained, 100% labels", "scratch, 100% labels"]


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _markdown_table(md: str) -> dict[tuple[str, str], list[str]]:
    """The Results section's rows: (task, metric) -> the cells of the four runs."""
    section = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header, *body = [[c.strip() for c in r] for r in rows]
    assert header == ["task", "metric", *RUNS]
    return {(r[0], r[1]): r[2:] for r in body}


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys, one_thread) -> None:
    assert main(["demo", "--quick", "--output", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for stage in range(1, 7):  # progress: every stage announces itself
        assert f"== {stage}/6 " in out
    state = json.loads((tmp_path / "demo.json").read_text())
    assert state["cohort"]["subjects"] == 12 and state["cohort"]["skipped"] == 0
    assert state["inspect"]["problems"] == []
    assert [e["task"] for e in state["pretext"]] == [
        t for t in ("puzzle", "brainmvp", "mae") if available_task(t) is None
    ]
    assert (tmp_path / "pretrain" / "model" / "model.safetensors").exists()
    assert list(state["runs"]) == RUNS
    for info in state["runs"].values():  # one segmentation and one classification run each
        assert set(info["folders"]) == {"tumour", "enhancing"}
        for folder in info["folders"].values():
            assert (tmp_path / folder / "results.json").exists() and (
                tmp_path / folder / "report.html"
            ).exists()

    payload = json.loads((tmp_path / "results.json").read_text())
    results = payload["results"]
    assert list(results) == RUNS
    for row in results.values():
        for key in ("tumour/dice_mean", "tumour/dice_WT", "tumour/dice_oedema", "enhancing/auc"):
            assert key in row
        assert 0.0 <= row["tumour/dice_mean"] <= 1.0
    # the per-class Dice comes from each fine-tuning run's own results.json
    own = json.loads((tmp_path / "finetune" / "tumour_scratch_10" / "results.json").read_text())
    assert (
        results["scratch, 10% labels"]["tumour/dice_mean"]
        == own["results"]["test"]["brain_phantom/tumour/dice_mean"]
    )

    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    expected = SECTIONS + (["Puzzle solutions"] if _has_puzzle(state) else [])
    md_titles = re.findall(r"^## (.+)$", md, flags=re.M)
    html_titles = re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', page)
    assert set(expected) <= set(md_titles) and md_titles == html_titles
    # every number of the results table is the one in results.json, in both files
    table = _markdown_table(md)
    assert len(table) == len(results[RUNS[0]])
    for (task, metric), cells in table.items():
        assert cells == [_fmt(results[run][f"{task}/{metric}"]) for run in RUNS]
        for cell in cells:
            assert f">{cell}</td>" in page
    # the headline compares the 10%-label runs with the same numbers
    line = payload["summary"]["tumour Dice, 10% labels"]
    pre, scratch = (results[r]["tumour/dice_mean"] for r in RUNS[:2])
    assert line.startswith(f"pre-trained {pre:.4f} vs scratch {scratch:.4f}")
    assert payload["headline"]["10%"]["pretraining_helps"] == (pre > scratch)
    # self-contained page: every image embedded; the Markdown's images exist
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) >= 8 and all(s.startswith("data:image/png;base64,") for s in sources)
    for path in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (tmp_path / path).stat().st_size > 1000

    # `medformer evaluate` on the demo folder rebuilds the report with the same numbers
    assert main(["evaluate", "--run", str(tmp_path), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())["results"]
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


def _has_puzzle(state: dict) -> bool:
    return any(e["task"] == "puzzle" for e in state["pretext"])
