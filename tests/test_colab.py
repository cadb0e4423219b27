"""Colab, simulated: notebook 01 opened alone in a fresh runtime bootstraps the workbook and runs.

What a Colab runtime has and lacks, and how each is reproduced here:

- **No `helpers`, but torch & co.** A virtual environment *without* system site-packages whose one
  ``.pth`` file lists the system site-packages folders as plain paths. Python appends such paths to
  ``sys.path`` but does not run the ``.pth`` files inside them, so everything installed is importable
  except the workbook's own editable install (a ``.pth`` hook in system site-packages, pointing at
  whichever checkout ran ``pip install -e .``). A ``--system-site-packages`` venv would run that hook,
  and a clean PYTHONPATH alone would not stop it. The test first checks that ``helpers`` really is
  not importable there.
- **`google.colab` imported at start.** A stub package on PYTHONPATH, imported by an IPython startup
  file (Colab's kernel imports the real one), so the setup cell's ``"google.colab" in sys.modules``
  holds.
- **An empty working directory** for the kernel, as /content is.
- **The repository** is this checkout's HEAD, as ``TL_REPO_URL=file://...``: the setup cell clones it
  with ``git clone --depth 1`` (committed files only).
- **pip offline and cheap**: ``PIP_NO_INDEX`` and no build isolation, through pip's own environment
  variables. Every requirement is already installed (visible through the plain paths), so pip
  resolves ``requirements-colab.txt`` without a network and only builds the editable install of the
  clone into the venv. Nothing is mocked.

The kernel then executes this checkout's notebook 01 (its setup cell is the one under test): the
setup cell clones, installs and imports ``helpers`` from the clone, moves into the clone's
notebooks/ folder, and the rest of 01 runs there in smoke mode (TL_SMOKE=1). About a minute on 2 cores.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.notebook_cells import output_problems

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the simulated runtime is a POSIX venv")

# Appended to the notebook: where helpers came from and where the notebook ran, as one JSON line.
PROBE = """\
import json, os, sys, helpers
print(json.dumps({"helpers": helpers.__file__, "cwd": os.getcwd(), "root": str(workbook.workbook_root()),
                  "colab": "google.colab" in sys.modules}))"""


def _git_head() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if out.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: the simulation clones its HEAD")
    return out.stdout.strip()


def _system_site_packages() -> list[str]:
    """The folders this interpreter installs into (not sys.path, which may hold this checkout)."""
    import site
    import sysconfig

    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(f for f in folders if os.path.isdir(f)))


def _fresh_runtime(base: Path) -> tuple[Path, dict]:
    """A venv without helpers, a google.colab stub and a kernelspec; returns (python, kernel env)."""
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(site_dir, "system_packages.pth").write_text("\n".join(_system_site_packages()) + "\n")

    stub = base / "stub" / "google" / "colab"  # a namespace package "google", as on Colab
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab module."""\n')
    startup = base / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # Colab's kernel imports it at start\n")
    spec = base / "jupyter" / "kernels" / "colab-sim"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "simulated Colab", "language": "python"}))

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "TL_", "VIRTUAL_ENV", "JUPYTER"))}
    env.update({
        "PYTHONPATH": str(base / "stub"), "IPYTHONDIR": str(base / "ipython"), "MPLBACKEND": "Agg",
        "TL_SMOKE": "1", "TL_REPO_URL": ROOT.as_uri(),
        # pip: no index (all requirements are installed), no isolated build environment to download,
        # no version check. pip reads PIP_NO_BUILD_ISOLATION=0 as "build_isolation = False".
        "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    })
    return python, env


def test_setup_cell_bootstraps_the_workbook_on_a_fresh_colab_runtime(tmp_path, monkeypatch):
    head = _git_head()
    started = time.perf_counter()
    python, env = _fresh_runtime(tmp_path)
    content = tmp_path / "content"  # the runtime's empty working directory
    content.mkdir()
    found = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('helpers'))"],
                           cwd=content, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert found == "None", f"helpers is importable before the setup cell ran ({found}): not a fresh runtime"

    nb = nbformat.read(ROOT / "notebooks" / "01_analyze_approach.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # where the kernelspec is found
    client = NotebookClient(nb, kernel_name="colab-sim", timeout=300, startup_timeout=120,
                            resources={"metadata": {"path": str(content)}})
    try:
        client.execute(env=env)
    finally:  # the executed copy, for reading when an assertion fails
        nbformat.write(nb, tmp_path / "01_executed.ipynb")
    seconds = time.perf_counter() - started

    clone = content / "workbook"
    cloned = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert cloned.stdout.strip() == head, "the setup cell did not clone TL_REPO_URL"
    probe = json.loads(nb.cells[-1].outputs[-1].text)
    assert probe["colab"] is True
    assert Path(probe["helpers"]).resolve() == (clone / "helpers" / "__init__.py").resolve()
    assert Path(probe["cwd"]).resolve() == (clone / "notebooks").resolve()
    assert Path(probe["root"]).resolve() == clone.resolve()
    decision = json.loads((clone / "runs" / "smoke" / "decision.json").read_text())
    assert decision["backbone"] and decision["strategy"]
    setup = next(cell for cell in nb.cells if cell.cell_type == "code")
    setup_output = "".join(o.get("data", {}).get("text/plain", "") for o in setup.outputs)
    assert "'colab': True" in setup_output and "'smoke': True" in setup_output

    # pip installed the clone: a new process of that runtime imports helpers from it.
    installed = subprocess.run([str(python), "-c", "import helpers; print(helpers.__file__)"], cwd=content,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(installed).resolve() == (clone / "helpers" / "__init__.py").resolve()
    # What the learner sees: no warnings (IProgress, pip, Python) and no flood of output lines.
    assert output_problems(nb) == []
    assert seconds < 240, f"the simulated Colab run took {seconds:.0f} s"
