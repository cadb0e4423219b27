"""Reusable code of the transfer-learning workbook; the notebooks hold the narrative.

One module per concern: `models` (backbone registry), `data` (dataset, transforms, splits,
ELPV), `freezing` (the size x similarity guide), `training` (fit loop, frozen-prefix cache),
`checkpoint` (safe save/load), `evaluation`, `course` (papermill runner), `predict` (CLI).
"""

__version__ = "0.1.0"
