"""The operator's hooks: commands run around a restore or a release switch (stop, build, start the application).

A hook is a command run without a shell, split as a shell would split it. It is done when its own process
exits, whatever it left running: a start script that puts the application in the background and exits 0
has done its job, even though the application still holds the hook's output. A hook that outlives its
time limit (HOOK_TIMEOUT_SECONDS) is stopped with its whole process group (what it started too). Of its
output (stdout and stderr, interleaved) only the last OUTPUT_KEPT_BYTES are kept, however much it writes:
in memory, in the report and in the audit log.
"""

from __future__ import annotations

import os
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import SettingError, ToolkitError, UsageError
from common.proc import SECRET_VARIABLES, die_with_parent_hook
from common.settings import Settings
from common.signals import SIGNAL_CHECK_SECONDS
from common.text import printable

OUTPUT_KEPT_BYTES = 64 * 1024
_LINE_SHOWN_CHARS = 300  # of the output's last line, in a one-line message
_STOP_GRACE_SECONDS = 5
_READ_BYTES = 64 * 1024
_DRAIN_READS = 16  # 1 MiB, the largest a pipe holds


@dataclass
class HookRun:
    """One finished (or stopped) hook."""

    name: str
    argv: list[str]
    exit_code: int | None  # None: stopped at the timeout
    seconds: float
    output: str  # the last OUTPUT_KEPT_BYTES of what it wrote
    dropped_bytes: int  # what it wrote before those

    @property
    def last_line(self) -> str:
        """The output's last non-empty line, escaped and cut to a readable length ("" when it wrote nothing)."""
        lines = [line for line in self.output.splitlines() if line.strip()]
        line = printable(lines[-1].strip()) if lines else ""
        return line if len(line) <= _LINE_SHOWN_CHARS else "..." + line[-_LINE_SHOWN_CHARS:]

    def to_json(self) -> dict:
        """For --json."""
        return {"name": self.name, "command": shlex.join(self.argv), "exit_code": self.exit_code,
                "seconds": round(self.seconds, 3), "output": self.output, "output_dropped_bytes": self.dropped_bytes}

    def line(self) -> str:
        """One line for the report."""
        how = "stopped at the timeout" if self.exit_code is None else f"exit {self.exit_code}"
        said = f": {self.last_line}" if self.last_line else ""
        return f"{self.name} ({shlex.join(self.argv)}): {how} after {self.seconds:.1f} s{said}"


def hook_argv(settings: Settings, name: str) -> list[str] | None:
    """The hook setting `name` split into argv (None when unset), checked to name an executable file (on PATH
    or by path; a relative path in the settings file is relative to its folder), so that a typo stops a run
    before its first change."""
    value = settings.text(name)
    if value is None:
        return None
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"{name} cannot be split into a command: {exc}") from None
    if argv and "/" in argv[0]:  # a program given by its path, relative to where the setting was written
        argv[0] = str(settings.relative_to_source(name, Path(argv[0])))
    if argv and shutil.which(argv[0]) is None:
        why = "no such executable file" if "/" in argv[0] else "not found on PATH"
        if "/" in argv[0] and os.path.exists(argv[0]):
            why = "a folder" if os.path.isdir(argv[0]) else "not executable"
        raise SettingError(f"{name}: {argv[0]} is {why}: fix the setting; nothing changed", name)
    return argv or None


def hook_timeout(settings: Settings) -> float:
    """HOOK_TIMEOUT_SECONDS (300 unless set, at least 1): how long any hook may run."""
    return settings.number("HOOK_TIMEOUT_SECONDS", 300.0, minimum=1)


class HookFailed(ToolkitError):
    """A hook failed or was stopped; `hook` is what it did."""

    def __init__(self, hook: HookRun, message: str):
        super().__init__(message)
        self.hook = hook


