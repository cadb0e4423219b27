"""The course runner: argument parsing, parameter validation, grid expansion, and one end-to-end
run of all five notebooks on a class-folder dataset they have never seen."""

import contextlib
import io
import json
import warnings

import cv2
import nbformat
import numpy as np
import pandas as pd
import pytest

from helpers import course, workbook
from helpers.data import make_splits
from helpers.notebook_cells import output_problems


def test_augment_none_is_the_recipe_not_the_default():
    assert course.parse_value("none", "augment") == "none" and course.parse_value("null", "augment") is None
    assert course.parse_value("none", "strategy") is None


def test_parse_value_types():
    assert course.parse_value("3") == 3 and isinstance(course.parse_value("3"), int)
    assert course.parse_value("0.001") == pytest.approx(0.001)
    assert course.parse_value("None") is None and course.parse_value("true") is True
    assert course.parse_value("efficientnet_lite0") == "efficientnet_lite0"


def test_parser_collects_repeated_parameters():
    args = course.build_parser().parse_args(["--name", "x", "-p", "epochs", "3", "-p", "lr", "0.01", "--smoke"])
    assert args.name == "x" and args.smoke and args.parameter == [["epochs", "3"], ["lr", "0.01"]]


def test_notebooks_share_the_workbook_parameters():
    found = course.notebook_parameters()
    assert set(found) == set(workbook.PARAMETERS)


def test_the_course_help_lists_every_notebook_parameter():
    listed = {word.rstrip(",") for line in course.PARAMETERS_HELP.splitlines() if line.startswith("  ")
              for word in line.split("   ")[0].split()}
    assert set(workbook.PARAMETERS) <= listed
    assert "subject_col" in course.build_parser().format_help()


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\].*'epochs'"):
        course.validate({"epoch": 3}, course.notebook_parameters())
    assert course.main(["-p", "epoch", "3", "--notebooks", "01"]) == 2


def test_select_notebooks():
    assert course.select_notebooks(["5", "04"]) == ("04_fine_tune", "05_evaluate")
    with pytest.raises(ValueError, match="choose from"):
        course.select_notebooks(["07"])


def test_grid_expansion_and_names():
    grid = course.expand_grid(["lr=0.001,0.0003", "image_size=128,160", "strategy=full"])
    assert len(grid) == 4
    assert grid[0] == {"lr": 0.001, "image_size": 128, "strategy": "full"}
    assert grid[-1] == {"lr": 0.0003, "image_size": 160, "strategy": "full"}
    names = {course.grid_run_name("sweep", c) for c in grid}
    assert len(names) == 4 and "sweep-lr=0.001-image_size=128-strategy=full" in names
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        course.expand_grid(["lr"])
    with pytest.raises(ValueError, match="twice"):
        course.expand_grid(["lr=1", "lr=2"])


def test_markdown_table():
    import pandas as pd

    text = course.markdown_table(pd.DataFrame({"run": ["a"], "acc": [0.5]}))
    assert text.splitlines() == ["| run | acc |", "|---|---|", "| a | 0.5000 |"]


@pytest.mark.parametrize("bad, message", [({"backbone": "vgg99"}, "efficientnet_lite0"),
                                          ({"strategy": "half"}, "last_n"),
                                          ({"task": "3class"}, "4class"),
                                          ({"epochs": 0}, "positive")])
def test_resolve_params_rejects_unknown_values(bad, message):
    with pytest.raises(ValueError, match=message):
        workbook.resolve_params(bad, smoke=True)


def test_resolve_params_smoke_defaults_and_overrides(tmp_path):
    params = workbook.resolve_params({"run_name": str(tmp_path / "r")}, smoke=True)
    assert params.elpv and params.data_root.name == "elpv_tiny" and params.run.is_dir()
    assert workbook.pick(params.image_size, 64, 128, 224, params) == 64
    params = workbook.resolve_params({"run_name": str(tmp_path / "r"), "image_size": 96}, smoke=True)
    assert workbook.pick(params.image_size, 64, 128, 224, params) == 96


