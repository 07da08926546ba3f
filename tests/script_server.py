"""Runs of the toolkit's scripts without an interpreter start each: a server that has imported them forks.

The server (this file run as a program) imports the four scripts once. For each run it forks a child that
takes the test's argv, environment, working folder and standard streams (pipes passed over a Unix socket),
then runs the script as `python script.py` runs it: as __main__, ending through the interpreter's own exit
(SystemExit, an uncaught exception's traceback, threads joined, atexit, streams flushed). The test reads
stdout and stderr and gets the exit code (a signal's as -N) from the server once it has reaped the child.

What a forked child inherits instead of computing it afresh is why ScriptServer.can_run sends some runs to a
cold start: the interpreter reads PYTHON*, LC_*, LANG, TZ, HOME and TMPDIR when it starts, and modules keep
the umask (common/files.py) and the open-files limit (backup_store/copier.py) read at import.
"""

from __future__ import annotations

import builtins
import gc
import importlib
import io
import json
import locale
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from importlib.machinery import SourceFileLoader
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("config_rollback", "code_rollback", "database_rollback", "rollback")
STARTUP_PREFIXES = ("PYTHON", "LC_")
STARTUP_NAMES = frozenset({"LANG", "TZ", "HOME", "TMPDIR"})
STDIO_FDS = 3  # the reply socket, then stdin, stdout and stderr travel with each request
MAX_REQUEST = 1 << 20
PIPE_CHUNK = 1 << 16
STATUS = struct.Struct("i")
KILL = b"k"  # what the client sends when its timeout passes: the server kills the child, as subprocess.run does


def startup_settings(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` that a Python interpreter or the toolkit's imports read when they start."""
    return {key: value for key, value in env.items() if key.startswith(STARTUP_PREFIXES) or key in STARTUP_NAMES}


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
        self._startup = startup_settings(env)
        self._umask, self._limits = process_umask(), process_limits()
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                      env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self._sending = threading.Lock()

    def can_run(self, env: dict[str, str], cwd: Path) -> bool:
        """Whether a child forked from the server would start exactly as `python script.py` would here."""
        return (startup_settings(env) == self._startup and process_umask() == self._umask
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
                reply.sendall(KILL)
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


# -- the server --------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """One run, as the forked child receives it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdio: list[int]


@dataclass(eq=False)
class _Child:
    """A running child, as the server tracks it until it has reaped it and sent its exit code."""

    pid: int
    pidfd: int
    reply: socket.socket
    killed: bool = False


def serve(control: socket.socket) -> _Request | None:
    """Fork a child for each request; None once the test process has gone. Returns the request in a child."""
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    running: list[_Child] = []
    while True:
        for key, _events in selector.select():
            child = key.data  # the child whose pidfd or reply socket this is; None for the control socket
            if child is None:
                message, fds, flags, _address = socket.recv_fds(control, MAX_REQUEST, 1 + STDIO_FDS)
                if not message:
                    return None
                if flags & socket.MSG_TRUNC:
                    raise RuntimeError(f"a request longer than {MAX_REQUEST} bytes")
                request = json.loads(message)
                reply = socket.socket(fileno=fds[0])
                pid = os.fork()
                if pid == 0:  # nothing of the server stays open in the child
                    selector.close()
                    control.close()
                    for other in running:
                        os.close(other.pidfd)
                        other.reply.close()
                    reply.close()
                    return _Request(request["argv"], request["env"], request["cwd"], fds[1:])
                for fd in fds[1:]:
                    os.close(fd)
                child = _Child(pid, os.pidfd_open(pid), reply)
                running.append(child)
                selector.register(child.pidfd, selectors.EVENT_READ, child)  # readable once the child has ended
                selector.register(reply, selectors.EVENT_READ, child)
            elif child not in running:
                continue  # reaped earlier in this round
            elif key.fd == child.pidfd:
                running.remove(child)
                _report(child, selector)
            else:  # the client's timeout passed, or the client has gone: kill, then reap and report as usual
                os.kill(child.pid, signal.SIGKILL)
                selector.unregister(child.reply)
                child.killed = True


def _report(child: _Child, selector: selectors.BaseSelector) -> None:
    """Reap an ended child and send its exit code as subprocess gives it (-N for signal N)."""
    _pid, status = os.waitpid(child.pid, 0)
    selector.unregister(child.pidfd)
    os.close(child.pidfd)
    if not child.killed:
        selector.unregister(child.reply)
    try:
        child.reply.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
    except OSError:
        pass  # the client has gone
    child.reply.close()


def start_child(request: _Request, added_at_start: dict[str, str]) -> dict:
    """Make this forked child what `python script.py` would be; the namespace to run the script's code in."""
    for target, fd in enumerate(request.stdio):
        os.dup2(fd, target)
        os.close(fd)
    templates = (sys.__stdin__, sys.__stdout__, sys.__stderr__)
    sys.stdin, sys.stdout, sys.stderr = (_stdio(fd, template) for fd, template in enumerate(templates))
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update({**request.env, **added_at_start})
    sys.argv = list(request.argv[1:])
    main = types.ModuleType("__main__")
    path = sys.argv[0]
    main.__dict__.update(__file__=path, __builtins__=builtins, __loader__=SourceFileLoader("__main__", path),
                         __spec__=None, __cached__=None)
    sys.modules["__main__"] = main
    return main.__dict__


def _stdio(fd: int, template: io.TextIOWrapper) -> io.TextIOWrapper:
    """A standard stream on `fd` made as the interpreter makes it at start (its encoding and error handler)."""
    write = fd != 0
    buffered = not template.write_through  # python -u or PYTHONUNBUFFERED: writes go straight to the fd
    # It stays open as the process's standard stream until the process ends.
    binary = open(fd, "wb" if write else "rb", buffering=-1 if buffered or not write else 0, closefd=False)  # noqa: SIM115
    raw = binary.raw if isinstance(binary, io.BufferedIOBase) else binary
    raw.name = template.name
    stream = io.TextIOWrapper(binary, template.encoding, template.errors, "\n",
                              line_buffering=buffered and (raw.isatty() or fd == 2), write_through=not buffered)
    stream.mode = "w" if write else "r"
    return stream


def _added_at_start() -> dict[str, str]:
    """Variables the interpreter set in its own environment as it started (LC_CTYPE when it coerces the C locale)."""
    given = dict(item.split(b"=", 1) for item in Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in item)
    return {key: value for key, value in os.environ.items()
            if given.get(os.fsencode(key)) != os.fsencode(value)}


def main() -> None:
    """The server: import the scripts, then fork for each request until the test process has gone."""
    sys.path[0] = str(ROOT)  # where `python ROOT/script.py` finds the toolkit
    added = _added_at_start()
    code = {}
    for name in SCRIPTS:
        importlib.import_module(name)
        path = str(ROOT / f"{name}.py")
        code[path] = compile(Path(path).read_bytes(), path, "exec", dont_inherit=True)
    gc.freeze()  # the children share these pages rather than copy them when a collection touches them
    request = serve(socket.socket(fileno=int(sys.argv[1])))
    if request is None:
        return
    namespace = start_child(request, added)
    script = sys.argv[0]
    exec(code.get(script) or compile(Path(script).read_bytes(), script, "exec", dont_inherit=True), namespace)


if __name__ == "__main__":
    main()
