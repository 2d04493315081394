"""The shipped config files (`configs/` in a checkout, `ecgcl_jax/configs/` in an installed package).

`--config NAME` or `--config NAME:ARG` (no `/`, no `.py`, not an existing file) names a shipped config:
`--config cnn_attn_lstm`, `--config eval:clocs_cmsc`. Anything else is a path, as before. Config files import
each other as `from configs import base`; `import_configs()` makes that name resolve to the shipped folder
wherever the package is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types

from ecgcl_jax.errors import UserError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def shipped_dir() -> str:
    """The folder holding base.py, eval.py and the variants."""
    here = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(here, "configs")  # an installed wheel
    if os.path.isfile(os.path.join(inside, "base.py")):
        return inside
    return os.path.join(os.path.dirname(here), "configs")  # a checkout (plain or editable)


def names() -> list[str]:
    """The shipped configs' names, sorted."""
    d = shipped_dir()
    return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_"))


def import_configs() -> types.ModuleType:
    """The `configs` package (imported from the shipped folder unless already imported)."""
    mod = sys.modules.get("configs")
    if mod is not None:
        return mod
    d = shipped_dir()
    spec = importlib.util.spec_from_file_location(
        "configs", os.path.join(d, "__init__.py"), submodule_search_locations=[d]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["configs"] = mod
    spec.loader.exec_module(mod)
    return mod


def resolve(value: str) -> str:
    """A `--config` value with a shipped config's name replaced by its file path (`:ARG` kept)."""
    path, sep, arg = value.partition(":")
    if os.path.exists(path) or not _NAME.fullmatch(path):
        return value
    if path not in names():
        raise UserError(
            f"--config: {path} is neither a file nor a shipped config (shipped: {', '.join(names())})"
        )
    return os.path.join(shipped_dir(), f"{path}.py") + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
    """argv with `--config NAME[:ARG]` / `--config=NAME[:ARG]` resolved (`resolve`)."""
    out, i = list(argv), 1
    while i < len(out):
        a = out[i]
        if a in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
            i += 1
        elif a.startswith(("--config=", "-config=")):
            flag, _, v = a.partition("=")
            out[i] = f"{flag}={resolve(v)}"
        elif a == "--":
            break
        i += 1
    return out
