"""Notebook-side glue: parameters, smoke settings, the run folder and the environment report.

Every notebook has the same papermill ``parameters`` cell (the names in ``PARAMETERS``) with
plain assignments, many of them ``None``. The next cell calls `start` (`resolve_params`), which checks
the values and fills each ``None`` with a default that depends on the machine (GPU or CPU) and
on ``TL_SMOKE=1`` (the CI budget: the 64-image ELPV subset or a sample of your folder, 64 px, one
epoch in notebook 03's comparison and two in 04). A value the user set, in the notebook or with
``papermill -p``, always wins.

State flows through the run folder ``runs/<run_name>/``: split CSVs, ``dataset.json``,
``decision.json``, ``strategy.json``, checkpoints, history, metrics and figures. `require`
turns a missing input into an error that names the notebook to run first.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pandas as pd
import torch

from .data import (ELPV_TASKS, identical_files, load_splits, load_table, make_splits, make_tiny_elpv,
                   minimum_split_size, natural_key, overlapping_files, prepare_elpv, shared_subjects)
from . import files
from .errors import InputError, MissingFileError
from .freezing import STRATEGIES
from .metrics import class_weighting
from .models import TIMM_PREFIX, available_backbones, check_weights_available, offline_backbones
from .transforms import MAX_IMAGE_SIZE

if TYPE_CHECKING:  # for type hints only: these modules load lazily where they are used
    from matplotlib.figure import Figure

    from .data import ImageDataset
    from .models import TransferModel
    from .selection import Budget

# The papermill parameters every notebook declares, with their notebook defaults.
PARAMETERS: dict[str, object] = {
    "run_name": None,  # folder under runs/ (or an absolute path); None: "course", or "smoke" under TL_SMOKE
    "data_root": None,  # None: ELPV; else a folder of images
    "labels_csv": None,  # CSV of file/label columns (relative to data_root or absolute); None: class folders
    "file_col": "file",
    "label_col": "label",
    "group_col": None,  # optional column of subgroups (ELPV: mono/poly) for stratified splits and reports
    "subject_col": None,  # optional column naming who/what each image shows (patient, specimen): kept in one split
    "task": None,  # ELPV: "binary" (default) or "4class"; own data: "custom"
    "backbone": None,  # None: the winner of notebook 01's linear probe
    "strategy": None,  # None: notebook 03's choice (or 01's recommendation)
    "image_size": None,
    "epochs": None,
    "batch_size": None,
    "lr": None,
    # None: "cells" for ELPV (no 'up', brightness matters), "natural" for photos, without their flips ("..._no_flip")
    # when notebook 02 finds that a mirror changes the label; or set one of transforms.AUGMENTATIONS
    "augment": None,
    "seed": 0,
    "device": "auto",  # "auto", "cpu", "cuda" or "mps"
}
NOTEBOOKS = ("01_analyze_approach", "02_prepare_dataset", "03_choose_freezing", "04_fine_tune", "05_evaluate")
CUSTOM_TASK = "custom"
SMOKE_IMAGE_SIZE = 64


def is_smoke() -> bool:
    """True when ``TL_SMOKE=1``: tiny data and a minimal budget (CI, quick checks)."""
    return os.environ.get("TL_SMOKE", "0").strip().lower() in ("1", "true", "yes")


def workbook_root() -> Path:
    """The repository root (the folder holding ``helpers/`` and ``notebooks/``).

    Jupyter and nbval run notebooks with the notebooks folder as working directory, the course
    runner and papermill from wherever they were started; so we look upward from the working
    directory first, then fall back to where this package lives. ``TL_WORKBOOK_ROOT`` overrides.
    """
    if os.environ.get("TL_WORKBOOK_ROOT"):
        return Path(os.environ["TL_WORKBOOK_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "helpers" / "__init__.py").is_file() and (folder / "notebooks").is_dir():
            return folder
    return Path(__file__).resolve().parents[1]


# What each notebook writes into the run folder (besides figures/ and its executed copy).
NOTEBOOK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "01_analyze_approach": ("decision.json",),
    "02_prepare_dataset": ("train.csv", "val.csv", "test.csv", "dataset.json", "mirror_check.csv"),
    "03_choose_freezing": ("strategy.json",),
    "04_fine_tune": ("probe.pt", "candidate.pt", "best.pt", "last.pt", "history.csv", "fit.json", "final.pt",
                     "final.json", "last.interrupted.pt"),
    "05_evaluate": ("metrics.json", "test_predictions.csv", "model.pt2", "predictions.csv", "predict_demo"),
}
STALE_CHECKPOINT = "last.interrupted.pt"  # an interrupted phase 2's last.pt, set aside by `choose_final`
CANDIDATE = "candidate.pt"  # the strategy's model as the floor judges it: after phase 2's last epoch
# Written into every run folder the workbook creates or takes over: only such folders are written to.
RUN_MARKER = ".workbook_run.json"
_WORKBOOK_FILES = {name for outputs in NOTEBOOK_OUTPUTS.values() for name in outputs} | {
    f"{notebook}.ipynb" for notebook in NOTEBOOKS} | {"figures", "grid.csv", "grid.md", RUN_MARKER,
                                                     "my_images"}  # 05's demo folder in runs made before 2026-11-29


def run_path(run_name: str) -> Path:
    """Where ``run_name`` lives: ``runs/<run_name>`` under the workbook root, or itself if absolute."""
    path = Path(str(run_name)).expanduser()
    if not path.is_absolute():
        parts = Path(str(run_name)).parts
        if not run_name or not parts or any(part in ("", ".", "..") for part in parts):
            raise InputError(f"run_name must be a plain folder name or an absolute path, got {run_name!r}")
        path = workbook_root() / "runs" / run_name
    return path


def foreign_files(run: Path) -> list[str]:
    """Entries of an existing ``run`` folder that keep the workbook from writing there.

    None when the folder carries `RUN_MARKER`. A folder under the workbook's own ``runs/`` that
    holds only workbook outputs (a run made before the marker existed) is accepted too; any
    other folder must be empty, so a user's own ``train.csv`` is never replaced.
    """
    if not run.is_dir() or (run / RUN_MARKER).is_file():
        return []
    entries = sorted(p.name for p in run.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
    inside_runs = run.resolve().parent == (workbook_root() / "runs").resolve()
    if inside_runs and set(entries) <= _WORKBOOK_FILES:
        return []
    return entries


def run_folder(run_name: str, overwrite: bool = False) -> Path:
    """``runs/<run_name>`` under the workbook root, or ``run_name`` itself if absolute: created
    and marked as the workbook's (`RUN_MARKER`).

    An existing folder the workbook did not create (see `foreign_files`) is refused, naming
    what is in it, unless ``overwrite=True`` (``python -m helpers.course --overwrite``).
    """
    path = run_path(run_name)
    if path.exists() and not path.is_dir():
        raise InputError(f"run folder {path} is a file; choose another run_name")
    foreign = foreign_files(path)
    if foreign and not overwrite:
        raise InputError(f"run folder {path} already holds {len(foreign)} file(s) the workbook did not write: "
                         f"{foreign[:8]}; choose another run_name (a new or empty folder), or write into it "
                         f"anyway with python -m helpers.course --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    if not (path / RUN_MARKER).is_file():
        files.write_json(path / RUN_MARKER, {"created_by": "helpers.workbook", "run_name": str(run_name)})
    return path


def existing_outputs(run: Path, notebooks: tuple[str, ...]) -> list[str]:
    """The files in ``run`` that running ``notebooks`` again will replace."""
    names = [name for notebook in notebooks for name in (*NOTEBOOK_OUTPUTS.get(notebook, ()), f"{notebook}.ipynb")]
    figures = [f"figures/{path.name}" for notebook in notebooks  # save_figure names them <NN>_<what>.png
               for path in sorted((run / "figures").glob(f"{notebook[:2]}_*.png"))]
    return [name for name in names if (run / name).exists()] + figures


@dataclass(frozen=True)
class Params:
    """The resolved parameters of one notebook run (see ``PARAMETERS``)."""

    run_name: str
    run: Path
    data_root: Path
    labels_csv: Path | None
    file_col: str
    label_col: str
    group_col: str | None
    task: str
    backbone: str | None
    strategy: str | None
    image_size: int | None
    epochs: int | None
    batch_size: int | None
    lr: float | None
    seed: int
    device: torch.device
    smoke: bool
    elpv: bool
    subject_col: str | None = None  # images of one subject (patient, specimen, panel) stay in one split
    stratify_col: str | None = None  # column of the label table to stratify the split on (ELPV: label4)
    augment_recipe: str | None = None  # the augment parameter; None: chosen from the data (see `augment`)
    settled_augment: str | None = None  # the recipe notebook 02 settled on after its mirror check (``dataset.json``)
    user_set: tuple[str, ...] = field(default_factory=tuple)

    @property
    def crop_pct(self) -> float | None:
        """ELPV cells fill the frame: keep all of it (1.0); photos use the backbone's ImageNet crop."""
        return 1.0 if self.elpv else None

    @property
    def default_augment(self) -> str:
        """The recipe for this kind of data: "cells" for ELPV (aligned cells with no 'up', where brightness
        carries meaning), "natural" (random crops, horizontal flips, colour jitter) for any other folder."""
        return "cells" if self.elpv else "natural"

    @property
    def augment(self) -> str:
        """Augmentation recipe of `helpers.transforms.train_transform`: the ``augment`` parameter, else the
        one notebook 02 settled on after measuring the mirrors (`settle_augment`), else `default_augment`."""
        return self.augment_recipe or self.settled_augment or self.default_augment

    def report(self) -> pd.Series:
        """The parameters as a one-column table for display."""
        shown = {k: v for k, v in asdict(self).items() if k not in ("user_set", "augment_recipe", "settled_augment")}
        shown.update(augment=self.augment, crop_pct=self.crop_pct)  # as resolved: what the notebooks use
        return pd.Series({k: str(v) for k, v in shown.items()}, name="value")


