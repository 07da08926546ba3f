"""The progress display (common/progress.py) driven directly, on a real pseudo-terminal as stderr: what it draws
while real work runs, that it clears its line, and that it draws nothing where nobody watches. The scripts'
own end-to-end checks (a dump, a push) are in test_database_rollback.py and test_remote.py."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest
from helpers import Terminal

from common import progress
from common.progress import bytes_under, describe, show_progress

MIB = 1024 * 1024
CLEAR = rb"\r\x1b\[K"  # back to the start of the line, and erase it
INTERVAL = 0.01  # redraws come quickly here: what each one says is the test, not how often it comes


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Terminal]:
    """A pseudo-terminal, with `stderr` a text stream written to it, as when an operator runs a script at a shell."""
    monkeypatch.setattr(progress, "_INTERVAL_SECONDS", INTERVAL)
    screen = Terminal()
    with open(screen.follower, "w") as screen.stderr:  # closing it is the end of what the screen shows
        yield screen


@contextmanager
def stderr_to(stream: TextIO) -> Iterator[None]:
    """sys.stderr is `stream` for the block (set in the test itself: pytest puts its capture back before it)."""
    saved, sys.stderr = sys.stderr, stream
    try:
        yield
    finally:
        sys.stderr = saved


def test_a_copy_shows_how_far_it_is_how_fast_and_how_long_is_left_then_clears_its_line(terminal: Terminal,
                                                                                      tmp_path: Path):
    source, target = tmp_path / "dump", tmp_path / "copy"
    source.write_bytes(os.urandom(4 * MIB))
    with stderr_to(terminal.stderr), show_progress("copying dump", lambda: bytes_under(target), 4 * MIB, True), \
            open(source, "rb") as src, open(target, "wb") as out:
        for step in range(1, 5):
            out.write(src.read(MIB))
            out.flush()
            # Each MiB copied is on the screen before the next one goes: the line follows the work.
            terminal.wait_for(CLEAR + rb"copying dump: %d\.0 of 4\.0 MiB \(%d%%\), [0-9.]+ MiB/s, \d+ s, "
                              rb"about \d+ s left" % (step, 25 * step))
    terminal.stderr.close()
    screen = terminal.screen()
    assert screen.endswith(b"\r\x1b[K") and b"100%" in screen
    assert b"\n" not in screen  # one line, redrawn in place: nothing scrolls


def test_a_total_learnt_later_and_a_measure_that_fails_do_not_disturb_the_work(terminal: Terminal):
    known: dict[str, int | None] = {"total": None}
    calls = []

    def measure() -> int:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError("the file being measured is not there yet")
        return 3 * MIB

    with stderr_to(terminal.stderr), show_progress("pushing b1", measure, lambda: known["total"], enabled=True):
        terminal.wait_for(CLEAR + rb"pushing b1: 3\.0 MiB, [0-9.]+ MiB/s, \d+ s")  # no total yet: no "of"
        known["total"] = 6 * MIB
        terminal.wait_for(rb"pushing b1: 3\.0 of 6\.0 MiB \(50%\)")
    with stderr_to(terminal.stderr), show_progress("restoring db", lambda: -1, None, enabled=True):  # time only
        terminal.wait_for(CLEAR + rb"restoring db: \d+ s")


def test_the_line_is_cleared_when_the_work_fails(terminal: Terminal):
    with stderr_to(terminal.stderr), pytest.raises(RuntimeError, match="the work failed"), \
            show_progress("dumping db", lambda: MIB, None, enabled=True):
        terminal.wait_for(rb"dumping db: 1\.0 MiB")
        raise RuntimeError("the work failed")
    terminal.stderr.write("after")
    terminal.stderr.flush()
    before_after = terminal.wait_for(rb"(.*)after").group(1)
    assert before_after.endswith(b"\r\x1b[K")  # the error's message starts on a clean line


@pytest.mark.parametrize("where", ["terminal, display off (--json, --quiet)", "a pipe (cron, CI)"])
def test_nothing_is_drawn_where_nobody_watches(terminal: Terminal, where: str):
    on_a_pipe = where.startswith("a pipe")
    reader, writer = os.pipe()
    with open(writer, "w") as pipe:
        with stderr_to(pipe if on_a_pipe else terminal.stderr), \
                show_progress("dumping db", lambda: MIB, MIB, enabled=on_a_pipe):
            time.sleep(20 * INTERVAL)  # long enough for many redraws, were any made
        for stream in (pipe, terminal.stderr):
            stream.write("after")
    terminal.stderr.close()
    assert terminal.screen() == b"after"
    assert os.read(reader, 4096) == b"after"
    os.close(reader)


def test_describe_says_what_it_knows_and_no_more():
    assert describe("x", 0, None, 0.0) == "x: 0.0 MiB, 0 s"  # no rate before any time has passed
    assert describe("x", 30 * MIB, None, 10.0) == "x: 30.0 MiB, 3.0 MiB/s, 10 s"
    assert describe("x", 30 * MIB, 0, 10.0) == "x: 30.0 MiB, 3.0 MiB/s, 10 s"  # an estimate of 0 is none
    assert describe("x", 30 * MIB, 120 * MIB, 10.0) == "x: 30.0 of 120.0 MiB (25%), 3.0 MiB/s, 10 s, about 30 s left"
    assert describe("x", MIB // 200, 100 * MIB, 1.0).endswith(", 1 s")  # under 1%: no guess at what is left
    assert describe("x", 130 * MIB, 120 * MIB, 10.0).startswith("x: 130.0 of 120.0 MiB (100%)")  # over the estimate
    assert describe("x", -1, None, 42.4) == "x: 42 s"
