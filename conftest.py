"""Root pytest configuration: tests and notebooks run on the tiny dataset.

Notebooks read TL_SMOKE when nbval executes them (the kernel inherits this environment), so a
plain `python -m pytest` checks every lesson in minutes instead of running the real course.
"""

import os

# Forced, not a default: the suite is defined on the tiny data, and a TL_SMOKE=0 left in the shell would
# otherwise run the full course under nbval.
os.environ["TL_SMOKE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# No progress bars in the kernels nbval starts: each update would be an output to compare and keep.
os.environ.setdefault("TL_PROGRESS", "0")
