"""Shared entry-point plumbing: distributed start-up and one-line user errors (no tracebacks)."""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Callable

from ecgcl_jax.errors import UserError


@contextlib.contextmanager
def on_stop_signals(handler: Callable):
  """Route SIGTERM and SIGINT to ``handler(signum, frame)`` inside the block, then restore the old handlers
  (a no-op off the main thread, where Python cannot install handlers)."""
  old = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
      pass
  try:
    yield
  finally:
    for sig, h in old.items():
      signal.signal(sig, h)


def run_entry(prog: str, fn: Callable[[], dict], workdir: str, distributed: bool = False,
              coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> int:
  """Run ``fn`` and map outcomes to exit codes: 0 done or preempted, 2 user error."""
  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  try:
    if distributed or coordinator:
      from ecgcl_jax import parallel  # noqa: PLC0415
      parallel.initialize_distributed(coordinator, num_processes, process_id)
    fn()
  except UserError as e:
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted before the first step; nothing to save", file=sys.stderr)
    return 130
  return 0
