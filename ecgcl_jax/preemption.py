"""Stop requests: how SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C) reach a run.

The entry point (`cli.run_entry`) creates one `StopRequest(signals=True)` and passes it to the run; library code
only reads it and enters its two blocks:

  deferred()      pretraining: a stop sets a flag; the loop finishes its step, checkpoints and returns.
  interrupting()  an evaluation outside pretraining: a stop raises `Interrupted` at once (finished repeats are on
                  disk; a repeat in progress runs again).

A request made without signals (the default of the library functions) is never requested: a Python caller that
wants preemption passes `StopRequest(signals=True)`. Standard library only: the commands import it before JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_EARLY_SIGNALS: list[int] = []  # stop signals received before a run's block installed its handler
_DEFAULT_HANDLERS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


class Interrupted(Exception):
    """A stop request inside an `interrupting()` block; the message is the signal's name."""


class StopRequest:
    """Whether the run was asked to stop (`requested`, by signal `signum`), and whether it acted on it (`acted`:
    the pretraining loop checkpointed and returned). signals=True: SIGTERM and SIGINT are routed to this request
    inside its blocks (a no-op off the main thread, where Python cannot install handlers)."""

    def __init__(self, signals: bool = False):
        self.signals = signals
        self.requested, self.acted, self.signum = False, False, None
        self._raising = False  # inside interrupting() and not inside a nested deferred()

    def request(self, signum: int | None = None) -> None:
        """Ask the run to stop (what a stop signal does)."""
        self.requested, self.signum = True, signum
        if self._raising:
            raise Interrupted(_name(signum))

    @contextlib.contextmanager
    def deferred(self):
        """Inside, a stop request only sets the flag. One that came after the loop's last check (during a final
        save or export) is raised as `Interrupted` on exit when an enclosing interrupting() block waits for it."""
        outer = self._raising
        self._raising = False
        try:
            with self._routed():
                yield self
        finally:
            self._raising = outer
        if outer and self.requested and not self.acted:
            raise Interrupted(_name(self.signum))

    @contextlib.contextmanager
    def interrupting(self):
        """Inside, a stop request raises `Interrupted` at once (also one that came before the block)."""
        outer = self._raising
        self._raising = True
        try:
            with self._routed():
                if self.requested and not self.acted:
                    raise Interrupted(_name(self.signum))
                yield self
        finally:
            self._raising = outer

    def _routed(self):
        return on_stop_signals(self._handle) if self.signals else contextlib.nullcontext()

    def _handle(self, signum, frame):
        self.request(signum)


def _name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "stop requested"


# ------------------------------------------------------------------------------------- signal routing
def _hold(signum, frame):
    if _EARLY_SIGNALS:  # a second one while starting: stop now, the way the signal stops a process (nothing to save)
        # (an exception raised here can land in a callback that swallows it, e.g. a garbage-collection hook)
        print(
            f"received {signal.Signals(signum).name} again; stopping now (nothing to save yet)",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _EARLY_SIGNALS.append(signum)
    print(
        f"received {signal.Signals(signum).name} while starting; stopping at the first point where a checkpoint or "
        "finished repeat keeps the work (send it again to stop at once)",
        file=sys.stderr,
        flush=True,
    )


def hold_early_stop_signals() -> None:
    """Until a run's first routed block: a SIGTERM/SIGINT is remembered instead of killing the process (exit 143
    and no word, while Python imports JAX), and the block's handler receives it when installed; a second one stops
    at once. The block restores the default handlers, not the hold."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _hold)


def release_early_stop_signals() -> None:
    """Default SIGTERM/SIGINT handling again where the hold is still installed (no routed block was entered)."""
    for sig, default in _DEFAULT_HANDLERS.items():
        try:
            if signal.getsignal(sig) is _hold:
                signal.signal(sig, default)
        except ValueError:  # not the main thread
            pass
    _EARLY_SIGNALS.clear()


@contextlib.contextmanager
def on_stop_signals(handler):
    """Route SIGTERM and SIGINT to ``handler(signum, frame)`` inside the block, then restore the old handlers
    (a no-op off the main thread). A signal held by hold_early_stop_signals is passed to the handler on entry,
    and the hold itself is not restored."""
    old = {}
    for sig in STOP_SIGNALS:
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        while old and _EARLY_SIGNALS:
            handler(_EARLY_SIGNALS.pop(0), None)
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, _DEFAULT_HANDLERS[sig] if h is _hold else h)
