"""What the four benchmarks share: their command line (--quick), the settings their commands see, and checked,
timed runs of whole processes.

A benchmark stops with exit 1 at the first step that fails: a command that failed is never timed as if it had
done its work. Each timing comes back as a Timing, read by field name, so a field added later breaks no caller.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.settings import KNOWN_SETTINGS

QUICK_HELP = ("small data, one round: checks in seconds that every step of the full run still works "
              "(what `make test` runs); its figures are not measurements")
QUICK_BANNER = "quick mode (small data, one round): the figures below only show that every step runs"


@dataclass(frozen=True)
class Timing:
    """One checked run of a whole process."""

    seconds: float  # wall time
    cpu_seconds: float  # user and system time of the process and all its children, on every core
    stdout: str
    max_rss_mib: float = 0.0  # the peak resident memory of the process (or of its largest child)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The benchmark's command line, its docstring as --help, with the --quick option every benchmark has."""
    cli = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--quick", action="store_true", help=QUICK_HELP)
    return cli


def isolate(work: Path) -> None:
    """Run every later command in an empty folder of `work`: no `.env` there, so the toolkit reads only the
    benchmark's settings."""
    empty = work / "cwd"
    empty.mkdir()
    os.chdir(empty)


def command_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without the toolkit's settings, libpq's PG* variables or the benchmarks' own
    BENCH_* ones, plus `settings`.

    A REMOTE_AUTO_PUSH or DB_HOST from the shell must not send the benchmark's junk to a real store or server.
    """
    kept = {key: value for key, value in os.environ.items()
            if key not in KNOWN_SETTINGS and not key.startswith(("PG", "BENCH_"))}
    return {**kept, **settings}


def run_step(argv: list[str], env: dict[str, str]) -> str:
    """Run an untimed step; its stdout. A failure stops the benchmark (exit 1) with the command's error."""
    return timed(argv, env).stdout


def timed(argv: list[str], env: dict[str, str], sync: bool = False) -> Timing:
    """Run argv and time it; with `sync`, the filesystem is synced first so earlier writes are not paid for here.

    A non-zero exit stops the benchmark (exit 1) naming the command and its error, before any figure is kept.
    """
    if sync:
        run_step(["sync"], env)
    # Output into files and the child reaped with wait4: its own resource usage, CPU and peak memory, which
    # getrusage(RUSAGE_CHILDREN) would give only as a maximum over every child this benchmark has had.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        try:
            child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as error:
            sys.exit(f"benchmark step could not start: {' '.join(argv)}: {error.strerror}")
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # the benchmark is stopped (Ctrl-C): so is what it runs
            child.kill()
            child.wait()
            raise
        elapsed = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = (_text(stream) for stream in (out, err))
    if child.returncode != 0:
        error = stderr.strip() or stdout.strip() or "(no output)"
        sys.exit(f"benchmark step failed (exit {child.returncode}): {' '.join(argv)}: {error}")
    return Timing(elapsed, usage.ru_utime + usage.ru_stime, stdout, usage.ru_maxrss / 1024)  # KiB on Linux


def _text(stream: IO[bytes]) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")