def test_a_mirror_that_lost_takes_the_mirrors_out_of_an_unset_recipe_only(tmp_path):
    run = str(tmp_path / "r")
    params = workbook.resolve_params({"run_name": run}, smoke=True, settled=False)
    with pytest.raises(FileNotFoundError, match="02_prepare_dataset"):  # nothing to settle before the split
        workbook.settle_augment(params, ["horizontal mirror"])
    workbook.prepare_split(params)
    with pytest.warns(workbook.UnsettledRecipeWarning, match=r"dataset.json holds a split but no augment: .*'cells'"):
        assert workbook.resolve_params({"run_name": run}, smoke=True).augment == "cells"  # nothing settled yet
    assert workbook.settle_augment(params, []) == "cells"
    assert workbook.settle_augment(params, ["vertical mirror"]) == "cells_no_flip"
    assert json.loads((params.run / "dataset.json").read_text())["augment"] == "cells_no_flip"
    with warnings.catch_warnings():  # settled: nothing to warn about
        warnings.simplefilter("error", workbook.UnsettledRecipeWarning)
        later = workbook.resolve_params({"run_name": run}, smoke=True)
    assert later.augment == "cells_no_flip" and later.default_augment == "cells"
    assert workbook.training_budget(later, "last_n", "efficientnet_lite0")["augment"] == "cells_no_flip"
    # 04 records the recipe it trained with; 05's test-time flips follow it, and refuse a different one
    assert workbook.evaluation_recipe(later, {"augment": "cells_no_flip"}) == "cells_no_flip"
    assert workbook.evaluation_recipe(later, {}) == "cells_no_flip"  # a final.json from before the key
    other = workbook.resolve_params({"run_name": run, "augment": "cells"}, smoke=True)
    with pytest.raises(ValueError, match="notebook 04 trained with 'cells_no_flip'"):
        workbook.evaluation_recipe(other, {"augment": "cells_no_flip"})
    # notebook 02 decides afresh, and a recipe the user set always wins
    assert workbook.resolve_params({"run_name": run}, smoke=True, settled=False).augment == "cells"
    assert workbook.resolve_params({"run_name": run, "augment": "natural"}, smoke=True).augment == "natural"
    chosen = workbook.resolve_params({"run_name": run, "augment": "natural"}, smoke=True, settled=False)
    assert workbook.settle_augment(chosen, ["horizontal mirror"]) == "natural"
    config = json.loads((params.run / "dataset.json").read_text())
    (params.run / "dataset.json").write_text(json.dumps({**config, "augment": "mixup"}))
    with pytest.raises(ValueError, match=r"dataset.json: unknown augment 'mixup'"):
        workbook.resolve_params({"run_name": run}, smoke=True)
    workbook.prepare_split(params)  # a new split forgets what the old one settled, and says so
    with pytest.warns(workbook.UnsettledRecipeWarning, match="mirror check has not run"):
        assert workbook.resolve_params({"run_name": run}, smoke=True).augment == "cells"


