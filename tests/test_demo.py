"""`medformer demo --quick` runs end to end on the built-in cohort."""

import json

from medformer.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cohort"]["subjects"] == 8
    assert summary["inspect"]["problems"] == []
    assert sum(summary["inspect"]["splits"].values()) == 8
    assert summary["preprocess"] == {**summary["preprocess"], "studies": 8, "skipped": 0}
    outputs = summary["model"]["outputs"]
    assert outputs["brain_phantom/tumour"] == [2, 4, 64, 64, 64]
    assert outputs["brain_phantom/enhancing"] == [2, 1]
    assert (tmp_path / "data" / "brain_phantom" / "manifest.csv").exists()
    assert "1/4" in capsys.readouterr().out
