"""benchmarks/byod.py's bookkeeping: one row per finished course run (no course is run here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_byod_benchmark():
    # byod.py imports its neighbour datasets.py as a top-level module, as it does when run as a script
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_byod", ROOT / "benchmarks" / "byod.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


byod = _load_byod_benchmark()

METRICS = {"test_accuracy": 0.85, "baseline_probe": 0.84, "baseline_majority": 0.69, "test_macro_f1": 0.80,
           "baseline_probe_macro_f1": 0.79, "baseline_majority_macro_f1": 0.41}
STRATEGY = {"strategy": "truncate", "recommended_by_guide": "head", "guide_rank": 2, "candidates": 6,
            "comparison": [{"strategy": "truncate", "score": 0.82, "se": 0.02, "se_vs_best": 0.0},
                           {"strategy": "head", "score": 0.60, "se": 0.02, "se_vs_best": 0.02}]}


def _run(folder: Path, metrics: dict, durations=(10.0, 20.0)) -> Path:
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "strategy.json").write_text(json.dumps(STRATEGY))
    (folder / "decision.json").write_text(json.dumps({"n_train": 100, "classes": ["a", "b"], "similarity": 0.4}))
    (folder / "final.json").write_text(json.dumps({"model": "fine-tuned"}))
    for i, duration in enumerate(durations, 1):
        notebook = {"metadata": {"papermill": {"duration": duration}}}
        (folder / f"0{i}_lesson.ipynb").write_text(json.dumps(notebook))
    return folder


def test_row_puts_each_baseline_beside_the_final_model_in_both_metrics(tmp_path):
    row = byod.row("toy", 0, _run(tmp_path / "run", METRICS), seconds=90)
    assert row["test_accuracy"] == 0.85 and row["probe"] == 0.84 and row["majority"] == 0.69
    assert row["final_minus_probe"] == pytest.approx(0.01)
    assert (row["macro_f1"], row["probe_macro_f1"], row["majority_macro_f1"]) == (0.80, 0.79, 0.41)
    assert row["guide_rank"] == "2/6" and row["guide_within_noise"] is False
    assert row["minutes"] == 1.5


def test_a_run_from_before_the_macro_f1_baselines_shows_none_not_a_number(tmp_path):
    older = {k: v for k, v in METRICS.items() if not k.endswith("_macro_f1") or k == "test_macro_f1"}
    row = byod.row("toy", 0, _run(tmp_path / "run", older), seconds=60)
    assert row["probe_macro_f1"] is None and row["majority_macro_f1"] is None


def test_notebook_seconds_sums_papermill_durations_and_names_an_unfinished_notebook(tmp_path):
    assert byod.notebook_seconds(_run(tmp_path / "done", METRICS)) == 30.0
    unfinished = _run(tmp_path / "unfinished", METRICS, durations=(10.0, None))
    with pytest.raises(SystemExit, match="02_lesson.ipynb did not finish"):
        byod.notebook_seconds(unfinished)