def test_a_relative_data_root_on_the_command_line_is_the_shells(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert course.data_root_from_here({"data_root": "mine", "epochs": 3}) == {"data_root": str(tmp_path / "mine"),
                                                                             "epochs": 3}
    assert course.data_root_from_here({"data_root": "data/nowhere"}) == {"data_root": "data/nowhere"}  # workbook's
    assert course.data_root_from_here({"epochs": 3}) == {"epochs": 3}


def test_smoke_mode_samples_your_folder_evenly_with_enough_of_each_class_to_split():
    table = pd.DataFrame({"file": [f"f{i}" for i in range(1000)], "label": ["a"] * 700 + ["b"] * 250 + ["c"] * 50,
                          "group": None})
    sample = workbook.smoke_subset(table, seed=1)
    assert sample["label"].value_counts().to_dict() == {"a": 22, "b": 22, "c": 22}
    assert sample.equals(workbook.smoke_subset(table, seed=1)) and not sample.equals(workbook.smoke_subset(table))
    many = pd.DataFrame({"file": [f"f{i}" for i in range(240)], "label": [f"c{i % 12}" for i in range(240)],
                         "group": None})
    assert len(workbook.smoke_subset(many)) == 12 * 9  # 64 images could not give every split all 12 classes
    make_splits(workbook.smoke_subset(many), group_col=None)
    small = table.groupby("label").head(5)
    assert workbook.smoke_subset(small).sort_index().equals(small.sort_index())  # nothing to cut
    # Half of the files are second copies of the others: the sample takes pictures, each with all its files, so
    # the split, which counts pictures, still has enough of them (9 files per class could hold 5 pictures)
    copies = [[f"f{i}", f"f{i + 120}"] for i in range(120)]
    sample = workbook.smoke_subset(many, copies=copies)
    assert len(sample) == 2 * 12 * 9 and all(set(names) <= set(sample["file"]) or not set(names) & set(sample["file"])
                                             for names in copies)
    make_splits(sample, group_col=None, copies=[names for names in copies if set(names) <= set(sample["file"])])


def test_later_notebooks_take_the_dataset_from_the_split_not_elpv(tmp_path):
    root = tmp_path / "photos"
    for shade, label in enumerate(("cat", "dog", "owl")):
        for i in range(8):
            path = root / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), np.full((10, 12, 3), 20 * i + 3 * shade, np.uint8))
    run = str(tmp_path / "own")
    workbook.prepare_split(workbook.resolve_params({"run_name": run, "data_root": str(root)}, smoke=True,
                                                   settled=False))
    with pytest.warns(workbook.UnsettledRecipeWarning):  # prepare_split skips 02's mirror check
        later = workbook.resolve_params({"run_name": run}, smoke=True)  # notebook 04 or helpers.train, no data_root
    assert (later.data_root, later.elpv, later.task, later.crop_pct) == (root, False, "custom", None)
    with pytest.raises(ValueError, match=r"unknown task 'binary'; choose one of \['custom'\]"):
        workbook.resolve_params({"run_name": run, "task": "binary"}, smoke=True)  # what the user sets is checked
    four = str(tmp_path / "four")
    workbook.prepare_split(workbook.resolve_params({"run_name": four, "task": "4class"}, smoke=True, settled=False))
    with pytest.warns(workbook.UnsettledRecipeWarning):
        assert workbook.resolve_params({"run_name": four}, smoke=True).task == "4class"  # not the binary default
    assert workbook.resolve_params({"run_name": four}, smoke=True, settled=False).task == "binary"  # 02 decides
    # Other images named in an ELPV run's folder: its task says nothing about them (a task of 'binary' for a
    # class-folder dataset used to stop this with "unknown task 'binary'")
    with pytest.warns(workbook.UnsettledRecipeWarning):
        other = workbook.resolve_params({"run_name": four, "data_root": str(root)}, smoke=True)
    assert (other.task, other.elpv, other.data_root) == ("custom", False, root)
    table = root / "labels.csv"  # nor does another dataset's label table
    table.write_text("file,label\n" + "".join(f"{label}/{i}.png,{label}\n" for label in ("cat", "dog", "owl")
                                              for i in range(8)))
    labelled = {"run_name": run, "data_root": str(root), "labels_csv": "labels.csv"}
    workbook.prepare_split(workbook.resolve_params(labelled, smoke=True, settled=False))
    with pytest.warns(workbook.UnsettledRecipeWarning):
        same = workbook.resolve_params({"run_name": run, "data_root": str(root)}, smoke=True)  # the recorded folder
        elsewhere = workbook.resolve_params({"run_name": run, "data_root": str(tmp_path)}, smoke=True)
    assert same.labels_csv == table and elsewhere.labels_csv is None


