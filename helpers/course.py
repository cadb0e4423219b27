"""Run the whole course, notebooks 01 -> 05, through papermill.

    python -m helpers.course                              # the course on ELPV, into runs/course/
    python -m helpers.course --smoke --name smoke         # 64 images, minutes (what CI checks)
    python -m helpers.course -p task 4class -p epochs 8   # any notebook parameter, validated
    python -m helpers.course --name sweep --grid lr=0.001,0.0003 image_size=128,160

Each notebook is executed with the same parameters; the executed copies are kept in the run
folder (``runs/<name>/01_analyze_approach.ipynb`` ...) next to what they wrote (splits,
decisions, checkpoints, metrics.json, figures). A grid runs one course per combination
(``runs/<name>-<key>=<value>...``) and collects their metrics into ``runs/<name>/grid.csv``
and ``grid.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd

from .errors import InputError
from .files import write_text
from .workbook import (NOTEBOOKS, TEXT_PARAMETERS, check_parameters, existing_outputs, is_smoke, run_folder, run_path,
                       workbook_root)

SUMMARY_KEYS = ("test_accuracy", "baseline_probe", "baseline_majority", "final_model", "candidate_strategy",
                "test_balanced_accuracy", "test_macro_f1", "test_roc_auc", "ece", "ece_after_temperature",
                "ece_by_chance", "tta_accuracy", "augment", "backbone", "strategy", "image_size", "epochs",
                "train_seconds")


def parse_value(text: str, key: str | None = None) -> object:
    """A command-line value as Python: None, bool, int, float, else the string itself.

    Paths and column names (`TEXT_PARAMETERS`) stay text, so ``-p data_root 2024`` is the
    folder 2024 and ``-p label_col 1e3`` the column "1e3"; ``-p augment none`` is the recipe "none"
    (``null`` gives None, the default).
    """
    lowered = text.strip().lower()
    if key == "augment" and lowered == "none":
        return "none"  # the recipe without augmentation, not None (None picks the recipe from the data)
    if lowered in ("none", "null"):
        return None
    if key in TEXT_PARAMETERS:
        return text
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def data_root_from_here(parameters: dict[str, object]) -> dict[str, object]:
    """``parameters`` with a relative ``data_root`` made absolute when it names a folder under the current
    directory: on the command line a path means what it means to the shell. (The notebooks run in
    ``notebooks/`` and resolve a relative path against the workbook's folder, which is kept otherwise.)"""
    root = parameters.get("data_root")
    if isinstance(root, str) and not Path(root).expanduser().is_absolute() and Path(root).is_dir():
        return {**parameters, "data_root": str(Path(root).resolve())}
    return parameters


def notebooks_dir() -> Path:
    return workbook_root() / "notebooks"


def notebook_parameters(names: tuple[str, ...] = NOTEBOOKS) -> dict[str, object]:
    """The parameters the notebooks declare (papermill.inspect_notebook), with their defaults."""
    import papermill

    found: dict[str, object] = {}
    for name in names:
        path = notebooks_dir() / f"{name}.ipynb"
        if not path.is_file():
            raise FileNotFoundError(f"notebook not found: {path}")
        for key, info in papermill.inspect_notebook(str(path)).items():
            found.setdefault(key, info["default"])
    return found


def validate(overrides: dict[str, object], valid: dict[str, object]) -> None:
    """Raise naming the unknown keys and listing the valid ones."""
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise InputError(f"unknown parameter(s) {unknown}; the notebooks' parameters are {sorted(valid)}")
    if "run_name" in overrides:
        raise InputError("set the run folder with --name, not -p run_name")


def expand_grid(specs: list[str]) -> list[dict[str, object]]:
    """``["lr=0.1,0.01", "epochs=3"]`` -> one dict per combination, in order."""
    axes, keys = [], []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        texts = [v for v in values.split(",") if v.strip()]
        if not sep or not key or not texts:
            raise InputError(f"grid entries look like KEY=V1,V2; got {spec!r}")
        axis = [(key, parse_value(v, key)) for v in texts]
        same = [texts[i] for i, (_, v) in enumerate(axis) if [w for _, w in axis].count(v) > 1]
        if same:  # 0.001 and 1e-3 are one value: two runs of it would share a folder
            raise InputError(f"grid key {key!r} lists the same value more than once: {same}")
        axes.append(axis)
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise InputError(f"a grid key appears twice: {keys}")
    return [dict(combo) for combo in itertools.product(*axes)]


def grid_run_name(base: str, combo: dict[str, object]) -> str:
    """A folder name derived from the values, e.g. ``sweep-lr=0.001-image_size=128``.

    Characters a folder name should not hold become ``_``; when that loses information
    (``set(a)`` and ``set[a]``, ``a b`` and ``a_b``), a short hash of the exact combination
    is appended, so distinct combinations never share a folder.
    """
    readable = f"{Path(base).name}-" + "-".join(f"{k}={v}" for k, v in combo.items())
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", readable)
    if name != readable:
        exact = json.dumps([[k, v] for k, v in combo.items()], default=repr)
        name += "-" + hashlib.sha1(exact.encode()).hexdigest()[:8]
    return str(Path(base).parent / name) if Path(base).is_absolute() else name


def kernel_config() -> dict:
    """Keyword arguments for papermill that encrypt the traffic to the notebook kernel.

    Without them, ipykernel 7 warns "Kernel is running over TCP without encryption" on every start.
    jupyter_client (8.10+) gives the kernel CurveZMQ keys when its kernelspec says it supports them
    ("auto"). With an older jupyter_client, or pyzmq built without Curve, the connection stays plain
    local TCP, as before.
    """
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if "transport_encryption" not in KernelManager.class_trait_names() or not zmq.has("curve"):
        return {}
    return {"config": Config({"KernelManager": {"transport_encryption": "auto"}})}


def input_error_names() -> set[str]:
    """The names of the exceptions that mean the user's input is wrong: `InputError` and its subclasses (a missing
    file the user named is a `MissingFileError`; a plain `FileNotFoundError` is a bug). A notebook's kernel raises
    them by name only (papermill passes on ``ename`` and ``evalue``)."""
    from . import data, export, predict  # noqa: F401  (they define InputError's subclasses)

    names, todo = set(), [InputError]
    while todo:
        error = todo.pop()
        names.add(error.__name__)
        todo += error.__subclasses__()
    return names


def run_course(name: str, parameters: dict[str, object] | None = None, smoke: bool = False,
               notebooks: tuple[str, ...] = NOTEBOOKS, progress: bool = True, overwrite: bool = False,
               log_output: bool = False) -> Path:
    """Execute ``notebooks`` in order with ``parameters``; return the run folder.

    ``log_output`` echoes every cell's output to the log as it runs (papermill's option; hundreds of
    lines); without it the executed copies hold the outputs and the console shows one line per notebook.

    The folder must be new, empty or one the workbook made (`helpers.workbook.run_folder`);
    ``overwrite=True`` writes into any folder. Outputs of an earlier run that these notebooks
    replace are listed first; an interrupted training resumes from ``last.pt`` (notebook 04).
    """
    import papermill

    parameters = dict(parameters or {})
    validate(parameters, notebook_parameters(notebooks))
    if smoke:
        os.environ["TL_SMOKE"] = "1"  # the kernels inherit it
    # No progress bars in the kernels (TL_PROGRESS=1 brings them back): the executed copy would
    # keep every update of every bar as an output.
    os.environ.setdefault("TL_PROGRESS", "0")
    run = run_folder(name, overwrite=overwrite)
    replaced = existing_outputs(run, notebooks)
    if replaced:
        print(f"[course] {run} exists: this run replaces {', '.join(replaced)}", flush=True)
    warned: list[str] = []
    for notebook in notebooks:
        started = time.perf_counter()
        print(f"[course] {notebook} -> {run / (notebook + '.ipynb')}", flush=True)
        try:
            papermill.execute_notebook(str(notebooks_dir() / f"{notebook}.ipynb"), str(run / f"{notebook}.ipynb"),
                                       parameters={"run_name": name, **parameters}, kernel_name="python3",
                                       cwd=str(notebooks_dir()), log_output=log_output, progress_bar=progress,
                                       **kernel_config())
        except papermill.PapermillExecutionError as err:
            try:  # what it warned of before stopping may be why it stopped; never in place of the error itself
                _echo_warnings(run, notebook, warned)
            except (OSError, ValueError) as unreadable:  # nbformat's errors for a broken file are ValueErrors
                print(f"[course]   {notebook}'s warnings cannot be read from its executed copy: {unreadable}")
            # Bad data found inside a notebook (a duplicated row, an unreadable image) is the user's to fix: one
            # line, as for a bad parameter. Anything else is a bug and keeps papermill's traceback.
            if err.ename not in input_error_names():
                raise
            # The last line: an error raised in a DataLoader worker arrives with the worker's traceback before it.
            message = (err.evalue or err.ename).strip().splitlines()[-1]
            raise InputError(f"{notebook} stopped: {message} (the executed copy, with the traceback: "
                             f"{run / (notebook + '.ipynb')})") from None
        print(f"[course] {notebook} done in {time.perf_counter() - started:.0f} s", flush=True)
        _echo_warnings(run, notebook, warned)
    if warned:
        print(f"[course] {len(warned)} warning(s) above; each is in its notebook's executed copy too", flush=True)
    return run


WARNING_LINE = re.compile(r"^\S.*?:\d+: (\w*Warning): (.*)$", re.MULTILINE)  # how Python prints a warning


def notebook_warnings(path: Path) -> list[str]:
    """The warnings an executed notebook printed (``Category: message``, each once, in order): files left out,
    a recipe kept against the evidence... In a batch run nobody reads the kernels' stderr, so the course
    repeats them."""
    import nbformat

    found: list[str] = []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found += [f"{kind}: {message}" for kind, message in WARNING_LINE.findall(output.get("text", ""))]
    return list(dict.fromkeys(found))


def _echo_warnings(run: Path, notebook: str, warned: list[str]) -> None:
    """Print the warnings of ``notebook``'s executed copy not printed yet (the same table warns in every notebook
    that reads it: once is enough), and add them to ``warned``."""
    for warning in notebook_warnings(run / f"{notebook}.ipynb"):
        if warning not in warned:
            warned.append(warning)
            print(f"[course]   {notebook} warned: {warning}", flush=True)


def read_metrics(run: Path) -> dict:
    """The headline values of a run's metrics.json (the strategy as its name)."""
    path = run / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: notebook 05_evaluate did not finish for this run")
    metrics = json.loads(path.read_text())
    row = {k: metrics.get(k) for k in SUMMARY_KEYS}
    if isinstance(row["strategy"], dict):
        row["strategy"] = row["strategy"].get("name")
    return row


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (numbers to 4 decimals)."""
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def run_grid(name: str, grid: list[dict[str, object]], parameters: dict[str, object], smoke: bool,
             notebooks: tuple[str, ...] = NOTEBOOKS, overwrite: bool = False, log_output: bool = False) -> pd.DataFrame:
    """One course per combination; the metrics of all of them in grid.csv and grid.md."""
    from .files import write_csv

    if "05_evaluate" not in notebooks:
        raise InputError("--grid collects each run's metrics.json, which 05_evaluate writes: include 05 in "
                         "--notebooks (or run the notebooks without --grid)")
    valid = notebook_parameters(notebooks)
    for combo in grid:
        validate({**parameters, **combo}, valid)
    names = [grid_run_name(name, combo) for combo in grid]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(f"grid combinations share run folders {clashes}; make their values distinct")
    out = run_folder(name, overwrite=overwrite)  # checked before hours of runs, not after
    rows = []
    for combo, sub in zip(grid, names, strict=True):
        run = run_course(sub, {**parameters, **combo}, smoke, notebooks, overwrite=overwrite, log_output=log_output)
        rows.append({"run": Path(sub).name, **combo, **read_metrics(run)})
    frame = pd.DataFrame(rows)
    write_csv(frame, out / "grid.csv")
    write_text(out / "grid.md", markdown_table(frame))
    return frame


# What `-p KEY VALUE` can set (helpers.workbook.PARAMETERS; a test keeps the two lists equal).
PARAMETERS_HELP = """\
notebook parameters (-p KEY VALUE; unset: the default for this machine and data):
  run_name      folder under runs/ (or an absolute path); --name sets it too
  data_root     your image folder (one subfolder per class, or with labels_csv); unset: ELPV
  labels_csv    CSV of file and label columns, relative to data_root or absolute
  file_col      its file column (default: file)
  label_col     its label column (default: label)
  group_col     optional subgroup column (scanner, site): splits balanced and results reported per group
  subject_col   optional column naming who/what each image shows (patient, specimen): kept in one split;
                ELPV: block (60 consecutive cells, a proxy for its unrecorded modules)
  task          ELPV: binary or 4class; your own data: custom (the default there)
  backbone      e.g. efficientnet_lite0 (offline), resnet50, timm/<name>; unset: notebook 01's pick
  strategy      head, last_n, initial, truncate or full; unset: notebook 03's choice
  image_size, epochs, batch_size, lr   budget overrides (they change 01's probe and 03's comparison too)
  augment       an augmentation recipe (helpers.transforms.AUGMENTATIONS); unset: notebook 02 decides
  seed          the split's and training's seed (default 0)
  device        auto, cpu, cuda or mps

example, your own images:
  python -m helpers.course --name mine -p data_root /data/my_images
  python -m helpers.course --name xray -p data_root /data/xray -p labels_csv labels.csv -p subject_col patient
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.course", description=__doc__, epilog=PARAMETERS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=None, help="run folder under runs/ (default: course, or smoke)")
    parser.add_argument("--smoke", action="store_true", help="TL_SMOKE=1: tiny data, minimal budget")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a notebook parameter, e.g. -p epochs 3 (repeatable)")
    parser.add_argument("--grid", nargs="+", default=None, metavar="KEY=V1,V2",
                        help="sweep: one run per combination of the values")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="NN",
                        help="run only these notebooks, by number (e.g. 04 05); earlier outputs must exist")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing folder the workbook did not create (its files may be replaced)")
    parser.add_argument("--log-output", action="store_true",
                        help="echo every cell's output as it runs (the executed copies keep it either way)")
    return parser


