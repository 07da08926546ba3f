"""Copy and hash many files on every core at once.

Copying a 20,000-file tree and hashing it on the way is bound by the CPU, not the disk, and threads do
not help: the per-file work holds the interpreter lock. So the copies are made by forked workers:
- the files are cut into runs of consecutive files (one folder's files stay together, so two workers
  seldom create files in the same folder at the same moment), and each run's number is written to a
  pipe before the workers start; a worker reads a number, copies that run, and reads the next, so a
  worker slowed by big files simply takes fewer runs;
- each worker reports every file (size and sha256, or the error that stopped it) on one shared pipe, in
  writes small enough to arrive whole, and the caller's `done` runs here, in the parent, as they arrive;
- a worker keeps none of the parent's files open but its two pipes (not the store's lock), and dies
  when the thread that started it ends (PR_SET_PDEATHSIG), which copy_all never outlives, so a killed
  run leaves no copier behind; any failure here, a stop included, kills the workers before it is raised.
A worker runs only system calls and hashlib, so forking while other threads run (progress, flushing)
cannot leave it waiting on a lock one of them held.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.errors import ToolkitError
from common.files import copy_and_hash
from common.proc import die_with_parent_hook
from common.signals import SIGNAL_CHECK_SECONDS, stop_signals_held

PARALLEL_FROM = 256  # fewer files than this are copied here: starting workers would cost more than it saves
MAX_WORKERS = 8  # past a few, the disk decides
_RUN = 64  # files per run, unless there are very many
# Run numbers are written to the pipe before any worker reads it: 4,000 bytes fit the smallest pipe buffer
# Linux gives (one page, for a user over pipe-user-pages-soft).
_MAX_RUNS = 1000
_RECORD = struct.Struct("<cIQ32s")  # b"R", index, size, sha256; or b"E", index, errno, which path failed
_PER_WRITE = 4096 // _RECORD.size  # records per write: a pipe write up to PIPE_BUF (4096) is never interleaved
_SOURCE, _DESTINATION, _NEITHER = b"s", b"d", b"-"
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536

# Python 3.12+ warns of any fork while other threads run; a worker is safe (see above). Set once, here:
# catch_warnings around each fork would race between two threads copying at once.
warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning)


@dataclass
class CopyJob:
    """One file to copy (as copy_and_hash does) and what to do with its size and sha256 once copied.

    With `put`, the file is handed to put(src, dest) instead, which returns its size and sha256 (content
    stored by its sha256 under the folder `dest`, say)."""

    src: str
    dest: str
    mode: int
    owner: tuple[int, int] | None
    done: Callable[[int, str], None]
    put: Callable[[str, str], tuple[int, str]] | None = None
    mtime_ns: int | None = None  # the copy's modification time, when given (a build keeps the backed-up one)
    span: tuple[int, int] | None = None  # (offset, size) of `src` to copy, when not the whole file (a pack's)

    def run(self) -> tuple[int, str]:
        """Copy (or put) the file; its size and sha256."""
        if self.put is not None:
            return self.put(self.src, self.dest)
        return copy_and_hash(self.src, self.dest, mode=self.mode, owner=self.owner, mtime_ns=self.mtime_ns,
                             span=self.span)


def worker_count() -> int:
    """The cores this process may use, at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def copy_all(jobs: Sequence[CopyJob], workers: int | None = None) -> None:
    """Copy every job's file and call its `done(size, sha256)` here; several processes when there are many.

    Files are created with O_EXCL, so nothing already there is written through. The first failure (a
    copy that fails, raised as CopyFailed, or an exception from a `done`) stops every worker and is
    raised; the files already written stay, for the caller to remove with the folder it was filling.
    """
    workers = worker_count() if workers is None else workers
    if workers < 2 or len(jobs) < PARALLEL_FROM or not hasattr(os, "fork"):
        for job in jobs:
            try:
                size, digest = job.run()
            except OSError as exc:
                raise CopyFailed(job, exc.errno or 0, _side(job, exc)) from None
            job.done(size, digest)
        return
    _copy_in_workers(jobs, workers)


class CopyFailed(ToolkitError):
    """A file could not be copied; the message names the file read or written and why."""

    def __init__(self, job: CopyJob, code: int, side: bytes):
        self.errno = code
        self.filename = job.src if side == _SOURCE else job.dest if side == _DESTINATION else None
        reason = os.strerror(code) if code else "failed"
        if side == _SOURCE:
            super().__init__(f"could not read {job.src}: {reason}")
        elif side == _DESTINATION:
            super().__init__(f"could not write {job.dest}: {reason}")
        else:
            super().__init__(f"could not copy {job.src} to {job.dest}: {reason}")