def test_choices_and_models_of_an_older_split_are_refused(tmp_path):
    run = str(tmp_path / "r")
    params = workbook.resolve_params({"run_name": run}, smoke=True, settled=False)
    workbook.prepare_split(params)
    first = workbook.split_fingerprint(params.run)
    workbook.files.write_json(params.run / "strategy.json", {"strategy": "head", "split": first})
    workbook.files.write_json(params.run / "final.json", {"model": "probe", "finished": True, "split": first})
    workbook.files.write_json(params.run / "decision.json", {"backbone": "efficientnet_lite0", "task": "binary"})
    later = workbook.resolve_params({"run_name": run}, smoke=True, settled=False)
    assert workbook.fine_tune_model(later)[0].strategy["name"] == "head"
    assert workbook.finished_final(params.run)["model"] == "probe"
    workbook.prepare_split(workbook.resolve_params({"run_name": run, "seed": 1}, smoke=True, settled=False))
    assert workbook.split_fingerprint(params.run) != first  # 02 again, with another seed: another split
    with pytest.raises(ValueError, match=r"final.json was made on another split .*Rerun notebooks/04_fine_tune"):
        workbook.finished_final(params.run)  # 05 would score the old model on some of its training images
    with pytest.raises(ValueError, match=r"strategy.json was made on another split .*notebooks/03_choose_freezing"):
        workbook.fine_tune_model(later)
    assert workbook.fine_tune_model(workbook.resolve_params({"run_name": run, "strategy": "head"}, smoke=True,
                                                            settled=False))[0].strategy["name"] == "head"
    workbook.files.write_json(params.run / "final.json", {"model": "probe", "finished": True})  # before the key
    assert workbook.finished_final(params.run)["model"] == "probe"


def test_a_decision_for_another_task_is_refused(tmp_path):
    params = workbook.resolve_params({"run_name": str(tmp_path / "r")}, smoke=True, settled=False)
    workbook.files.write_json(params.run / "decision.json", {"backbone": "efficientnet_lite2", "task": "4class"})
    with pytest.raises(ValueError, match=r"chose the backbone for task '4class', but this notebook runs task "
                                         r"'binary'"):
        workbook.read_decision(params)
    four = workbook.resolve_params({"run_name": str(tmp_path / "r"), "task": "4class"}, smoke=True, settled=False)
    assert workbook.read_decision(four)["backbone"] == "efficientnet_lite2"


def test_a_rerun_lists_the_files_and_figures_it_replaces(tmp_path):
    (tmp_path / "figures").mkdir()
    for name in ("metrics.json", "final.json", "05_evaluate.ipynb", "figures/05_gradcam.png",
                 "figures/04_learning_curves.png"):
        (tmp_path / name).write_text("x")
    assert workbook.existing_outputs(tmp_path, ("05_evaluate",)) == ["metrics.json", "05_evaluate.ipynb",
                                                                     "figures/05_gradcam.png"]


def test_missing_input_names_the_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="02_prepare_dataset"):
        workbook.read_json(tmp_path / "dataset.json", "02_prepare_dataset")


