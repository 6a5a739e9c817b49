"""The speed suite runs end to end (small sizes) and writes what its Markdown promises; no timing asserts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_growth_section_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--sections",
            "growth",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "speed_quick.json").read_text())
    growth = result["sections"]["growth"]
    assert [r["size"] for r in growth["by_size"]] == [16, 24, 32]
    assert [r["modalities"] for r in growth["by_modalities"]] == [1, 2, 3, 4]
    assert all(r["step_s"] > 0 and r["peak_mem_mib"] >= 0 for r in growth["by_size"])
    assert result["sections"]["limit"]["fp32_gflops"] > 0
    md = (tmp_path / "speed_quick.md").read_text()
    assert "## Growth" in md and "time ~ voxels^" in md
    assert (tmp_path / "speed_quick_growth.png").stat().st_size > 0


def test_power_law_exponent_is_recovered() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from speed import exponent
    finally:
        sys.path.remove(str(SCRIPT.parent))
    x = [1.0, 2.0, 4.0, 8.0]
    assert exponent(x, [3 * v**1.5 for v in x]) == pytest.approx(1.5)