def _side(job: CopyJob, exc: OSError) -> bytes:
    """Which file an error of copy_and_hash is about (it names the one it was reading or writing)."""
    if exc.filename == job.src:
        return _SOURCE
    if job.put is not None:  # whatever else a put names is what it writes (an object, a pack)
        return _DESTINATION
    named = str(exc.filename)
    return _DESTINATION if named == job.dest or named.startswith(job.dest + "/") else _NEITHER


def _copy_in_workers(jobs: Sequence[CopyJob], workers: int) -> None:
    run = max(_RUN, -(-len(jobs) // _MAX_RUNS))
    runs = -(-len(jobs) // run)
    tickets_read, tickets_write = os.pipe()
    results_read, results_write = os.pipe()
    children: list[int] = []
    parent = os.getpid()
    try:
        os.write(tickets_write, b"".join(struct.pack("<I", n) for n in range(runs)))
        os.close(tickets_write)
        tickets_write = -1
        die_with_parent = die_with_parent_hook()
        hashlib.sha256()  # the digest is looked up here, not in a child that may hold a copy of a taken lock
        # A stop waits until every child is recorded, so that the cleanup below kills each one.
        with stop_signals_held():
            for _ in range(min(workers, runs)):
                pid = os.fork()
                if pid == 0:
                    _worker(jobs, run, tickets_read, results_write, parent, die_with_parent)
                children.append(pid)
        os.close(results_write)
        results_write = -1
        _collect(jobs, results_read)
        _reap(children)
        children = []
    finally:
        for pid in children:  # only on failure: stop and reap whatever still runs
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(children, quiet=True)
        for fd in (tickets_read, tickets_write, results_read, results_write):
            if fd >= 0:
                os.close(fd)


def _worker(jobs: Sequence[CopyJob], run: int, tickets: int, results: int, parent: int,
            die_with_parent: Callable[[], None] | None) -> None:
    """A forked worker's whole life: copy runs until there are none left, report, and leave with os._exit."""
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the parent's to handle
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if die_with_parent is not None:
            die_with_parent()
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
        # Nothing of the parent's but the two pipes: not its lock, nor a pipe another thread is waiting on.
        low, high = sorted((tickets, results))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, _MAX_FD)
        while len(ticket := os.read(tickets, 4)) == 4:
            (number,) = struct.unpack("<I", ticket)
            records = []
            for index in range(number * run, min((number + 1) * run, len(jobs))):
                record, failed = _copy_one(jobs[index], index)
                records.append(record)
                if failed or len(records) == _PER_WRITE:
                    os.write(results, b"".join(records))
                    records = []
                if failed:
                    os._exit(1)
            if records:
                os.write(results, b"".join(records))
        status = 0
    finally:
        os._exit(status)


def _copy_one(job: CopyJob, index: int) -> tuple[bytes, bool]:
    """The record of one copy, and whether it failed."""
    try:
        size, digest = job.run()
    except OSError as exc:
        return _RECORD.pack(b"E", index, exc.errno or 0, _side(job, exc)), True
    return _RECORD.pack(b"R", index, size, bytes.fromhex(digest)), False


def _collect(jobs: Sequence[CopyJob], results: int) -> None:
    """Read the workers' records until every worker has gone; run each job's `done` as its record arrives."""
    pending = b""
    reported = 0
    waiting = select.poll()
    waiting.register(results, select.POLLIN)
    while True:
        while not waiting.poll(SIGNAL_CHECK_SECONDS * 1000):  # a stop noted just before the wait is raised here
            pass
        chunk = os.read(results, 65536)
        if not chunk:
            break
        pending += chunk
        whole = len(pending) - len(pending) % _RECORD.size
        for kind, index, size, digest in _RECORD.iter_unpack(pending[:whole]):
            job = jobs[index]
            if kind == b"E":
                raise CopyFailed(job, size, digest[:1])
            job.done(size, digest.hex())
            reported += 1
        pending = pending[whole:]
    if reported != len(jobs):
        raise ToolkitError(f"a copying process ended unexpectedly after {reported} of {len(jobs)} files")


def _reap(children: list[int], quiet: bool = False) -> None:
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                break
            if not quiet and os.waitstatus_to_exitcode(status) != 0:
                raise ToolkitError(f"a copying process failed (exit status {os.waitstatus_to_exitcode(status)})")
            break

