"""Shared entry-point plumbing: distributed start-up, the stop request, and one-line user errors (no
tracebacks)."""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from typing import Any

from ecgcl_jax import preemption
from ecgcl_jax.errors import UserError


def fail(prog: str, e: Exception) -> int:
    """Print a UserError, or an OSError as "path: reason", as one line on stderr; returns the exit code 2.

    With ECGCL_JAX_TRACEBACK=1 in the environment an OSError's traceback comes first (to debug an OSError raised
    inside a library rather than by a path you gave).
    """
    if isinstance(e, OSError):  # an unwritable workdir, a full disk, a file that vanished
        if os.environ.get("ECGCL_JAX_TRACEBACK", "") not in ("", "0"):
            traceback.print_exception(e, file=sys.stderr)
        msg = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    else:
        msg = str(e)
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return 2


def run_entry(
    prog: str,
    fn: Callable[[preemption.StopRequest], dict],
    distributed: bool = False,
    coordinator: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> int:
    """Run ``fn(stop)`` with this process's stop request (SIGTERM/SIGINT route to it inside the run's blocks, see
    `preemption`) and map outcomes to exit codes: 0 done or preempted, 2 user error or OSError (`fail`)."""
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    try:
        if distributed or coordinator:
            from ecgcl_jax import parallel  # noqa: PLC0415

            parallel.initialize_distributed(coordinator, num_processes, process_id)
        fn(preemption.StopRequest(signals=True))
    except (UserError, OSError) as e:
        return fail(prog, e)
    except Exception as e:  # noqa: BLE001 - a full disk inside a library (orbax) arrives as its own error type
        if not _disk_full(e):
            raise
        print(
            f"{prog}: error: no space left on device ({_last_line(e)[:300]}); free some and run the same command "
            "again: it resumes from the last complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before the first step; nothing to save", file=sys.stderr)
        return 130
    finally:
        preemption.release_early_stop_signals()
    return 0


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` or an exception in its chain is ENOSPC (orbax reports it as ValueError: RESOURCE_EXHAUSTED)."""
    seen = 0
    while e is not None and seen < 20:
        if (
            getattr(e, "errno", None) == 28
            or "No space left on device" in str(e)
            or "os_error_code='28'" in str(e)
        ):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {
        os.path.abspath(paths[k])
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
        if k in paths
    }
    return tuple(dirs | {os.path.dirname(os.path.abspath(__file__))})


def _user_frame(e: BaseException):
    """The innermost traceback frame of ``e`` outside Python's and the installed libraries' files, or None."""
    libs = _library_dirs()
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if not f.filename.startswith("<")
        and "-packages" not in f.filename
        and not os.path.abspath(f.filename).startswith(libs)
    ]
    return frames[-1] if frames else None


def _config_error(e: BaseException) -> str:
    """One line for an exception raised while absl parsed --config / --config.* (file code or override)."""
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}"
    frame = _user_frame(e)
    if frame is not None:  # code in the config file raised: name its file and line
        return f"{frame.filename}:{frame.lineno}: {type(e).__name__}: {_last_line(e)}"
    # an override naming no field
    if isinstance(e, AttributeError) and isinstance(e.__context__, KeyError):
        lines = str(e.__context__.args[0] if e.__context__.args else "").splitlines() or ["?"]
        hint = " ".join(ln.strip() for ln in lines[1:])
        hint = f"; {hint[0].lower()}{hint[1:]}" if hint else ""
        return f"--config.* override: the config has no field {lines[0]}{hint}"
    return f"{type(e).__name__}: {_last_line(e)}"


def _innermost(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """An absl `app.run(flags_parser=...)` that turns flag and config-file errors into one line and exit code 2."""
    from absl import flags  # noqa: PLC0415

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            inner = _innermost(e)
            # the config file's code, wrapped
            if isinstance(inner, SyntaxError) or _user_frame(inner) is not None:
                msg = _config_error(inner)
            else:
                msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        except Exception as e:  # noqa: BLE001 - the config file's own code, or an override of a missing field
            msg = _config_error(e)
        print(f"{os.path.basename(prog)}: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)

    return parse


def config_value(holder, reference: Callable[[], Any] | None = None) -> Any:
    """The ConfigDict of a DEFINE_config_file flag; UserError when the file could not be loaded (ml_collections
    defers that error to the first use of the config), or when it lacks a field that `reference()` (the
    project's own config of that kind) has: a config written for an older version would fail deep inside."""
    cfg = holder.value
    try:
        cfg.keys()
    except OSError as e:
        raise UserError(f"--config: {_last_line(e)}") from None
    if reference is not None:
        from absl import flags  # noqa: PLC0415
        from ml_collections import config_flags  # noqa: PLC0415

        from ecgcl_jax import configdiff  # noqa: PLC0415

        have, want = configdiff.flatten(cfg.to_dict()), configdiff.flatten(reference().to_dict())
        missing = sorted(
            k for k in want if k not in have and not any(h.startswith(k + ".") for h in have)
        )
        if missing:
            path = config_flags.get_config_filename(flags.FLAGS[holder.name])
            raise UserError(
                f"{path}: the config lacks field(s) {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''} (written for another version? every field is declared "
                "in configs/base.py)"
            )
    return cfg