def collect(namespace: dict) -> dict:
    """The parameter values from a notebook's ``globals()``."""
    missing = [name for name in PARAMETERS if name not in namespace]
    if missing:
        raise NameError(f"the parameters cell does not define {missing}; it must set all of {list(PARAMETERS)}")
    return {name: namespace[name] for name in PARAMETERS}


def _check_choice(name: str, value: object, valid: list) -> None:
    if value not in valid:
        raise InputError(f"unknown {name} {value!r}; choose one of {valid}")


def _positive(name: str, value: object, kind: type) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                                       else int) or value <= 0):
        raise InputError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


def _at_most(name: str, value: object, limit: float, why: str) -> None:
    """Refuse nan, infinity and values above ``limit`` (``value`` already passed `_positive`)."""
    if value is not None and not (math.isfinite(value) and value <= limit):
        raise InputError(f"{name} must be at most {limit} ({why}), got {value!r}")


# Parameters that name a path or a column: papermill and the command line turn "2024" into an int.
TEXT_PARAMETERS = ("run_name", "data_root", "labels_csv", "file_col", "label_col", "group_col", "subject_col")
MAX_LR = 1.0


def _as_text(name: str, value: object) -> str | None:
    """A path or column name as text; an int is taken as its digits (a folder named 2024)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{name} must be text (a path or column name), got {value!r}; pass it as a string "
                     f"(papermill: -r {name} VALUE)")


class UnsettledRecipeWarning(UserWarning):
    """Notebooks 03-05 run on a split whose augmentation recipe notebook 02 did not settle."""


def _data_source(p: dict, smoke: bool, materialize: bool = True) -> dict:
    """Where the images and labels come from, as `Params` fields: ELPV (``data_root`` left at None, the
    tiny copy in smoke mode; copied out of its package unless ``materialize`` is False) or the user's
    folder, checked to exist."""
    elpv = p["data_root"] is None
    if elpv:
        task = p["task"] or "binary"
        _check_choice("task", task, list(ELPV_TASKS))
        for name in ("labels_csv", "group_col"):
            if p[name] is not None:
                raise InputError(f"{name} is for your own data (with data_root); ELPV sets it itself")
        # ELPV's cells come from 44 modules the dataset does not name; its table's `block` column is a proxy
        # (helpers.data.elpv_blocks), the one subject column it has.
        if p["subject_col"] not in (None, "block"):
            raise InputError(f"subject_col {p['subject_col']!r}: ELPV's table names no such column; its one subject "
                             f"column is 'block' (60 consecutive cells of one type, a proxy for the module)")
        root = workbook_root() / "data"
        data_root = root / ("elpv_tiny" if smoke else "elpv")
        if materialize:
            data_root = make_tiny_elpv(data_root) if smoke else prepare_elpv(data_root)
        labels_csv, file_col, group_col, subject_col = data_root / "labels.csv", "file", "type", p["subject_col"]
        label_col = ELPV_TASKS[task][0]
        stratify_col = "label4"  # both tasks split on the 4 expert classes x type: the same test cells
    else:
        task = p["task"] or CUSTOM_TASK
        _check_choice("task", task, [CUSTOM_TASK])
        data_root = Path(p["data_root"]).expanduser()
        if not data_root.is_absolute():
            data_root = (workbook_root() / data_root).resolve()
        if not data_root.is_dir():
            raise MissingFileError(f"data_root {p['data_root']!r} is not a folder (looked at {data_root})")
        labels_csv = None
        if p["labels_csv"] is not None:
            labels_csv = Path(p["labels_csv"]).expanduser()
            labels_csv = labels_csv if labels_csv.is_absolute() else data_root / labels_csv
            if not labels_csv.is_file():
                raise MissingFileError(f"labels_csv not found: {labels_csv}")
        file_col, label_col, group_col, subject_col = p["file_col"], p["label_col"], p["group_col"], p["subject_col"]
        if subject_col is not None and labels_csv is None:
            raise InputError(f"subject_col {subject_col!r} needs a label table (labels_csv) with that column: "
                             f"class folders say only each image's class")
        stratify_col = None
    return {"data_root": data_root, "labels_csv": labels_csv, "file_col": file_col, "label_col": label_col,
            "group_col": group_col, "subject_col": subject_col, "task": task, "elpv": elpv,
            "stratify_col": stratify_col}


def _checked(params: dict) -> tuple[dict, tuple[str, ...]]:
    """The parameters with defaults filled in and every value checked (``device`` resolved to a
    torch.device), and the names the user set; nothing is read or written on disk."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InputError(f"unknown parameter(s) {unknown}; valid parameters are {list(PARAMETERS)}")
    p = {**PARAMETERS, **params}
    user_set = tuple(k for k in PARAMETERS if p[k] != PARAMETERS[k])
    p.update({name: _as_text(name, p[name]) for name in TEXT_PARAMETERS})
    for name in ("file_col", "label_col"):
        if not p[name]:
            raise InputError(f"{name} must name a column of the label table, got {p[name]!r}")

    backbone = p["backbone"]
    if backbone is not None and not str(backbone).startswith(TIMM_PREFIX):
        _check_choice("backbone", backbone, available_backbones() + [TIMM_PREFIX + "<timm model name>"])
    if backbone is not None:
        # Offline, a backbone without cached weights would otherwise fail sections later (01's probe).
        check_weights_available(str(backbone))
    if p["strategy"] is not None:
        _check_choice("strategy", p["strategy"], list(STRATEGIES))
    if p["augment"] is not None:
        from .transforms import AUGMENTATIONS

        _check_choice("augment", p["augment"], list(AUGMENTATIONS))
    for name in ("image_size", "epochs", "batch_size"):
        _positive(name, p[name], int)
    _positive("lr", p["lr"], float)
    _at_most("lr", p["lr"], MAX_LR, "fine-tuning uses about 1e-3")
    _at_most("image_size", p["image_size"], MAX_IMAGE_SIZE, "backbones are trained at 224 to 600 px")
    if p["image_size"] is not None and p["image_size"] < 8:  # transforms.Preprocessing's floor, caught up front
        raise InputError(f"image_size must be at least 8 (px), got {p['image_size']!r}")
    if not isinstance(p["seed"], int) or isinstance(p["seed"], bool):
        raise InputError(f"seed must be an integer, got {p['seed']!r}")
    if not 0 <= p["seed"] < 2**32:  # numpy's and scikit-learn's range: the split would fail minutes later
        raise InputError(f"seed must be in 0..{2**32 - 1}, got {p['seed']}")
    from .runtime import pick_device

    p["device"] = pick_device(p["device"])  # raises, listing the valid names, for an unknown device
    return p, user_set


