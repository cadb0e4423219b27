"""benchmarks/floor_check.py --selection: the simulation behind notebook 04's choice to judge the last epoch."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "benchmark_floor_check", Path(__file__).resolve().parents[1] / "benchmarks" / "floor_check.py")
floor_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(floor_check)


def test_the_best_epoch_clears_the_floor_more_often_than_the_last_whatever_the_model_is_worth():
    for gain in (0.0, 0.03):
        rates = floor_check.replacement_rates(images=200, epochs=8, gain=gain, trials=400, seed=1)
        assert rates["best epoch"] > rates["last epoch"], (gain, rates)
    equal = floor_check.replacement_rates(images=200, epochs=8, trials=400, seed=1)
    assert equal["last epoch"] < 0.06 < equal["best epoch"]  # two standard errors promise about 2.5 %
    better = floor_check.replacement_rates(images=200, epochs=8, gain=0.1, trials=100, seed=1)
    assert better["last epoch"] > 0.5  # a clearly better model does get through


def test_the_simulation_needs_runs_or_selection(capsys):
    with pytest.raises(SystemExit):
        floor_check.main([])
    assert "--selection" in capsys.readouterr().err
