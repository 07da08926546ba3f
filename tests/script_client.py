"""Runs of the toolkit's scripts without an interpreter start each: the test process's side of the script server.

ScriptServer starts tests/script_server.py, which has imported the scripts, and asks it for each run: the
child it forks gets the test's argv, environment, working folder and pipes, and the exit code comes back as
subprocess.run gives it. A forked child inherits what the interpreter and the imports read as they started,
so ScriptServer.can_run sends to a cold start a run for which that would differ: other PYTHON*, LC_*, LANG,
TZ, HOME or TMPDIR settings, or other values of the variables the imports read, another umask (common/files.py
keeps the one it finds at import) or other resource limits (backup_store/copier.py keeps the open-files one).
"""

from __future__ import annotations

import json
import locale
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from script_server import KILL, MAX_MESSAGE, ROOT, STATUS

SERVER = Path(__file__).resolve().parent / "script_server.py"
STARTUP_PREFIXES = ("PYTHON", "LC_")
STARTUP_NAMES = frozenset({"LANG", "TZ", "HOME", "TMPDIR"})  # read by the interpreter or the modules it loads first
PIPE_CHUNK = 1 << 16


def startup_settings(env: dict[str, str], read_at_import: frozenset[str] = frozenset()) -> dict[str, str]:
    """The variables of `env` that an interpreter reads as it starts, and those of `read_at_import`."""
    return {key: value for key, value in env.items()
            if key.startswith(STARTUP_PREFIXES) or key in STARTUP_NAMES or key in read_at_import}


def process_umask() -> int:
    """This process's umask, read from /proc without changing it (os.umask would, for every thread)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise RuntimeError("no Umask line in /proc/self/status")


def process_limits() -> dict[str, tuple[int, int]]:
    """Every resource limit of this process, by name."""
    return {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")}


class ScriptServer:
    """The test process's side: starts the server with `env`, and runs scripts through it (thread-safe)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._umask, self._limits = process_umask(), process_limits()
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen([sys.executable, str(SERVER), str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                      env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self._sending = threading.Lock()
        self._hello = threading.Lock()
        self._startup: dict[str, str] | None = None
        self.read_at_import: frozenset[str] = frozenset()  # known once the hello has come

    def startup(self) -> dict[str, str]:
        """The server's start-up settings (see startup_settings), once its hello has come: it has imported all."""
        with self._hello:
            if self._startup is None:
                hello = self._control.recv(MAX_MESSAGE)
                if not hello:
                    raise RuntimeError(f"the script server did not start (exit code {self._proc.wait(30)})")
                self.read_at_import = frozenset(json.loads(hello)["read_at_import"])
                self._startup = startup_settings(self.env, self.read_at_import)
            return self._startup

    def can_run(self, env: dict[str, str], cwd: Path) -> bool:
        """Whether a child forked from the server would start exactly as `python script.py` would here."""
        startup = self.startup()
        return (startup_settings(env, self.read_at_import) == startup and process_umask() == self._umask
                and process_limits() == self._limits and os.path.isdir(cwd))

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, stdin: str, timeout: float
            ) -> subprocess.CompletedProcess:
        """What subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True) returns."""
        mine, theirs = socket.socketpair()
        child_in, to_child = os.pipe()
        from_out, child_out = os.pipe()
        from_err, child_err = os.pipe()
        request = json.dumps({"argv": argv, "env": env, "cwd": str(cwd)}).encode()
        try:
            with self._sending:
                socket.send_fds(self._control, [request], [theirs.fileno(), child_in, child_out, child_err])
        finally:  # the child's ends are the child's now: the server holds copies until it has forked
            theirs.close()
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        with mine:
            encoding = locale.getpreferredencoding(False)
            out, err, timed_out = _exchange(to_child, from_out, from_err, stdin.encode(encoding), mine, timeout)
            status = b""
            while len(status) < STATUS.size:
                chunk = mine.recv(STATUS.size - len(status))
                if not chunk:
                    raise RuntimeError(f"the script server ended during {argv[1:]} (exit code {self._proc.poll()})")
                status += chunk
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        return subprocess.CompletedProcess(argv, STATUS.unpack(status)[0], _text(out, encoding), _text(err, encoding))

    def stop(self) -> int:
        """End the server (children still running finish on their own); its exit code."""
        self._control.close()
        return self._proc.wait(timeout=30)


def _exchange(to_child: int, from_out: int, from_err: int, data: bytes, reply: socket.socket, timeout: float
              ) -> tuple[bytes, bytes, bool]:
    """Write `data` to the child's stdin and read its stdout and stderr to their end; a timeout kills it.

    Returns stdout, stderr and whether the timeout passed; every one of the three fds is closed.
    """
    deadline = time.monotonic() + timeout
    outputs: dict[int, list[bytes]] = {from_out: [], from_err: []}
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in outputs:
            selector.register(fd, selectors.EVENT_READ)
        os.set_blocking(to_child, False)
        selector.register(to_child, selectors.EVENT_WRITE)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                try:
                    reply.sendall(KILL)
                except OSError:
                    pass  # the child has ended already: the server has sent its exit code and let go
                timed_out = True
                break
            for key, _events in selector.select(left):
                if key.fd == to_child:
                    try:
                        data = data[os.write(to_child, data[:PIPE_CHUNK]):]
                    except BrokenPipeError:  # the script stopped reading: as for subprocess.run, not an error
                        data = b""
                    if not data:
                        selector.unregister(to_child)
                        os.close(to_child)
                elif chunk := os.read(key.fd, PIPE_CHUNK):
                    outputs[key.fd].append(chunk)
                else:
                    selector.unregister(key.fd)
        if to_child in selector.get_map():
            os.close(to_child)
    for fd in outputs:
        os.close(fd)
    return b"".join(outputs[from_out]), b"".join(outputs[from_err]), timed_out


def _text(data: bytes, encoding: str) -> str:
    """Bytes as text=True gives them: decoded strictly, every line ending made \\n."""
    return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