def check_parameters(params: dict, smoke: bool | None = None) -> None:
    """Every check `resolve_params` makes on ``params`` (names, values, backbone weights, task, data
    folders) without touching the run folder or copying data: the course runner calls it before it
    starts a kernel, so a mistake is one line of error, not a notebook's traceback."""
    p, _ = _checked(params)
    _data_source(p, is_smoke() if smoke is None else smoke, materialize=False)


def resolve_params(params: dict, smoke: bool | None = None, settled: bool = True) -> Params:
    """Check the notebook parameters and fill the ``None`` ones with defaults.

    Raises `InputError` naming the parameter and listing the valid values for an unknown
    key, backbone, strategy, task or device, and naming the value for an ``lr`` that is not
    finite or above `MAX_LR`, or an ``image_size`` above `MAX_IMAGE_SIZE`. Paths and column
    names (`TEXT_PARAMETERS`) given as integers are taken as text. ``smoke`` defaults to `is_smoke`.
    With ``settled`` (notebooks 03-05 and the command line; 02 decides it afresh, 01 runs before it)
    an ``augment`` left at ``None`` takes the recipe notebook 02 settled on for this run (`settle_augment`);
    a split with none settled (02 stopped before its mirror check, or the command line made the split) gets
    the default recipe and an `UnsettledRecipeWarning`.
    """
    p, user_set = _checked(params)
    smoke = is_smoke() if smoke is None else smoke
    run_name = p["run_name"] or ("smoke" if smoke else "course")
    if settled:
        p = _with_recorded_dataset(p, user_set, run_path(str(run_name)))
    source = _data_source(p, smoke)

    run = run_folder(str(run_name))
    params = Params(run_name=str(run_name), run=run, **source,
                    backbone=p["backbone"], strategy=p["strategy"], image_size=p["image_size"], epochs=p["epochs"],
                    batch_size=p["batch_size"], lr=p["lr"], seed=p["seed"], device=p["device"], smoke=smoke,
                    augment_recipe=p["augment"],
                    settled_augment=settled_recipe(run) if settled and p["augment"] is None else None,
                    user_set=user_set)
    if settled and p["augment"] is None and params.settled_augment is None and (run / "dataset.json").is_file():
        # A split without a settled recipe: 02 stopped between its split and its mirror check, or
        # `python -m helpers.train --no-mirror-check` made the split. Say so rather than train silently on
        # unchecked mirrors.
        warnings.warn(f"{run / 'dataset.json'} holds a split but no augment: notebook 02's mirror check has not "
                      f"run on it, so this notebook uses the {params.default_augment!r} recipe for this kind of "
                      f"data, flips included. Run notebooks/02_prepare_dataset.ipynb to the end, or set augment.",
                      UnsettledRecipeWarning, stacklevel=2)
    return params


