"""benchmarks/elpv.py's bookkeeping: averaging seeds only within one recipe (no training here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_elpv_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_elpv", ROOT / "benchmarks" / "elpv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


elpv = _load_elpv_benchmark()

RESULT = {"task": "binary", "backbone": "efficientnet_lite0", "strategy": "full", "n": 2, "image_size": 224,
          "epochs": 15, "lr": 1e-3, "augment": "cells", "label_smoothing": 0.1, "layer_decay": 0.8,
          "batch_size": 32, "ema_decay": None, "class_weights": None, "from_probe": False,
          "test_accuracy": 0.8, "tta_test_accuracy": 0.81, "test_balanced_accuracy": 0.7, "test_macro_f1": 0.75,
          "train_seconds": 100.0}


def _write(folder: Path, **changes) -> Path:
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({**RESULT, **changes}))
    return folder


def test_summarize_averages_the_seeds_of_one_recipe(tmp_path, capsys):
    runs = [_write(tmp_path / "a", seed=0, test_accuracy=0.8), _write(tmp_path / "b", seed=1, test_accuracy=0.9)]
    elpv.main(["--summarize", *map(str, runs)])
    out = capsys.readouterr().out
    assert "test_accuracy: 0.8500 +- 0.0707 over seeds [0, 1]" in out


def test_summarize_refuses_runs_of_different_recipes(tmp_path):
    runs = [_write(tmp_path / "a", seed=0), _write(tmp_path / "b", seed=1, image_size=192)]
    with pytest.raises(ValueError, match="different recipes"):
        elpv.main(["--summarize", *map(str, runs)])


def test_summarize_names_a_folder_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        elpv.main(["--summarize", str(tmp_path / "empty")])


def test_a_new_run_refuses_a_folder_that_holds_a_finished_one(tmp_path):
    held = _write(tmp_path / "binary_efficientnet_lite0_full_224px_15ep_seed0")
    with pytest.raises(FileExistsError, match="already holds a run.*result.json.*--overwrite"):
        elpv.run_folder(tmp_path, held.name, overwrite=False)
    assert elpv.run_folder(tmp_path, held.name, overwrite=True) == held
    assert elpv.run_folder(tmp_path, "new_run", overwrite=False) == tmp_path / "new_run"