def select_notebooks(numbers: list[str] | None) -> tuple[str, ...]:
    if not numbers:
        return NOTEBOOKS
    by_number = {n[:2]: n for n in NOTEBOOKS}
    unknown = [n for n in numbers if n.zfill(2) not in by_number]
    if unknown:
        raise InputError(f"unknown notebook number(s) {unknown}; choose from {sorted(by_number)}")
    return tuple(by_number[n.zfill(2)] for n in sorted(numbers, key=lambda s: s.zfill(2)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime import tune_cpu

    tune_cpu()  # this process only; each notebook's setup cell tunes its own kernel
    # papermill logs each notebook's paths at INFO, and with --log-output every cell's output
    logging.basicConfig(level=logging.INFO if args.log_output else logging.WARNING, format="%(message)s")
    smoke = args.smoke or is_smoke()
    name = args.name or ("smoke" if smoke else "course")
    parameters = data_root_from_here({key: parse_value(value, key) for key, value in args.parameter})
    try:  # mistakes in the arguments themselves: a usage message, not a traceback
        notebooks = select_notebooks(args.notebooks)
        grid = expand_grid(args.grid) if args.grid else None
        run_path(name)
    except InputError as err:
        parser.error(str(err))
    try:  # the values too (an unknown backbone, weights that cannot load, a missing folder), before any kernel
        for combo in grid or [{}]:
            check_parameters({**parameters, **combo}, smoke)
    except InputError as err:  # MissingFileError and WeightsUnavailableError too (weights that cannot load here)
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        if grid:
            frame = run_grid(name, grid, parameters, smoke, notebooks, overwrite=args.overwrite,
                             log_output=args.log_output)
            print(f"\n[course] grid results ({run_path(name) / 'grid.csv'}):\n{markdown_table(frame)}")
        else:
            validate(parameters, notebook_parameters(notebooks))
            run = run_course(name, parameters, smoke, notebooks, overwrite=args.overwrite,
                             log_output=args.log_output)
            if "05_evaluate" in notebooks:
                summary = pd.Series(read_metrics(run), name=name)
                print(f"\n[course] results of {run}:\n{summary.to_string()}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[course] total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