def _with_recorded_dataset(p: dict, user_set: tuple[str, ...], run: Path) -> dict:
    """``p`` with the dataset parameters the user left unset taken from the run's ``dataset.json``.

    Notebooks 03-05 and ``helpers.train`` read the split notebook 02 wrote. Run alone without
    ``data_root``, they would otherwise take themselves for an ELPV run (ELPV's crop, the binary
    task's metric) while training on the recorded images. A value the user did set is compared
    with the record later (`check_dataset_params`), not replaced; and when the user's ``data_root`` names
    other images than the record's, nothing is filled in: that run's task or label table says nothing
    about these images.
    """
    path = run / "dataset.json"
    if not path.is_file():
        return p
    config = read_json(path, "02_prepare_dataset")
    if "data_root" in user_set and (config.get("elpv") or not _same_folder(p["data_root"], config.get("root"))):
        return p
    recorded = {"task": config.get("task")} if config.get("elpv") else {
        "data_root": config.get("root"), "labels_csv": config.get("labels_csv"), "file_col": config.get("file_col"),
        "label_col": config.get("label_col"), "group_col": config.get("group_col"),
        "subject_col": config.get("subject_col"), "task": config.get("task")}
    return {**p, **{name: value for name, value in recorded.items() if name not in user_set}}


def _same_folder(given: object, recorded: object) -> bool:
    """Whether the user's ``data_root`` (relative paths: under the workbook root, as `_data_source` reads
    them) is the folder a run's ``dataset.json`` recorded."""
    if recorded is None:
        return False
    path = Path(str(given)).expanduser()
    path = path if path.is_absolute() else workbook_root() / path
    return path.resolve() == Path(str(recorded)).expanduser().resolve()


def start(namespace: dict, settled: bool = True) -> Params:
    """The notebook's parameters from its ``globals()``, checked and completed (`resolve_params`), and
    shown as a table: the one line after every notebook's parameters cell. Notebooks 01 and 02 pass
    ``settled=False``: 02 measures the mirrors and settles the augmentation recipe, 01 runs before it."""
    from IPython.display import display

    params = resolve_params(collect(namespace), settled=settled)
    display(params.report())
    return params


def settled_recipe(run: Path) -> str | None:
    """The augmentation recipe notebook 02 wrote to ``run/dataset.json`` (`settle_augment`), or None."""
    from .transforms import AUGMENTATIONS

    path = run / "dataset.json"
    if not path.is_file():
        return None
    recipe = read_json(path, "02_prepare_dataset").get("augment")
    if recipe is not None and recipe not in AUGMENTATIONS:
        raise InputError(f"{path}: unknown augment {recipe!r}; choose one of {list(AUGMENTATIONS)}, "
                         f"or rerun notebooks/02_prepare_dataset.ipynb")
    return recipe


def settle_augment(params: Params, mirrors_that_lost: list[str]) -> str:
    """The recipe notebooks 03-05 use, written to ``dataset.json`` as ``augment``; returns it.

    When notebook 02's mirror check found that mirrors the recipe uses change the label and the user left
    ``augment`` at ``None``, the recipe loses its flips (`helpers.transforms.WITHOUT_MIRRORS`: "natural"
    becomes "natural_no_flip", "cells" "cells_no_flip"). Otherwise the recipe is recorded as it is (a recipe
    the user set in 02 therefore also holds in 03-05 where ``augment`` is left at ``None``; 02 warns when
    its mirrors lost). Rerunning 02's split rewrites ``dataset.json`` without it, so a stale choice does not
    survive a new split.
    """
    from .transforms import WITHOUT_MIRRORS

    recipe = params.augment
    if mirrors_that_lost and "augment" not in params.user_set:
        recipe = WITHOUT_MIRRORS[recipe]
    path = params.run / "dataset.json"
    files.write_json(path, {**read_json(path, "02_prepare_dataset"), "augment": recipe})
    return recipe


def check_mirrors(params: Params, backbone: str) -> tuple[pd.DataFrame, list[str], str]:
    """Notebook 02's section 6 without its prose, for the command line: on the split in ``params.run``, does
    a mirror keep the label (`helpers.lessons.mirror_check`, a linear probe on ``backbone``'s frozen features
    at its own size)? Writes ``mirror_check.csv``, settles the recipe (`settle_augment`: ``dataset.json``)
    and returns (the table, the recipe's mirrors that lost beyond the noise, the settled recipe)."""
    from .lessons import mirror_check, mirror_conflicts, recipe_mirrors
    from .models import create_model
    from .transforms import eval_transform

    classes = read_json(params.run / "dataset.json", "02_prepare_dataset", ["classes"])["classes"]
    model = create_model(backbone, len(classes))
    as_stored = eval_transform(model, params.image_size or model.spec.input_size, params.crop_pct)
    sets = load_datasets(params, as_stored, as_stored)
    table = mirror_check(model, sets["train"], sets["val"], recipe_mirrors(params.augment),
                         max_train=pick(None, 64, 400, 1000, params), seed=params.seed, device=params.device,
                         metric=selection_metric(params))
    files.write_csv(table, params.run / "mirror_check.csv")
    conflicts = mirror_conflicts(table, params.augment)
    return table, conflicts, settle_augment(params, conflicts)


def pick(value: object, smoke: object, cpu: object, gpu: object, params: Params) -> object:
    """``value`` when the user set it, else the default for this budget (smoke, CPU or GPU)."""
    if value is not None:
        return value
    if params.smoke:
        return smoke
    return gpu if params.device.type == "cuda" else cpu


# ----------------------------------------------------------------------------------------
# The dataset as later notebooks see it


def label_table(params: Params) -> pd.DataFrame:
    """The validated label table (file, label, group[, subject][, stratum]) of the configured dataset."""
    table = load_table(params.data_root, params.labels_csv, params.file_col, params.label_col, params.group_col,
                       params.subject_col)
    if table["label"].nunique() < 2:
        raise InputError(f"{params.labels_csv or params.data_root}: column {params.label_col!r} has only one "
                         f"class, {sorted(table['label'].unique())}; a classifier needs at least two")
    if params.stratify_col:
        strata = load_table(params.data_root, params.labels_csv, params.file_col, params.stratify_col,
                            params.group_col)
        table["stratum"] = strata["label"].to_numpy()
    if params.smoke and not params.elpv:  # ELPV has its own 64-image copy
        whole = len(table)
        table = smoke_subset(table, params.seed, copies=identical_files(params.data_root, table["file"].tolist()))
        table.attrs["images_in_folder"] = whole  # for the notebooks to say how much of the folder they saw
    return table


SMOKE_IMAGES = 64  # smoke mode's dataset size: ELPV's tiny copy, and a sample of your own folder


