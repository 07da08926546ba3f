"""Store locks (fcntl.flock on a store's lock file), and locks held for a whole run across the scripts it starts.

A point restore runs the component scripts as child processes, and each takes its own store's lock. So
that nothing can slip in between two steps (a drill, another restore, a cleanup), rollback.py takes every
lock its steps will need before the first change, with a bounded wait (`HeldLocks`), and hands each one
down: the child inherits the open lock file under the same descriptor number, named in HANDED_DOWN, and
proceeds under it (`handed_down`). A lock is the open file description's, so the child's flock on the
inherited descriptor succeeds exactly when the parent holds it, and nothing the child does releases it.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from backup_store.manifest import format_time
from common.errors import LockBusy
from common.files import make_private_dir

HANDED_DOWN = "ROLLBACK_HELD_LOCKS"  # the descriptors of locks a child runs under, comma-separated
_POLL_SECONDS = 0.1


def take_lock(path: Path, command: str, until: float | None = None,
              waiting: Callable[[str], None] | None = None) -> int:
    """Open and flock `path` (made 0600 if missing), waiting until the monotonic time `until` at most; the
    descriptor holding it.

    The holder (pid, user@host, command, time) is written into the file for the next run's message. A lock
    still held at `until` (at once when None) raises LockBusy naming the holder; `waiting` is given the
    holder once, when a wait begins."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a run that has just started"
            if until is None or time.monotonic() >= until:
                os.close(fd)
                raise LockBusy(f"another run holds the lock on {path.parent}: {holder}; try again later") from None
            if waiting is not None and not told:
                waiting(holder)
                told = True
            time.sleep(_POLL_SECONDS)  # flock has no timeout of its own; polling keeps the wait bounded
        except BaseException:
            os.close(fd)
            raise
    since = format_time(datetime.now(UTC))
    holder = f"pid {os.getpid()}, {_user()}@{os.uname().nodename}, '{command}', since {since}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    """Clear the holder line and close the descriptor, which releases the lock."""
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def handed_down(path: Path) -> int | None:
    """The descriptor of `path`'s lock if this process runs under it: held by this process for the scripts it
    runs (HeldLocks), or inherited from the run that started it. None otherwise."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    candidates = list(_held.values())
    candidates += [int(fd) for fd in os.environ.get(HANDED_DOWN, "").split(",") if fd.strip().isdigit()]
    for fd in candidates:
        try:
            same = os.path.samestat(os.fstat(fd), st)
            if same:
                # Succeeds when this open file description holds the lock; fails if the descriptor is
                # another file's or the lock is someone else's.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
        except OSError:
            continue
    return None


# The locks HeldLocks holds in this process: lock file's (device, inode) -> descriptor.
_held: dict[tuple[int, int], int] = {}


class HeldLocks:
    """Locks taken before a run's first change and held until its last step is done, for its children too."""

    def __init__(self, command: str, wait_seconds: float, waiting: Callable[[str], None] | None = None):
        self.command = command
        self.wait_seconds = wait_seconds
        self.deadline = time.monotonic() + wait_seconds
        self.waiting = waiting
        self._fds: list[int] = []

    def take(self, path: Path) -> None:
        """Take the lock file `path` (its folder made private if missing) within the wait that began with this
        object; LockBusy, saying how long it waited, when it is still held at the end of it."""
        if handed_down(path) is not None:
            return  # already held for this run
        make_private_dir(path.parent)

        def tell(holder: str) -> None:
            if self.waiting is not None:
                self.waiting(f"waiting up to {self.deadline - time.monotonic():.0f} s for the lock on "
                             f"{path.parent}, held by {holder}")

        try:
            fd = take_lock(path, self.command, self.deadline, tell)
        except LockBusy as exc:
            if self.wait_seconds <= 0:
                raise
            raise LockBusy(f"{exc} (waited {self.wait_seconds:g} s, LOCK_WAIT_SECONDS; nothing was changed)") \
                from None
        st = os.fstat(fd)
        _held[(st.st_dev, st.st_ino)] = fd
        self._fds.append(fd)

    def child_env(self) -> dict[str, str]:
        """The environment entry that tells a child script which inherited descriptors are locks it runs under."""
        return {HANDED_DOWN: ",".join(map(str, self._fds))} if self._fds else {}

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors to pass to a child (under the same numbers)."""
        return tuple(self._fds)

    def release(self) -> None:
        """Release every lock taken here."""
        while self._fds:
            fd = self._fds.pop()
            for key, held in list(_held.items()):
                if held == fd:
                    del _held[key]
            release_lock(fd)

    def __enter__(self) -> HeldLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
