"""Whole-file writes that never leave half a file and name the file when they fail; strict JSON (no NaN)."""

from __future__ import annotations

import json
import math
import os


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of one.

    An OSError (a full disk, say) is raised with ``path`` as its filename, and the temporary file is removed.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(
            e.errno, e.strerror or str(e), path
        ) from None  # the file asked for, not the temporary one


def strict_json(x):
    """`x` as strict JSON holds it: NaN/inf -> None, numpy scalars -> Python, tuples -> lists, keys -> str."""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0:
        x = (
            x.item()
        )  # a numpy scalar (found without importing numpy: the commands import this early)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def nan_for_null(x):
    """The inverse of `strict_json` for numbers: None -> NaN, through dicts and lists."""
    if isinstance(x, dict):
        return {k: nan_for_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_for_null(v) for v in x]
    return math.nan if x is None else x


def write_json(path: str, obj, indent: int | None = 1) -> None:
    """`obj` as strict JSON (`strict_json`), written atomically (`atomic_write`)."""
    atomic_write(path, json.dumps(strict_json(obj), indent=indent, allow_nan=False).encode())
