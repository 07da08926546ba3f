"""Progress of long work (a dump, a restore, a big copy) on stderr, only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

_INTERVAL_SECONDS = 0.5


@contextmanager
def show_progress(label: str, measure: Callable[[], int], total: int | Callable[[], int | None] | None,
                  enabled: bool) -> Iterator[None]:
    """While the block runs, redraw `label: done of total, elapsed, time left` on stderr twice a second.

    `measure` returns the bytes done so far (e.g. the size of a dump being written); `total` is an
    estimate, or None when there is none, or a function giving it once it is known (a push learns what
    it has to send only after asking the remote). Nothing is shown unless `enabled` and stderr is a terminal,
    so cron mail, CI logs and --json output never see it.
    """
    if not enabled or not sys.stderr.isatty():
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def draw() -> None:
        while not stop.wait(_INTERVAL_SECONDS):
            try:
                done = measure()
            except Exception:  # noqa: BLE001 - a failed measurement must never disturb the work itself
                continue
            expected = total() if callable(total) else total
            sys.stderr.write("\r\033[K" + describe(label, done, expected, time.monotonic() - started))
            sys.stderr.flush()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def describe(label: str, done: int, total: int | None, elapsed: float) -> str:
    """One progress line: `pushing X: 120.0 of 450.0 MiB (27%), 15.0 MiB/s, 8 s, about 21 s left`."""
    if done < 0:  # nothing measurable: say that it is still going
        return f"{label}: {elapsed:.0f} s"
    mib = done / 1048576
    rate = f", {mib / elapsed:.1f} MiB/s" if elapsed > 0 else ""
    if not total:
        return f"{label}: {mib:.1f} MiB{rate}, {elapsed:.0f} s"
    fraction = min(done / total, 1.0)
    left = f", about {elapsed / fraction - elapsed:.0f} s left" if fraction > 0.01 else ""
    return f"{label}: {mib:.1f} of {total / 1048576:.1f} MiB ({fraction:.0%}){rate}, {elapsed:.0f} s{left}"


Progress = Callable[[str, Callable[[], int], "int | None"], AbstractContextManager]


def no_progress(label: str, measure: Callable[[], int], total: int | None) -> AbstractContextManager:
    """A Progress that shows nothing, for library callers and tests."""
    return nullcontext()


def bytes_under(path: Path) -> int:
    """Bytes of the files at or under `path` (a file or a folder being written)."""
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
