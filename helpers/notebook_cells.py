"""The cells every notebook shares, written from one source: the "Open in Colab" badge and the setup cell.

Set `REPOSITORY` to the workbook's public GitHub address, then rewrite the notebooks::

    python -m helpers.notebook_cells            # rewrite the badge and the setup cell of notebooks/*.ipynb
    python -m helpers.notebook_cells --check    # only list the notebooks that differ (exit status 1)

The badge goes under the title of each notebook's first markdown cell; the setup cell is each notebook's
first code cell. Nothing else in a notebook changes. ``tests/test_notebook_cells.py`` fails when a
notebook differs from what this module writes, so the five copies cannot drift apart.

`output_problems` lists what a reader should not find in an executed notebook: warnings and bursts of
progress-bar updates.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from .files import atomic_open

# The workbook's public repository (https, no ".git"). Colab links and the setup cell's clone use it;
# the environment variable TL_REPO_URL overrides it for the clone (a fork, a mirror, a local test).
REPOSITORY = "https://github.com/YOUR-ACCOUNT/transfer-learning-workbook"
BRANCH = "main"
PLACEHOLDER = "YOUR-ACCOUNT"  # the setup cell refuses to clone while REPOSITORY still holds it
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

# The first code cell of every notebook. Locally `helpers` is installed (pip install -e .) and the cell
# only imports it. On Colab, where only the notebook file arrives, it clones the repository next to the
# notebook, installs what Colab lacks (requirements-colab.txt: Colab brings torch and torchvision) and
# the workbook itself, and moves into its notebooks/ folder, where the other notebooks expect to run.
SETUP_CELL = '''\
# Setup: imports the workbook's helpers; on Colab it first clones and installs the workbook.
import os, subprocess, sys
REPOSITORY = os.environ.get("TL_REPO_URL", "{repository}")
if "google.colab" in sys.modules and not os.path.isfile("../helpers/__init__.py"):
    if "{placeholder}" in REPOSITORY:
        raise RuntimeError("set the workbook's repository first: %env TL_REPO_URL=https://github.com/...")
    if not os.path.isdir("workbook"):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPOSITORY, "workbook"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--root-user-action=ignore", "-r",
                    "workbook/requirements-colab.txt", "-e", "workbook"], check=True)  # Colab brings torch
    sys.path.insert(0, os.path.abspath("workbook"))  # pip's path hook only acts in new processes
    os.chdir("workbook/notebooks")
from helpers import runtime, workbook  # locally: `pip install -r requirements.txt -e .` once
runtime.tune_cpu()  # faster CPU memory reuse, one OpenCV thread per loader
workbook.environment()'''

MAX_OUTPUT_LINES = 50  # per cell of an executed notebook: more is noise, not a lesson
# Text that must not reach an executed notebook's stderr (tqdm without ipywidgets, Python warnings).
UNWANTED_STDERR = ("IProgress", "Warning")


def setup_source(repository: str = REPOSITORY) -> str:
    """The source of the setup cell, cloning ``repository`` unless TL_REPO_URL says otherwise."""
    return SETUP_CELL.format(repository=repository, placeholder=PLACEHOLDER)


def github_path(repository: str = REPOSITORY) -> str:
    """``account/name`` of a GitHub https address; ValueError for anything else (Colab opens GitHub only)."""
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", repository)
    if not match:
        raise ValueError(f"REPOSITORY must be https://github.com/<account>/<name>, got {repository!r}")
    return f"{match[1]}/{match[2]}"


def colab_url(notebook: str, repository: str = REPOSITORY, branch: str = BRANCH) -> str:
    """The address that opens ``notebook`` (a path inside the repository) in Colab."""
    return f"https://colab.research.google.com/github/{github_path(repository)}/blob/{branch}/{notebook}"


def badge(notebook: str, repository: str = REPOSITORY) -> str:
    """The markdown "Open in Colab" badge line for ``notebook``."""
    return f"[![Open in Colab]({BADGE_IMAGE})]({colab_url(notebook, repository)})"


def with_badge(markdown: str, line: str) -> str:
    """``markdown`` with ``line`` as its only badge: under the title heading, or first if there is none."""
    lines = [text for text in markdown.split("\n") if BADGE_IMAGE not in text]
    if lines and lines[0].startswith("#"):
        title, rest = lines[0], lines[1:]
        while rest and not rest[0].strip():
            rest.pop(0)
        return "\n".join([title, "", line, *([""] + rest if rest else [])])
    return "\n".join([line, "", *lines])


def _setup_cell(nb: nbformat.NotebookNode, path: Path) -> nbformat.NotebookNode:
    cell = next((c for c in nb.cells if c.cell_type == "code"), None)
    # Overwrite only a cell that is a setup cell: a lesson cell moved to the top must not be lost.
    if cell is None or "from helpers import" not in cell.source:
        raise ValueError(f"{path}: the first code cell is not the setup cell (it must import helpers); "
                         f"move the setup cell to the top, then rerun python -m helpers.notebook_cells")
    return cell


def sync_notebook(path: str | Path, root: str | Path, write: bool = True) -> list[str]:
    """Bring ``path``'s badge and setup cell in line with this module; return what differed.

    ``root`` is the repository root (the badge names the notebook by its path inside it). With
    ``write=False`` nothing is written. Outputs and the execution count of the setup cell are cleared.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    differences = []
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is None:
        raise ValueError(f"{path}: no markdown cell to carry the Open in Colab badge")
    line = badge(Path(path).resolve().relative_to(Path(root).resolve()).as_posix())
    if with_badge(first.source, line) != first.source:
        differences.append("badge")
        first.source = with_badge(first.source, line)
    cell = _setup_cell(nb, path)
    if cell.source != setup_source() or cell.outputs or cell.execution_count is not None:
        differences.append("setup cell")
        cell.source, cell.outputs, cell.execution_count = setup_source(), [], None
    if differences and write:
        with atomic_open(path, "w") as handle:  # an interrupted rewrite never leaves half a notebook
            nbformat.write(nb, handle)
    return differences


