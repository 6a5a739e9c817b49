"""A report renders in a real browser (headless Chromium): every image decodes, nothing overflows the
window, the screenshot shows the page. Skipped where no browser is installed; run with
``pip install playwright`` (and a Chromium) for the image-by-image checks."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medformer.evaluate.figures import label_efficiency
from medformer.evaluate.report import Image, Section, figure_png, write_report

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "report_browser.py"
spec = importlib.util.spec_from_file_location("report_browser", SCRIPT)
browser = importlib.util.module_from_spec(spec)
spec.loader.exec_module(browser)

pytestmark = pytest.mark.skipif(not browser.available(), reason="no headless Chromium here")


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    fig = label_efficiency({"pre-trained": {0.1: {"d": 0.4}, 1.0: {"d": 0.7}}}, {"d": "Dice"})
    sections = [Section("Label efficiency", images=[Image("curve", figure_png(fig))])]
    results = {
        "pre-trained, 10% labels": {"tumour/dice_mean": 0.4},
        "scratch, 10% labels": {"tumour/dice_mean": 0.3},
    }
    paths = write_report(tmp_path, results, "browser check", {"what": "test"}, sections)
    facts = browser.screenshot(paths["html"], tmp_path / "shot.png", width=1000)
    shot = np.asarray(PILImage.open(tmp_path / "shot.png").convert("L"))
    drawn_rows = int((shot < 200).any(axis=1).sum())
    assert shot.shape[1] >= 1000 and drawn_rows > 300  # text, table and figure drawn: not a blank page
    if facts["browser"] == "playwright":  # the page's own account of itself
        assert facts["images"] == 1 and facts["broken"] == [] and facts["external"] == []
        assert not facts["overflow"]
        assert facts["sections"] == ["Results", "Label efficiency"]
    assert PILImage.open(io.BytesIO((tmp_path / "shot.png").read_bytes())).format == "PNG"
