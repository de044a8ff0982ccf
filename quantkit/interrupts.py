"""Ctrl-C and SIGTERM unwind the same way: through every atomic writer's cleanup.

`kill`, `timeout` and container stops send SIGTERM, whose default action ends the process
on the spot and leaves a half-written temporary folder behind. Turned into an exception
(a KeyboardInterrupt, so every `except KeyboardInterrupt` and `finally` sees it), it
removes partial output exactly as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) arrived.

    A subclass, not KeyboardInterrupt itself: CPython remembers a plain KeyboardInterrupt
    that crosses any `PyRun_String` call (C extensions run Python code that way, e.g.
    through pybind11) and then, at exit, kills the process with SIGINT even after the
    exception was caught, turning quantkit's exit code 2 into -2. It checks the exact
    type, so a subclass is caught by every `except KeyboardInterrupt` and exits as told.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread like Ctrl-C."""


def _raise_interrupted(signum, frame):
    raise Interrupted()


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT raises Interrupted and SIGTERM raises Terminated (both KeyboardInterrupts)
    while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if previous[signal.SIGINT] in (signal.SIG_IGN, signal.SIG_DFL, None,
                                   signal.default_int_handler):
        signal.signal(signal.SIGINT, _raise_interrupted)
    if previous[signal.SIGTERM] in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