def smoke_subset(table: pd.DataFrame, seed: int = 0, images: int = SMOKE_IMAGES,
                 copies: Sequence[Sequence[str]] = ()) -> pd.DataFrame:
    """A seeded sample of about ``images`` rows, the same number of each class (x group), enough of each
    for notebook 02's three-way split (`helpers.data.minimum_split_size`): smoke mode on your own folder
    rehearses the course on a few dozen images, as it does on ELPV, instead of decoding all of them (finding the
    copies reads the files that share their size with another, once per notebook). The split
    counts pictures, so pictures are sampled, each with all its ``copies`` (`helpers.data.identical_files`):
    a sample of files could hold too few pictures to split."""
    first_of = {name: names[0] for names in copies for name in names}
    picture = table["file"].map(lambda name: first_of.get(name, name))
    whole, table = table, table[picture == table["file"]]  # one row per picture: the first name of its copies
    strata = table["label"] + ("|" + table["group"] if table["group"].notna().all() else "")
    count = strata.nunique()
    per = max(4, math.ceil(minimum_split_size(count) / count), math.ceil(images / count))
    keep = [rows.sample(n=min(len(rows), per), random_state=seed) for _, rows in table.groupby(strata, sort=True)]
    return whole[picture.isin(set(pd.concat(keep)["file"]))]


def classes_of(params: Params, table: pd.DataFrame) -> list[str]:
    """Class names in a meaningful order: ELPV's own order, else sorted."""
    return list(ELPV_TASKS[params.task][1]) if params.elpv else sorted(table["label"].unique(), key=natural_key)


def split_table(params: Params, table: pd.DataFrame,
                copies: list[list[str]] | None = None) -> dict[str, pd.DataFrame]:
    """The seeded, stratified train/val/test split (the same for every notebook with the same seed); the copies
    of one picture (`helpers.data.identical_files`, found here when not given) stay together in one split, and
    so do the images of one subject when the data names them (``subject_col``)."""
    label_col = "stratum" if "stratum" in table.columns else "label"
    group_col = "group" if table["group"].notna().all() else None
    if copies is None:
        copies = identical_files(params.data_root, table["file"].tolist())
    return make_splits(table, label_col=label_col, group_col=group_col, seed=params.seed, copies=copies,
                       subject_col="subject" if "subject" in table.columns else None)


def class_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per class (and per group, when the data has groups), with totals."""
    if table["group"].notna().all():
        return pd.crosstab(table["label"], table["group"], margins=True, margins_name="total")
    return table["label"].value_counts().rename("images").to_frame()


def dataset_config(params: Params, classes: list[str]) -> dict:
    """What 02 writes to ``dataset.json`` for the later notebooks."""
    return {"root": str(params.data_root), "labels_csv": str(params.labels_csv) if params.labels_csv else None,
            "label_col": params.label_col, "group_col": params.group_col, "subject_col": params.subject_col,
            "file_col": params.file_col,
            "classes": list(classes), "task": params.task, "elpv": params.elpv, "seed": params.seed}


def check_dataset_params(params: Params, config: dict) -> None:
    """Raise when a dataset parameter set now differs from what notebook 02 split (``dataset.json``).

    Notebooks 03-05 read the split 02 wrote, so a new ``data_root`` (or label column, task ...)
    given to them alone would be shown in the parameter table but not used.
    """
    now = {"data_root": str(params.data_root), "labels_csv": str(params.labels_csv) if params.labels_csv else None,
           "file_col": params.file_col, "label_col": params.label_col, "group_col": params.group_col,
           "subject_col": params.subject_col, "task": params.task}
    then = {"data_root": config.get("root"), "labels_csv": config.get("labels_csv"),
            "file_col": config.get("file_col"), "label_col": config.get("label_col"),
            "group_col": config.get("group_col"), "subject_col": config.get("subject_col"),
            "task": config.get("task")}
    for name in now:
        if name not in params.user_set or _same_setting(name, now[name], then[name]):
            continue
        raise InputError(f"{name} is {now[name]!r} now, but notebook 02_prepare_dataset split the data with "
                         f"{then[name]!r} ({params.run / 'dataset.json'}): rerun notebooks/02_prepare_dataset.ipynb "
                         f"(and 03-05) with the new value, drop the parameter, or use a new run_name")


def _same_setting(name: str, a: object, b: object) -> bool:
    if name in ("data_root", "labels_csv") and a is not None and b is not None:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    return a == b


def load_datasets(params: Params, train_tf: Callable | None, eval_tf: Callable | None) -> dict:
    """The train/val/test ``ImageDataset``s of the split notebook 02 wrote (needs its outputs)."""
    from .data import ImageDataset

    config = read_json(params.run / "dataset.json", "02_prepare_dataset", ["root", "classes"])
    check_dataset_params(params, config)
    splits = load_splits(params.run)
    shared = overlapping_files(splits, config["root"])
    if shared:
        raise InputError(f"{params.run}: {len(shared)} image(s) occur in more than one split: {shared[:10]}; "
                         f"rerun notebooks/02_prepare_dataset.ipynb")
    straddling = shared_subjects(splits)
    if straddling:
        raise InputError(f"{params.run}: {len(straddling)} subject(s) have images in more than one split: "
                         f"{straddling[:10]}; rerun notebooks/02_prepare_dataset.ipynb")
    has_group = all(frame["group"].notna().all() for frame in splits.values())
    subject = "subject" if all("subject" in frame.columns for frame in splits.values()) else None
    columns = ["file", "label", "group"] + ([subject] if subject else [])
    out = {}
    for name, frame in splits.items():
        out[name] = ImageDataset(config["root"], frame[columns], group_col="group" if has_group else None,
                                 classes=config["classes"], transform=train_tf if name == "train" else eval_tf,
                                 subject_col=subject)
    return out


# ----------------------------------------------------------------------------------------
# Run-folder I/O


def require(path: str | os.PathLike, notebook: str) -> Path:
    """``path`` if it exists, else an error saying which notebook writes it."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} not found: run notebooks/{notebook}.ipynb first, with the same run_name "
                                f"and parameters (from the command line: python -m helpers.course --name "
                                f"{path.parent} --notebooks {notebook[:2]} ..., with the same -p values)")
    return path


