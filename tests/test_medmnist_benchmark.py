"""benchmarks/medmnist.py --resume: an interrupted benchmark keeps its finished runs and only trains
the missing ones (training is replaced by a stand-in that records what it was asked to run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "medmnist.py"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))  # main() exports it; restored after the test
    spec = importlib.util.spec_from_file_location("medmnist_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.torch, "set_num_threads", lambda n: None)  # leave the suite's threads
    return module


def fake_run(calls: list, stop_after: int | None = None):
    def run(name, sets, arch, epochs, seed, out, quick):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # the benchmark is stopped mid-way
        calls.append((name, seed))
        return {s: {"seed": seed, "auc": 0.5 + seed / 10, "acc": 0.5, "seconds": 1.0} for s in sets}

    return run


def main(bench, monkeypatch, tmp_path: Path, *extra: str) -> None:
    argv = ["medmnist.py", "--seeds", "0", "1", "--out", str(tmp_path), "--work", str(tmp_path), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()


def test_resume_runs_only_what_is_missing(bench, monkeypatch, tmp_path):
    first: list = []
    monkeypatch.setattr(bench, "run", fake_run(first, stop_after=8))
    with pytest.raises(KeyboardInterrupt):
        main(bench, monkeypatch, tmp_path)
    saved = json.loads((tmp_path / "medmnist.json").read_text())
    assert not saved["complete"] and len(first) == 8  # seed 0 (7 runs) and one run of seed 1

    second: list = []
    monkeypatch.setattr(bench, "run", fake_run(second))
    main(bench, monkeypatch, tmp_path, "--resume")
    assert set(first).isdisjoint(second) and len(first) + len(second) == 14
    result = json.loads((tmp_path / "medmnist.json").read_text())
    assert result["complete"] and result["sittings"] == 2
    for per_set in result["results"].values():
        for r in per_set.values():
            assert sorted(run["seed"] for run in r["runs"]) == [0, 1]
            assert r["auc_mean"] == pytest.approx(0.55)
    assert "summed over 2 sittings" in (tmp_path / "medmnist.md").read_text()


def test_resume_refuses_other_settings(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "run", fake_run([]))
    main(bench, monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["medmnist.py", "--seeds", "0", "--out", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit, match=r"medmnist\.json.*other seeds"):
        bench.main()


def test_a_run_of_some_models_keeps_the_full_table(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "run", fake_run([]))
    main(bench, monkeypatch, tmp_path)
    full = (tmp_path / "medmnist.json").read_text()
    calls: list = []
    monkeypatch.setattr(bench, "run", fake_run(calls))
    main(bench, monkeypatch, tmp_path, "--runs", "multitask")
    assert calls == [("multitask", 0), ("multitask", 1)]
    assert (tmp_path / "medmnist.json").read_text() == full
    partial = json.loads((tmp_path / "medmnist_multitask.json").read_text())
    assert list(partial["results"]) == ["Medformer multitask"] and partial["complete"]
