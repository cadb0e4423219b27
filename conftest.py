"""Root pytest configuration: tests and notebooks run on the tiny dataset.

Notebooks read TL_SMOKE when nbval executes them (the kernel inherits this environment), so a
plain `python -m pytest` checks every lesson in minutes instead of running the real course.
"""

import os

os.environ.setdefault("TL_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