def read_json(path: str | os.PathLike, notebook: str, keys: Sequence[str] = ()) -> dict:
    """Read a JSON object another notebook wrote, with at least ``keys``; a missing, damaged or incomplete one
    is an error that names the file and that notebook."""
    rerun = f"rerun notebooks/{notebook}.ipynb to write it again"
    try:
        content = json.loads(require(path, notebook).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # edited by hand, or copied in cut off
        raise InputError(f"{path} is not valid JSON ({err}); {rerun}") from err
    if not isinstance(content, dict):
        raise InputError(f"{path} holds a {type(content).__name__}, not the JSON object {notebook} writes; {rerun}")
    missing = [key for key in keys if key not in content]
    if missing:
        raise InputError(f"{path} lacks {missing}; {rerun}")
    return content


def interrupted_training(run: Path) -> bool:
    """True when notebook 04's training in ``run`` stopped before the end (killed, kernel restarted):
    ``last.pt`` exists but ``fit.json`` does not say ``finished``, which `fit` sets only at the end.
    Notebook 04 then passes ``resume=True`` to continue from ``last.pt``."""
    if not (run / "last.pt").is_file():
        return False
    summary = read_json(run / "fit.json", "04_fine_tune") if (run / "fit.json").is_file() else {}
    return summary.get("finished") is not True


def save_figure(fig: Figure, params: Params, name: str) -> None:
    """Save a matplotlib figure as ``<run>/figures/<name>.png``. Returns nothing, so that a notebook
    cell ending with this call shows the figure and not a file name."""
    path = params.run / "figures" / f"{name}.png"
    with files.atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")


# ----------------------------------------------------------------------------------------
# Environment


def environment() -> dict:
    """Where this notebook runs: Python, torch, device, GPU, CPU threads, Colab, smoke mode."""
    from .runtime import pick_device

    # matplotlib warns once per missing glyph and figure (dozens for a class name in another script); notebook 02
    # says it once instead (`lessons.font_note`).
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
    device = pick_device(None)
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "colab": "google.colab" in sys.modules,
            "smoke": is_smoke(), "workbook_root": str(workbook_root()),
            "offline_backbones": offline_backbones()}
    if device.type == "cpu":
        info["note"] = ("no GPU found: the course runs its CPU budget (smaller images, fewer epochs); "
                        "on Colab choose Runtime > Change runtime type > GPU for the full one")
    return info


# ----------------------------------------------------------------------------------------
# Budgets: what a notebook can afford on this machine (every value the user set wins)

CACHEABLE = ("head", "last_n", "truncate")  # strategies whose frozen prefix fit() can cache
CPU_UNCACHED_MAX_SIZE = 160  # backpropagating through the whole network at more pixels takes too long on a CPU
CPU_COMPARISON_SIZE, CPU_COMPARISON_IMAGES = 128, 600


def selection_metric(params: Params) -> str:
    """What selects models: macro-F1 for ELPV's four classes (rare classes would be ignored), else accuracy."""
    return "macro_f1" if params.task == "4class" else "accuracy"


def _native_size(backbone: str) -> int:
    from .models import BACKBONES, create_model

    return BACKBONES[backbone].input_size if backbone in BACKBONES else create_model(
        backbone, 2, pretrained=False).spec.input_size


def comparison_budget(params: Params, backbone: str) -> Budget:
    """Notebook 03's budget: the same for every strategy. GPU: the backbone's native size and all images;
    CPU: a subset at a reduced size, cached where the strategy allows; smoke: the tiny data."""
    from .selection import Budget

    native = _native_size(backbone)
    return Budget(
        image_size=pick(params.image_size, SMOKE_IMAGE_SIZE, min(native, CPU_COMPARISON_SIZE), native, params),
        epochs=pick(params.epochs, 1, 3, 5, params), batch_size=pick(params.batch_size, 16, 32, 64, params),
        lr=pick(params.lr, 1e-3, 1e-4, 1e-4, params), freeze_batchnorm=True,
        max_train=pick(None, None, CPU_COMPARISON_IMAGES, None, params),
        augment=pick(None, "none", "none", params.augment, params))


def training_budget(params: Params, strategy: str, backbone: str) -> dict:
    """Notebook 04's budget for ``strategy``, with the reason.

    GPU: native size, 15 epochs, the data's augmentation, fresh every epoch. CPU: strategies that freeze
    the early layers train at native size on cached features of a few augmented views; the others at
    most ``CPU_UNCACHED_MAX_SIZE`` px. Early stopping everywhere. Smoke: 64 px, 2 epochs.
    """
    native = _native_size(backbone)
    cached_cpu = strategy in CACHEABLE and params.device.type != "cuda" and not params.smoke
    budget = {
        "image_size": pick(params.image_size, SMOKE_IMAGE_SIZE, native if strategy in CACHEABLE
                           else min(native, CPU_UNCACHED_MAX_SIZE), native, params),
        "epochs": pick(params.epochs, 2, 10, 15, params),
        "batch_size": pick(params.batch_size, 16, 32, 64, params),
        "lr": pick(params.lr, 1e-3, 1e-4, 1e-4, params),
        "augment": params.augment,
        "cache": True if cached_cpu or params.smoke else "auto",
        "cache_views": 2 if cached_cpu else 1,
        "patience": pick(None, None, 3, 4, params),
        "metric": selection_metric(params),
        "freeze_batchnorm": True,
    }
    if params.smoke:
        budget["why"] = (f"TL_SMOKE=1: the small subset at {budget['image_size']} px for {budget['epochs']} "
                         f"epoch(s), to check that the code runs")
    elif params.device.type == "cuda":
        budget["why"] = (f"GPU ({params.device}): mixed precision, native {native} px, up to {budget['epochs']} "
                         f"epochs with fresh {params.augment!r} augmentation every epoch")
    elif cached_cpu:
        budget["why"] = (f"CPU: {strategy!r} freezes the early layers, so their outputs for {budget['cache_views']} "
                         f"augmented views of each image are computed once and cached; epochs then take seconds "
                         f"even at the native {budget['image_size']} px")
    else:
        budget["why"] = (f"CPU: {strategy!r} backpropagates through the whole network, so it trains at "
                         f"{budget['image_size']} px to finish in minutes")
    return budget


# ----------------------------------------------------------------------------------------
# The final model and its baselines


def load_split_tables(params: Params) -> dict[str, pd.DataFrame]:
    """The train / val / test tables notebook 02 wrote."""
    read_json(params.run / "dataset.json", "02_prepare_dataset")
    return load_splits(params.run)


def save_candidate(params: Params, model: TransferModel, classes: list[str], val: ImageDataset, metric: str,
                   history: pd.DataFrame | None = None, score: float | None = None) -> Path:
    """Write ``candidate.pt``: the strategy's model as it stands, the one the floor judges and may keep.

    After phase 2 that is the model after its **last** epoch (`fit(..., restore_best=False)`), not ``best.pt``:
    the best of several epochs, picked on the validation images the floor then compares it on, would be flattered
    by the pick. An equally good model would then replace the probe several times as often as the floor's two
    standard errors allow (`benchmarks/floor_check.py --selection`). ``score``: its validation score when known
    (truncate's classifier); else the last epoch's, from ``history``."""
    from .checkpoint import save_model

    if score is None:
        score = float(history[f"val_{metric}"].iloc[-1]) if history is not None and len(history) else None
    meta = {"task": params.task, "phase": 2 if history is not None else 1,
            **({"epochs": len(history)} if history is not None else {})}
    return save_model(model, classes, val.transform.preprocessing, params.run / CANDIDATE, meta=meta, score=score,
                      metric=metric, epoch=len(history) if history is not None else 0)


