"""Whole-file writes: a failed write names the file and leaves the old one."""

import errno
import os

import pytest

from ecgcl_jax import fileio


def test_a_failed_whole_file_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    # a full disk showed "No space left on device" without a path, and left an empty results.md behind
    path = tmp_path / "results.md"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError) as e:
        fileio.atomic_write(str(path), b"new")
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == [
        "results.md"
    ]  # no temporary file left
