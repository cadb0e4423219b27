"""Reusable code of the transfer-learning workbook; the notebooks hold the narrative.

One module per concern: `models` (backbone registry), `transforms` (the preprocessing spec and
its transforms), `data` (reading images, label tables, splits, ELPV), `freezing` (strategies and
the size x similarity guide), `runtime` (device, precision, loaders, seeds, CPU tuning),
`training` (the loop and `fit`), `cache` (the frozen-prefix cache), `distributed` (`fit` under
torchrun), `metrics`, `checkpoint` (safe save/load), `files` (atomic writes), `errors` (`InputError`,
what the entry points print as one line), `probe` (the linear probe), `selection` (comparing strategies,
the two-phase recipe), `evaluation`, `export`, `predict` (CLI),
`workbook` and `lessons` (notebook glue), `solutions` (the exercises' checks), `course` (papermill
runner), `train` (notebook 04 as a command, one process or many), `notebook_cells` (the setup cell
and Colab badge every notebook shares).

Importing the package changes nothing in the process; `helpers.runtime.tune_cpu()` is the one
explicit call that tunes memory allocation and OpenCV threads for CPU work.
"""

__version__ = "0.2.0"  # the same as pyproject.toml's version (a test checks)
