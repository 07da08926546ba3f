"""SIGINT and SIGTERM held off the short stretches of work that a stop must not cut in two."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# CPython's C-level handler only notes a signal; the Python handler runs when the main thread is back in
# the interpreter. A signal that lands between that check and a blocking system call is handled only when
# the call returns, which may be never (a read from a pipe whose writer is stuck). So no wait of the main
# thread blocks longer than this before it looks again.
SIGNAL_CHECK_SECONDS = 0.1


@contextmanager
def stop_signals_held(on_signal: Callable[[], None] | None = None) -> Iterator[None]:
    """While the block runs, a SIGINT or SIGTERM is only noted (and `on_signal` called); it is delivered again,
    to the handlers that were there before, when the block ends.

    For a few lines that must run whole, such as forking a child and recording its pid. Python runs signal
    handlers on the main thread only (whichever thread the kernel picked), so blocking signals with a mask
    would not do, and on any other thread there is nothing to hold: this does nothing there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signum)
        if on_signal is not None:
            on_signal()

    previous = {signum: signal.signal(signum, note) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if noted:
            signal.raise_signal(noted[0])
