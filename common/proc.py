"""The one way the toolkit runs external tools: argv lists, no shell, stderr kept for the error message.

Every child dies with the toolkit process that started it (PR_SET_PDEATHSIG), however that process ends,
SIGKILL included, and a password reaches a child only through a file that exists nowhere but in memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.errors import ToolkitError
from common.libc import libc_function
from common.signals import SIGNAL_CHECK_SECONDS

_STOP_GRACE_SECONDS = 5
# Never inherited by a child: a password reaches a tool only through a private file named in `env`.
SECRET_VARIABLES = frozenset({"DB_PASSWORD", "PGPASSWORD"})
_STDERR_TAIL_LINES = 12
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
_PRIVATE = 0o600


@dataclass
class ToolRun:
    """What a finished tool left behind."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: str


def run_tool(
    argv: list[str],
    what: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    stdout: IO[bytes] | None = None,
    check: bool = True,
    keep_secrets: bool = False,
    timeout: float | None = None,
    pass_fds: Sequence[int] = (),
) -> ToolRun:
    """Run `argv` and wait for it; with check, a non-zero exit raises a one-line error with stderr's tail.

    `env` is added to the inherited environment, from which SECRET_VARIABLES are removed: a secret
    reaches a child only as a private file named in `env` (a PGPASSFILE), never in argv or environ.
    `stdout` may be an open file to stream into; otherwise it is captured. `keep_secrets` is only for
    the toolkit's own scripts, which read DB_PASSWORD from their environment as this process did.
    After `timeout` seconds the child is stopped and the run fails. `pass_fds` are kept open in the child
    under the same numbers (a SecretFile's fd). The child is killed if this process dies first.
    If this process is interrupted (SIGINT, or SIGTERM turned into an exception by the CLI) the child is
    terminated, then killed, before the exception goes on.
    """
    inherited = {key: value for key, value in os.environ.items() if keep_secrets or key not in SECRET_VARIABLES}
    child_env = {**inherited, **(env or {})}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            preexec_fn=die_with_parent_hook(),
        )
    except FileNotFoundError:
        raise ToolkitError(f"{what}: {argv[0]} not found: install it or put it on PATH") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:  # in slices, so that a stop signal is handled within SIGNAL_CHECK_SECONDS (common.signals)
            try:
                out, err = proc.communicate(stdin, timeout=SIGNAL_CHECK_SECONDS)
                break
            except subprocess.TimeoutExpired:
                stdin = None  # handed over by the first call, which goes on writing it; a retry loses no output
                if deadline is not None and time.monotonic() >= deadline:
                    stop_child(proc)
                    raise ToolkitError(f"{what} did not finish within {timeout:g} s and was stopped") from None
    except BaseException:
        stop_child(proc)
        raise
    result = ToolRun(argv, proc.returncode, out or b"", err.decode("utf-8", "replace"))
    if check and proc.returncode != 0:
        raise ToolkitError(f"{what} failed (exit {proc.returncode}){_tail(result.stderr)}")
    return result


def stop_child(proc: subprocess.Popen) -> None:
    """Terminate a child, kill it if it lingers, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return ": " + " | ".join(lines[-_STDERR_TAIL_LINES:])


def die_with_parent_hook() -> Callable[[], None] | None:
    """A function for a freshly forked child that makes the kernel SIGKILL it when this process dies.

    Called in the parent (the C library lookup may take the loader's lock, which a forked child could
    find taken); the function it returns runs in the child and only makes system calls. If the parent
    died between the fork and the prctl, the child leaves at once. PR_SET_PDEATHSIG follows the thread
    that forked: a caller's thread outlives the child as long as it waits for it, as run_tool does.
    None where there is no prctl (not Linux).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    return lambda: _die_with(prctl, parent)


def die_with(parent: int) -> None:
    """In a process started afresh (spawned, not forked) by `parent`: SIGKILL it when `parent` dies, and leave
    at once if it already has."""
    _die_with(_prctl(), parent)


def _die_with(prctl: Callable[..., int] | None, parent: int) -> None:
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _prctl() -> Callable[..., int] | None:
    return libc_function("prctl", ("int", "ulong", "ulong", "ulong", "ulong"))


@dataclass(frozen=True)
class SecretFile:
    """A private file held open by this process, with no name on any filesystem (a memfd)."""

    fd: int

    @property
    def child_path(self) -> str:
        """The path under which a child that got `fd` through run_tool's pass_fds opens the file."""
        return f"/proc/self/fd/{self.fd}"


@contextmanager
def secret_file(content: str) -> Iterator[SecretFile]:
    """`content` in a memory-only file, mode 0600, for a child to read (e.g. as PGPASSFILE=child_path).

    No name means nothing to clean up: the memory goes with the last process holding the file open, so
    no run, however it ends (SIGKILL included), leaves the secret behind in /tmp or anywhere else.
    """
    if not hasattr(os, "memfd_create"):
        raise ToolkitError("passing a password to a child process needs Linux (memfd_create)")
    fd = os.memfd_create("rollback-secret", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, _PRIVATE)  # a memfd starts as 0777, and libpq ignores a password file others may read
        data = content.encode()
        while data:
            data = data[os.write(fd, data):]
        yield SecretFile(fd)
    finally:
        os.close(fd)
