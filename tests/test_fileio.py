"""Whole-file writes: a failed write names the file and leaves the old one; strict JSON."""

import errno
import json
import math
import os

import numpy as np
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


def test_write_json_is_strict_and_nan_for_null_inverts_it(tmp_path):
    obj = {
        "auroc": float("nan"),
        "ci": (np.float32(0.5), float("inf")),
        "n": np.int64(3),
        1: np.bool_(True),
    }
    path = tmp_path / "r.json"
    fileio.write_json(str(path), obj)
    text = path.read_text()
    # Python's own parser accepts NaN; a strict one (JavaScript, jq) does not: none may be written
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert back == {"auroc": None, "ci": [0.5, None], "n": 3, "1": True}
    again = fileio.nan_for_null(back)
    assert math.isnan(again["auroc"]) and again["ci"][0] == 0.5 and math.isnan(again["ci"][1])