def _class_folders(root, per_class=12, size=48):
    """Three classes of crops from scikit-image photos, a layout the notebooks have never seen, stored as
    16-bit PNGs (8-bit values x 256, as some scientific cameras write them): OpenCV's imread, which notebook
    05 reads one image with by hand, truncates them to 8 bits where the workbook's reader rounds."""
    import skimage.data

    rng = np.random.default_rng(0)
    for name in ("chelsea", "coffee", "rocket"):
        photo = getattr(skimage.data, name)()
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = photo.shape[:2]
            side = int(min(h, w) * rng.uniform(0.5, 0.9))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = cv2.resize(photo[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
            deep = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR).astype(np.uint16) * 256
            assert cv2.imwrite(str(root / name / f"{i:02d}.png"), deep)
    return root


@pytest.fixture(scope="module")
def class_folder_course(tmp_path_factory):
    """(data folder, run folder) of the whole course, run once for this module's tests."""
    tmp_path = tmp_path_factory.mktemp("course")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TL_SMOKE", "1")
        data = _class_folders(tmp_path / "photos")
        (data / "coffee" / "notes.txt").write_text("where these came from")  # left out, with a warning
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            run = course.run_course(str(tmp_path / "run"), {"data_root": str(data), "task": "custom"}, smoke=True,
                                    progress=False)
    (tmp_path / "course.log").write_text(printed.getvalue())  # what the terminal showed
    return data, run


def test_the_warnings_of_an_executed_notebook_are_read_back_once_each(tmp_path):
    notebook = nbformat.v4.new_notebook()
    stderr = ("/x/helpers/data.py:12: UserWarning: /data: ignored 2 file(s) whose extension ...: ['a/b.txt']\n"
              "  frame = scan_class_folders(root)\n")
    notebook.cells = [nbformat.v4.new_code_cell("1", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text=stderr),
        nbformat.v4.new_output("stream", name="stdout", text="x.py:1: UserWarning: printed, not warned\n")]),
        nbformat.v4.new_code_cell("2", outputs=[nbformat.v4.new_output("stream", name="stderr", text=stderr
                                  + "/y.py:3: RuntimeWarning: overflow in exp\n")])]
    nbformat.write(notebook, tmp_path / "01.ipynb")
    assert course.notebook_warnings(tmp_path / "01.ipynb") == [
        "UserWarning: /data: ignored 2 file(s) whose extension ...: ['a/b.txt']", "RuntimeWarning: overflow in exp"]


def test_course_end_to_end_on_class_folders(class_folder_course):
    data, run = class_folder_course
    for notebook in workbook.NOTEBOOKS:
        executed = nbformat.read(run / f"{notebook}.ipynb", as_version=4)
        # What a reader of the executed copy meets: no warnings, no flood of progress-bar updates. Two
        # warnings are the workbook's own, true of this data: 9 test images cannot calibrate a temperature,
        # and coffee/notes.txt is not an image.
        problems = [p for p in output_problems(executed)
                    if "fitted temperature" not in p and "not one read as an image" not in p]
        assert problems == [], notebook
    # A batch run's terminal repeats every warning of the executed copies, each once
    printed = (run.parent / "course.log").read_text()
    warned = [w for notebook in workbook.NOTEBOOKS for w in course.notebook_warnings(run / f"{notebook}.ipynb")]
    assert any("['coffee/notes.txt']" in w for w in warned)
    assert all(printed.count(f"warned: {w}\n") == 1 for w in set(warned))
    # 05's by-hand prediction noticed that imread decodes these files differently, and used the reader's pixels
    by_hand = nbformat.read(run / "05_evaluate.ipynb", as_version=4)
    assert "cv2.imread decodes it differently" in str([c.outputs for c in by_hand.cells if c.get("id") == "05-10"])
    dataset = json.loads((run / "dataset.json").read_text())
    assert dataset["classes"] == ["chelsea", "coffee", "rocket"] and dataset["task"] == "custom"
    assert {"train.csv", "val.csv", "test.csv", "mirror_check.csv", "probe.pt", "final.pt", "final.json",
            "decision.json", "strategy.json"} <= {p.name for p in run.iterdir()}
    row = course.read_metrics(run)
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["image_size"] == 64
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == dataset["classes"] and metrics["n_test"] == 9
    # 02 settled the recipe from its mirror check; 05's test-time flips follow what 02 settled
    from helpers.lessons import mirror_conflicts
    from helpers.transforms import TTA_FLIPS

    lost = mirror_conflicts(pd.read_csv(run / "mirror_check.csv"), "natural")
    assert dataset["augment"] == ("natural_no_flip" if lost else "natural")
    assert metrics["tta"] == TTA_FLIPS[dataset["augment"]]
    assert metrics["augment"] == json.loads((run / "final.json").read_text())["augment"] == dataset["augment"]
    # The floor: the final model is the probe, or beat the probe on validation.
    final = json.loads((run / "final.json").read_text())
    assert metrics["final_model"] == final["model"]
    strategy = json.loads((run / "strategy.json").read_text())["strategy"]
    assert metrics["candidate_strategy"] == final["candidate"] == strategy  # what 04 tried, even if the probe is kept
    if final["model"] == "probe":
        assert metrics["test_accuracy"] == metrics["baseline_probe"]
    else:
        assert final["val_fine_tuned"] - final["val_probe"] > final["noise"] and (run / "candidate.pt").is_file()
    assert 0.0 <= metrics["baseline_majority"] <= 1.0


