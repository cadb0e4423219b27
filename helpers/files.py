"""Atomic file writes: every file the workbook writes appears whole or not at all.

Write to a temporary file in the same folder, flush it to disk, then rename it over the target.
``os.replace`` is atomic on POSIX and Windows, so a crash, a full disk or a SIGKILL at any moment
leaves either the old file or the new one, never half a file. On POSIX the folder is flushed too, so that
after a power loss the rename itself is on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pandas as pd


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


# What a file system answers when it cannot open or flush a folder (some network and FUSE mounts, such as a
# mounted cloud drive): the rename has happened and is as durable as that file system makes it.
_UNSYNCABLE_FOLDER = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR}


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (the rename) to disk. Windows cannot open a folder for this; NTFS journals
    renames itself."""
    if os.name == "nt":
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as err:
        if err.errno not in _UNSYNCABLE_FOLDER:  # anything else (EIO: the disk failed) is an error
            raise


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` over ``dst`` through `atomic_open`: the copy is on disk before the rename, so a crash leaves
    the old ``dst`` (or none), never a truncated one, and no temporary file."""
    with open(src, "rb") as source, atomic_open(dst, "wb") as target:  # src first: a missing one writes nothing
        shutil.copyfileobj(source, target, 1 << 20)
    return Path(dst)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _plain(obj: object) -> object:
    """numpy / torch / Path values as plain JSON types (``json.dumps``' ``default``)."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):  # tensors, without importing torch
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """Indented JSON, written atomically; numpy numbers, arrays, tensors and paths become plain
    values. NaN and infinity are refused (they are not JSON): use None for undefined values."""
    try:
        text = json.dumps(obj, indent=2, default=_plain, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"cannot write {path}: {err} (use None for undefined values)") from err
    return write_text(path, text + "\n")


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """A DataFrame as CSV (no index column), written atomically: readers never see half a file."""
    return write_text(path, frame.to_csv(index=False))