def validation_scores(params: Params, val: ImageDataset, metric: str, fine_tuned: bool,
                      device: str | torch.device | None = None) -> dict:
    """Score ``probe.pt`` and, when phase 2 (or a truncated head) produced one, ``candidate.pt`` on the same
    validation images, with the noise of the difference (`selection.floor_scores`): what `choose_final` decides on."""
    from .checkpoint import model_from_checkpoint
    from .data import unit_name, units_of
    from .evaluation import predict
    from .selection import floor_scores

    def predictions(name: str):
        model, _ = model_from_checkpoint(require(params.run / name, "04_fine_tune"))
        return predict(model, val, device=device)

    probe = predictions("probe.pt")
    tuned = predictions(CANDIDATE)["predicted"].to_numpy() if fine_tuned else None
    # Subjects, or pictures stored more than once, are resampled whole: their images are not independent evidence.
    scores = floor_scores(metric, probe["target"].to_numpy(), probe["predicted"].to_numpy(), tuned, units_of(val))
    return {**scores, "unit": unit_name(val)}


def choose_final(params: Params, scores: dict, metric: str, train_seconds: float, epochs: int = 0,
                 strategy: str | None = None) -> dict:
    """Write ``final.pt``: the strategy's model (``candidate.pt``) if it beats the linear probe (``probe.pt``) on
    validation by more than the noise, else the probe (the baseline: a tie goes to it); and
    ``final.json`` saying which, why and at what cost.

    ``scores`` is `validation_scores`' answer: ``probe``, ``fine_tuned`` (None when the strategy is the
    probe itself, ``head``), ``noise`` (two standard errors of their difference), ``n`` (images), and
    ``subjects`` and ``unit`` (how many groups were resampled whole, and of what: None without).
    ``strategy`` names the candidate in the explanation.
    """
    from .files import atomic_copy

    probe, tuned, noise = scores["probe"], scores["fine_tuned"], scores["noise"]
    candidate = f"The `{strategy}` model" if strategy else "The strategy's model"  # the final one may be the probe
    # With subjects (or copies) the noise comes from resampling them whole, which the sentence has to say.
    units, unit = scores.get("subjects"), scores.get("unit", "subject")
    images = (f"{scores['n']} images of {units} {unit}{'s' if units != 1 else ''}, "
              + ("resampled whole" if unit == "subject" else "each resampled with its copies")
              if units else f"{scores['n']} images")
    shown = "∞" if noise is not None and math.isinf(noise) else f"{noise:.3f}" if noise is not None else None
    if shown == "∞":  # one validation subject: nothing to resample
        images += f", all of one {unit}, so the noise cannot be measured and no difference counts as real"
    use_candidate = tuned is not None and tuned - probe > noise
    source = params.run / (CANDIDATE if use_candidate else "probe.pt")
    atomic_copy(source, params.run / "final.pt")  # fsynced before the rename, under a per-process temporary name
    name = metric.replace("_", " ")
    if tuned is None:
        explanation = "The strategy is `head`: the linear probe is the final model."
    elif use_candidate:
        explanation = (f"{candidate} reached validation {name} {tuned:.3f}, above the linear probe's "
                       f"{probe:.3f} by {tuned - probe:.3f}, more than the noise ({noise:.3f}: two standard errors "
                       f"of the difference on these {images}): it is the final model.")
    elif tuned > probe:
        explanation = (f"{candidate} reached validation {name} {tuned:.3f}, above the linear probe's "
                       f"{probe:.3f} by {tuned - probe:.3f}, but within the noise ({shown}: two standard "
                       f"errors of the difference on these {images}). A difference that could be luck "
                       f"goes to the baseline: the course keeps the probe as the final model, since a model "
                       f"has to show that it beats the baseline to replace it.")
    else:
        verdict = ("below it by more than the noise" if probe - tuned > noise else
                   "exactly the same score, a tie, and a tie goes to the baseline" if tuned == probe else
                   "a tie within the noise, and a tie goes to the baseline")
        explanation = (f"{candidate} reached validation {name} {tuned:.3f}, not above the linear "
                       f"probe's {probe:.3f} ({tuned - probe:+.3f}; two standard errors of the difference on these "
                       f"{images}: ±{shown}): {verdict}. The course keeps the probe (a classifier on "
                       f"the frozen backbone) as the final model.")
    if epochs == 0 and interrupted_training(params.run):
        # An earlier run's phase 2 stopped midway and this one trained none (head, or truncate's classifier):
        # that last.pt would make notebook 05 refuse this finished run. Keep it, under a name nothing resumes.
        os.replace(params.run / "last.pt", params.run / STALE_CHECKPOINT)
        explanation += (f" (An earlier run's interrupted phase 2 left `last.pt`; it is kept as "
                        f"`{STALE_CHECKPOINT}`.)")
    info = {"model": "fine-tuned" if use_candidate else "probe", "candidate": strategy,
            "augment": params.augment, "metric": metric,
            "val_probe": probe, "val_fine_tuned": tuned, "n_val": scores["n"],
            "noise": None if shown == "∞" else noise,  # JSON has no infinity: null, and the explanation says why
            "explanation": explanation, "epochs": int(epochs), "train_seconds": round(train_seconds, 2),
            "split": split_fingerprint(params.run), "finished": True}
    files.write_json(params.run / "final.json", info)
    return info


def evaluation_recipe(params: Params, final_info: dict) -> str:
    """The augmentation recipe notebook 05's test-time flips follow: the one notebook 04 trained with
    (``final.json``). An ``augment`` parameter set for 05 that differs from it is refused: the flips must
    be those the model was trained to ignore. A ``final.json`` from before the recipe was recorded: the
    parameter's recipe."""
    trained = final_info.get("augment")
    if trained is None:
        return params.augment
    if "augment" in params.user_set and params.augment != trained:
        raise InputError(f"augment is {params.augment!r} now, but notebook 04 trained with {trained!r} "
                         f"({params.run / 'final.json'}): rerun notebooks/04_fine_tune.ipynb with the new value, "
                         f"or drop the parameter")
    return trained


def finished_final(run: Path) -> dict:
    """``final.json`` of a finished notebook 04. A missing one, one left from an earlier run while the
    latest training was interrupted (a stale ``final.pt``), or one trained on another split than the
    run's split now (`check_same_split`), names 04 to run first."""
    if interrupted_training(run):
        raise RuntimeError(f"notebook 04_fine_tune did not finish in {run} ({run / 'fit.json'} does not say "
                           f"finished): run notebooks/04_fine_tune.ipynb first; it resumes from last.pt")
    info = read_json(run / "final.json", "04_fine_tune")
    check_same_split(info.get("split"), run, "final.json", "04_fine_tune")
    return info