def sync_all(root: str | Path | None = None, write: bool = True) -> dict[str, list[str]]:
    """`sync_notebook` for every notebook in ``root``/notebooks; the notebooks that differed."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    paths = sorted((root / "notebooks").glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks in {root / 'notebooks'}")
    changed = {p.name: sync_notebook(p, root, write) for p in paths}
    return {name: what for name, what in changed.items() if what}


def output_problems(nb: nbformat.NotebookNode, max_lines: int = MAX_OUTPUT_LINES) -> list[str]:
    """What a reader should not meet in an executed notebook: a cell whose outputs run past
    ``max_lines`` lines (a progress bar saves every update), or stderr naming a warning."""
    problems = []
    for index, cell in enumerate(nb.cells):
        lines = 0
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                text = output.text
                if output.name == "stderr":
                    problems += [f"cell {index}: stderr has {word!r}: {text.strip()[:200]!r}"
                                 for word in UNWANTED_STDERR if word in text]
            elif output.output_type == "error":
                text = "\n".join(output.get("traceback", []))
            else:  # rich outputs: count what a text-only reader sees
                text = output.get("data", {}).get("text/plain", "")
            lines += len(re.split(r"[\r\n]+", text.strip("\r\n"))) if text.strip() else 0
        if lines > max_lines:
            problems.append(f"cell {index}: {lines} output lines (at most {max_lines})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.notebook_cells", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook differs")
    args = parser.parse_args(argv)
    changed = sync_all(write=not args.check)
    for name, what in changed.items():
        print(f"{name}: {' and '.join(what)} {'differ' if args.check else 'rewritten'}")
    if args.check and changed:
        print("run `python -m helpers.notebook_cells` to rewrite them", file=sys.stderr)
        return 1
    if not changed:
        print("all notebooks carry the canonical badge and setup cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
