"""Whole-file writes that never leave half a file, and name the file when they fail."""

from __future__ import annotations

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