def baselines(params: Params, sets: dict, device: str | torch.device | None = None) -> dict:
    """The majority class and the linear probe on the test split, and notebook 03's from-scratch control."""
    from .checkpoint import model_from_checkpoint
    from .evaluation import compute_metrics, predict
    from .probe import majority_baseline

    classes = list(sets["test"].classes)
    index = {name: i for i, name in enumerate(classes)}
    majority = majority_baseline(sets["train"].frame["label"].map(index), sets["test"].frame["label"].map(index))
    probe, _ = model_from_checkpoint(require(params.run / "probe.pt", "04_fine_tune"))
    probe_metrics = compute_metrics(predict(probe, sets["test"], device=device), classes)
    out = {"majority": {"class": classes[majority.pop("class_index")], **majority, "classes": len(classes)},
           "probe": {k: probe_metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}}
    strategy = read_json(params.run / "strategy.json", "03_choose_freezing")
    by_name = {row["strategy"]: row for row in strategy.get("comparison") or []}
    if "scratch" in by_name:
        pretrained_name, pretrained = max(((name, row["score"]) for name, row in by_name.items() if name != "scratch"),
                                          key=lambda item: item[1])
        protocol = strategy.get("protocol") or {}
        # 03 scored on the validation split, or with a small one by k-fold cross-validation on train + validation
        split = (f"{protocol['folds']}-fold CV on train + validation" if protocol.get("name") == "k-fold"
                 else "validation")
        out["scratch"] = {"score": by_name["scratch"]["score"], "pretrained_score": pretrained,
                          "pretrained_strategy": pretrained_name,
                          "split": split, "metric": selection_metric(params)}
    return out


def read_decision(params: Params) -> dict:
    """Notebook 01's ``decision.json``, refused when 01 decided for another task than this notebook runs
    (01 rerun with ``task = "4class"`` in the same run would otherwise hand its backbone to a binary split)."""
    decision = read_json(params.run / "decision.json", "01_analyze_approach", ["backbone"])
    if decision.get("task", params.task) != params.task:
        raise InputError(f"{params.run / 'decision.json'}: notebook 01 chose the backbone for task "
                         f"{decision['task']!r}, but this notebook runs task {params.task!r}: rerun "
                         f"notebooks/01_analyze_approach.ipynb with task={params.task!r}, or use a new run_name")
    return decision


def split_fingerprint(run: Path) -> str:
    """A short hash of notebook 02's split (``train.csv``, ``val.csv``, ``test.csv``): notebooks 03-05 record
    it with what they choose and train, and check it, so that a model is never scored on a newer split whose
    test images it may have trained on (02 rerun with another seed in the same run)."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("train.csv", "val.csv", "test.csv"):
        digest.update(require(run / name, "02_prepare_dataset").read_bytes())
    return digest.hexdigest()[:16]


def check_same_split(recorded: str | None, run: Path, what: str, notebook: str) -> None:
    """Raise when ``recorded`` (a `split_fingerprint` stored in ``what``) is not the run's split now."""
    if recorded is not None and recorded != split_fingerprint(run):
        raise InputError(f"{run / what} was made on another split than the one in {run} now (notebook 02 ran "
                         f"again since, e.g. with another seed): its test images may have been training images "
                         f"then. Rerun notebooks/{notebook}.ipynb and the notebooks after it, or use a new run_name")


# Notebook 04's setup as functions, shared with the command line (python -m helpers.train)


def prepare_split(params: Params) -> dict:
    """Notebook 02's split without its figures: the seeded, stratified ``train.csv``, ``val.csv``,
    ``test.csv`` and ``dataset.json`` in the run folder; returns what ``dataset.json`` holds."""
    from .data import save_splits

    table = label_table(params)
    config = dataset_config(params, classes_of(params, table))
    save_splits(split_table(params, table), params.run)
    files.write_json(params.run / "dataset.json", config)
    return config


def fine_tune_model(params: Params) -> tuple[TransferModel, dict]:
    """Notebook 04's model and budget: ``(model, training_budget(...))``.

    The backbone is the ``backbone`` parameter, else notebook 01's choice (``decision.json``); the
    strategy is the ``strategy`` parameter, else notebook 03's (``strategy.json``); the classes are
    notebook 02's (``dataset.json``). The new classifier's weights are seeded from ``params.seed``.
    """
    from .runtime import seed_everything
    from .selection import build_model

    backbone = params.backbone or read_decision(params)["backbone"]
    classes = read_json(params.run / "dataset.json", "02_prepare_dataset", ["classes"])["classes"]
    strategy = params.strategy
    if strategy is None:
        chosen = read_json(params.run / "strategy.json", "03_choose_freezing", ["strategy"])
        check_same_split(chosen.get("split"), params.run, "strategy.json", "03_choose_freezing")
        strategy = chosen["strategy"]
    seed_everything(params.seed)  # the new classifier's initial weights depend on it
    model = build_model(backbone, len(classes), strategy)
    return model, training_budget(params, strategy, backbone)


def fine_tune_datasets(params: Params, model: TransferModel, budget: dict) -> dict:
    """Notebook 04's datasets at the budget's image size: ``train`` with the budget's augmentation (phase
    2), ``train_plain`` without (phase 1, the probe), ``val`` and ``test`` with the evaluation transform."""
    from .transforms import eval_transform, train_transform

    size = budget["image_size"]
    plain = eval_transform(model, size, params.crop_pct)
    sets = load_datasets(params, train_transform(model, size, augment=budget["augment"], crop_pct=params.crop_pct),
                         plain)
    sets["train_plain"] = load_datasets(params, plain, plain)["train"]
    return sets


def fine_tune_settings(params: Params, budget: dict) -> dict:
    """Notebook 04's keyword arguments for phase 2's `helpers.training.fit`: the budget, the recipe
    (warm-up, layer decay, label smoothing, BatchNorm statistics kept, classes weighted as the probe weighs
    them for the task's metric), the run folder as ``out_dir``,
    and ``resume=True`` when a training there was interrupted."""
    return {"epochs": budget["epochs"], "lr": budget["lr"], "batch_size": budget["batch_size"], "seed": params.seed,
            "device": params.device, "out_dir": params.run, "metric": budget["metric"], "label_smoothing": 0.1,
            "layer_decay": 0.8, "warmup_epochs": 0.5, "patience": budget["patience"], "cache": budget["cache"],
            "cache_views": budget["cache_views"], "freeze_batchnorm": budget["freeze_batchnorm"],
            "class_weights": class_weighting(budget["metric"]), "meta": {"task": params.task, "phase": 2},
            "restore_best": False,  # the floor judges the last epoch: see `save_candidate`
            "resume": interrupted_training(params.run)}