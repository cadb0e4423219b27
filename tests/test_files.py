"""helpers.files: whole files or none."""

import os
import shutil
import stat

import numpy as np
import pytest

from helpers import files
from helpers.files import atomic_copy


def test_atomic_copy_replaces_the_target_after_an_fsync_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 7, dtype=np.uint8).tobytes()  # over one chunk
    (tmp_path / "src.pt").write_bytes(data)
    (tmp_path / "final.pt").write_bytes(b"the old model")
    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)))
    assert atomic_copy(tmp_path / "src.pt", tmp_path / "final.pt") == tmp_path / "final.pt"
    # the file's bytes first, then (POSIX) its folder, which holds the rename
    assert (tmp_path / "final.pt").read_bytes() == data and synced == [False] + [True] * (os.name != "nt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "src.pt"]
    atomic_copy(tmp_path / "src.pt", tmp_path / "new" / "copy.pt")  # a missing folder is made
    assert (tmp_path / "new" / "copy.pt").read_bytes() == data


def test_a_failed_atomic_copy_leaves_the_old_target_and_no_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "src.pt").write_bytes(b"x" * 1000)
    (tmp_path / "final.pt").write_bytes(b"the old model")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        atomic_copy(tmp_path / "missing.pt", tmp_path / "final.pt")

    def half_then_full_disk(source, target, length=0):
        target.write(source.read(500))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_copy(tmp_path / "src.pt", tmp_path / "final.pt")
    assert (tmp_path / "final.pt").read_bytes() == b"the old model"
    assert sorted(os.listdir(tmp_path)) == ["final.pt", "src.pt"]


def test_a_folder_the_file_system_cannot_flush_does_not_undo_a_finished_write(tmp_path, monkeypatch):
    import errno

    def refuse_folders(fd):  # what some network and FUSE mounts answer for a folder
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(files.os, "fsync", refuse_folders)
    files.write_text(tmp_path / "a.txt", "written")
    assert (tmp_path / "a.txt").read_text() == "written"

    def failing_disk(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        files.write_text(tmp_path / "b.txt", "maybe lost")