def test_course_end_to_end_with_subjects(tmp_path, monkeypatch):
    """The course on a label table whose 12 subjects each hold images of every class (writers, say): whole
    subjects in each split, and 05 reporting per subject, with margins from resampling whole subjects."""
    monkeypatch.setenv("TL_SMOKE", "1")
    data = _class_folders(tmp_path / "photos", per_class=24)
    rows = [f"{name}/{i:02d}.png,{name},writer{i % 12}" for name in ("chelsea", "coffee", "rocket") for i in range(24)]
    (data / "labels.csv").write_text("file,label,writer\n" + "\n".join(rows) + "\n")
    run = course.run_course(str(tmp_path / "run"), {"data_root": str(data), "labels_csv": "labels.csv",
                                                     "subject_col": "writer"}, smoke=True, progress=False)
    for notebook in workbook.NOTEBOOKS:
        problems = [p for p in output_problems(nbformat.read(run / f"{notebook}.ipynb", as_version=4))
                    if "fitted temperature" not in p]
        assert problems == [], notebook
    writers = {name: set(pd.read_csv(run / f"{name}.csv")["subject"]) for name in ("train", "val", "test")}
    assert not (writers["train"] & writers["val"] or writers["train"] & writers["test"]
                or writers["val"] & writers["test"])
    evaluated = nbformat.read(run / "05_evaluate.ipynb", as_version=4)
    text = str([c.outputs for c in evaluated.cells if c.cell_type == "code"])
    assert f"{len(writers['test'])} test subjects: " in text  # the per-subject table
    assert f"test images of {len(writers['test'])} subjects, two standard errors" in text  # the test margin
    assert f"resampling the {len(writers['test'])} subjects whole gives" in text
    predictions = pd.read_csv(run / "test_predictions.csv")
    assert set(predictions["subject"]) == writers["test"]


def test_rerunning_phase_two_in_a_kernel_repeats_it(class_folder_course, monkeypatch):
    """A learner reruns notebook 04's phase-2 cell: it must train the pretrained model again from the probe,
    not keep training the model the first run already fine-tuned (the red-team pass saw epoch-1 losses of
    3.19, then 8.57). Executed in one kernel, as JupyterLab would: the notebook up to the cell, the cell again."""
    from nbclient import NotebookClient
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    data, run = class_folder_course
    monkeypatch.setenv("TL_SMOKE", "1")
    monkeypatch.setenv("TL_PROGRESS", "0")
    source = load_notebook_node(str(course.notebooks_dir() / "04_fine_tune.ipynb"))  # as papermill reads it
    ids = [cell.get("id") for cell in source.cells]
    source.cells = source.cells[:ids.index("04-21") + 1]
    notebook = parameterize_notebook(source, {"run_name": str(run), "data_root": str(data), "task": "custom",
                                              "strategy": "last_n", "epochs": 2})
    notebook.cells += [nbformat.v4.new_code_cell("first, first_seconds = history.copy(), phase_two_seconds"),
                       nbformat.v4.new_code_cell(notebook.cells[-1].source),
                       nbformat.v4.new_code_cell(
                           "losses = ['train_loss', 'val_loss']\n"
                           "assert len(history) == len(first), (len(first), len(history))\n"
                           "assert np.allclose(history[losses], first[losses], rtol=1e-3, atol=1e-4), "
                           "(first[losses], history[losses])\n"
                           "assert phase_two_seconds < 10 * first_seconds + 5  # phase 2's own, not since the first")]
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(course.notebooks_dir())}}).execute()
