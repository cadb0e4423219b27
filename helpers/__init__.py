"""Reusable code of the transfer-learning workbook; the notebooks hold the narrative.

One module per concern: `models` (backbone registry), `data` (dataset, transforms, splits,
ELPV), `freezing` (the size x similarity guide), `training` (fit loop, frozen-prefix cache),
`checkpoint` (safe save/load), `files` (atomic writes), `evaluation`, `export`, `predict` (CLI),
`workbook` and `lessons` (notebook glue), `course` (papermill runner).
"""

import ctypes
import os
import platform

__version__ = "0.1.0"


def _keep_large_allocations_in_process() -> None:
    """Stop glibc from handing every large freed block back to the OS.

    By default glibc serves allocations above a few MB with mmap and unmaps them on free, so
    every batch's activations are page-faulted in afresh: on a CPU that costs more than the
    convolutions (measured on 2 cores, EfficientNet-Lite0 inference at 224 px, batch 64:
    22 img/s by default, 53 img/s with this). Raising the mmap and trim thresholds keeps freed
    blocks in the heap for reuse; the price is that the process keeps its peak memory.
    Set TL_DEFAULT_MALLOC=1 to leave glibc's defaults alone.
    """
    if platform.system() != "Linux" or os.environ.get("TL_DEFAULT_MALLOC") == "1":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc without this file: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, ctypes.c_int(1 << 30))
    libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))


_keep_large_allocations_in_process()