def run_checked(name: str, argv: list[str], timeout: float, consequence: str, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> HookRun:
    """Run a hook; a failure or a hook that hangs raises HookFailed with a line saying where the run stands
    (`consequence`), with the end of the hook's output."""
    hook = run_hook(name, argv, timeout, cwd, env)
    said = f": {hook.last_line}" if hook.last_line else ""
    if hook.exit_code is None:
        raise HookFailed(hook, f"{name} ({shlex.join(argv)}) did not finish within {timeout:g} s and was "
                               f"stopped, with everything it started{said}; {consequence}")
    if hook.exit_code != 0:
        raise HookFailed(hook, f"{name} ({shlex.join(argv)}) failed (exit {hook.exit_code}){said}; {consequence}")
    return hook


def run_hook(name: str, argv: list[str], timeout: float, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> HookRun:
    """Run `argv` in a process group of its own until its process exits or `timeout` passes (then the group
    is stopped), keeping the last OUTPUT_KEPT_BYTES of its output. Interrupted, it stops the group too.
    It runs in `cwd` (else here), with the environment less its secrets, plus `env`."""
    started = time.monotonic()
    environ = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
    environ.update(env or {})
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end, env=environ,
                                cwd=cwd, start_new_session=True, preexec_fn=die_with_parent_hook())
    except OSError as exc:
        os.close(read_end)
        raise ToolkitError(f"{name} ({shlex.join(argv)}) could not be started: {exc.strerror}") from None
    finally:
        os.close(write_end)
    output = _Tail()
    try:
        exited = _read_until_exit(proc, read_end, output, started + timeout)
        if not exited:
            _stop_group(proc)
    except BaseException:
        _stop_group(proc)
        os.close(read_end)
        raise
    _let_go(read_end)
    return HookRun(name, argv, proc.returncode if exited else None, time.monotonic() - started, output.text(),
                   output.dropped)


def _read_until_exit(proc: subprocess.Popen, read_end: int, output: _Tail, deadline: float) -> bool:
    """Keep the output's tail until the hook's own process exits (True) or the deadline passes (False)."""
    os.set_blocking(read_end, False)
    pidfd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            selector.register(read_end, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                ready = {key.fd for key, _ in selector.select(min(remaining, SIGNAL_CHECK_SECONDS))}
                if read_end in ready and not _drain(read_end, output):
                    selector.unregister(read_end)  # every writer has closed it
                if pidfd in ready:
                    proc.wait()
                    _drain(read_end, output)  # what it wrote just before it exited
                    return True
    finally:
        os.close(pidfd)


def _drain(fd: int, output: _Tail) -> bool:
    """Read what is there now, a pipe's worth at most (a writer faster than this must not keep the caller
    from its deadline); False at the end of the output (no writer left)."""
    for _ in range(_DRAIN_READS):
        try:
            chunk = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        output.add(chunk)
    return True


def _let_go(read_end: int) -> None:
    """Close the output once the hook is done. If something it started still writes there (an application
    put in the background), a reader of its own discards that from now on: a closed pipe would kill the
    application with SIGPIPE at its next write."""
    try:
        still_open = _drain(read_end, _Tail())
        if still_open:
            os.set_blocking(read_end, True)  # the flag is the pipe's, not this descriptor's: cat would stop at once
            subprocess.Popen(["cat"], stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    except OSError:
        pass  # no cat: the output is closed, as a terminal's would be when it goes
    finally:
        os.close(read_end)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the hook's process group, SIGKILL to what is left of it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nothing of the group is left
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if not _group_alive(proc):
                return
            time.sleep(0.05)
    proc.wait()


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reaps the leader, whose zombie would count as the group being there
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Tail:
    """The last OUTPUT_KEPT_BYTES bytes of a stream, and how many came before them."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.kept += chunk
        excess = len(self.kept) - OUTPUT_KEPT_BYTES
        if excess > 0:
            del self.kept[:excess]
            self.dropped += excess

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")
