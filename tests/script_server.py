"""The script server: imports the toolkit's scripts once, then forks a child for each run a test asks for.

Started by script_client.ScriptServer, with one end of a Unix socket (SOCK_SEQPACKET) as its argument. It first
sends a hello (the environment variables that what it imported read), then takes requests: argv, environment
and working folder as JSON, and four fds (a reply socket, then the run's stdin, stdout and stderr). The child
becomes what `python script.py` would be and runs the script as __main__, ending through the interpreter's own
exit (SystemExit, an uncaught exception's traceback, threads joined, atexit, streams flushed). The server
reaps it and sends its exit code (-N for signal N) on the reply socket; a byte from the client there kills it.

What the imports here read of the process (environment variables by name, the working folder) is watched:
an import that reads the whole environment, or the working folder (but for multiprocessing's, set again in
each child), stops the server, since a child would inherit what it read instead of reading its own.
"""

from __future__ import annotations

import builtins
import gc
import importlib
import io
import json
import os
import selectors
import signal
import socket
import struct
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.machinery import SourceFileLoader
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("config_rollback", "code_rollback", "database_rollback", "rollback")
# What the scripts import inside functions and is slow to load (0.07-0.45 s of CPU each): loaded once here too.
# Not prometheus_client (its wsgiref import copies the whole environment) nor psutil (CPU times kept at import).
LIBRARIES = ("dotenv", "ruamel.yaml", "psycopg2", "boto3")
FDS = 4  # the reply socket, then stdin, stdout and stderr travel with each request
MAX_MESSAGE = 1 << 20
STATUS = struct.Struct("i")
KILL = b"k"  # what the client sends when its timeout passes: the server kills the child, as subprocess.run does


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
                try:
                    message, fds, flags, _address = socket.recv_fds(control, MAX_MESSAGE, FDS)
                except ConnectionResetError:  # the client closed its end without reading the hello
                    return None
                if not message:
                    return None
                if flags & socket.MSG_TRUNC:
                    raise RuntimeError(f"a request longer than {MAX_MESSAGE} bytes")
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
    if "multiprocessing.process" in sys.modules:  # boto3 loads it, which notes the working folder as it loads
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.path.abspath(os.getcwd())
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


@dataclass
class _Reads:
    """What imports read of the process's state: variables by name, the whole environment, the working folder."""

    variables: set[str] = field(default_factory=set)
    whole_environment: list[str] = field(default_factory=list)  # the modules that went through all of it
    working_folder: list[str] = field(default_factory=list)  # the modules that asked for it


@contextmanager
def _watching_reads() -> Iterator[_Reads]:
    """Record what the code run inside reads of the environment (through os.environ) and the working folder."""
    reads = _Reads()
    environ_class, getcwd = type(os.environ), os.getcwd
    getitem, iterate = environ_class.__getitem__, environ_class.__iter__

    def read_one(self: os._Environ, key: str) -> str:
        reads.variables.add(key)  # get(), `in` and os.getenv all come through here
        return getitem(self, key)

    def read_all(self: os._Environ) -> Iterator[str]:
        reads.whole_environment.append(_importing_module())
        return iterate(self)

    def read_folder() -> str:
        reads.working_folder.append(_importing_module())
        return getcwd()

    environ_class.__getitem__, environ_class.__iter__, os.getcwd = read_one, read_all, read_folder
    try:
        yield reads
    finally:
        environ_class.__getitem__, environ_class.__iter__, os.getcwd = getitem, iterate, getcwd


def _importing_module() -> str:
    """The module whose code called the function that called this one (past os's and collections.abc's)."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_globals.get("__name__") in ("os", "posixpath", "collections.abc"):
        frame = frame.f_back
    return str(frame.f_globals.get("__name__"))


def _preload() -> tuple[dict[str, types.CodeType], set[str]]:
    """Import the scripts and the libraries; their code by path, and the variables their imports read."""
    code = {}
    with _watching_reads() as reads:
        for name in SCRIPTS:
            importlib.import_module(name)
            path = str(ROOT / f"{name}.py")
            code[path] = compile(Path(path).read_bytes(), path, "exec", dont_inherit=True)
        for name in LIBRARIES:
            try:
                importlib.import_module(name)
            except ImportError:
                continue  # a script that needs it fails as it would have without this server
    kept_folder = set(reads.working_folder) - {"multiprocessing.process"}
    if reads.whole_environment or kept_folder:
        raise RuntimeError(f"an import read the whole environment ({reads.whole_environment}) or the working "
                           f"folder ({sorted(kept_folder)}): a forked child would see the server's, not its own")
    return code, reads.variables


def main() -> None:
    """The server: import the scripts, say which variables that read, fork for each request until the end."""
    sys.path[0] = str(ROOT)  # where `python ROOT/script.py` finds the toolkit
    added = _added_at_start()
    code, variables = _preload()
    gc.freeze()  # the children share these pages rather than copy them when a collection touches them
    control = socket.socket(fileno=int(sys.argv[1]))
    control.send(json.dumps({"read_at_import": sorted(variables)}).encode())
    request = serve(control)
    if request is None:
        return
    namespace = start_child(request, added)
    script = sys.argv[0]
    exec(code.get(script) or compile(Path(script).read_bytes(), script, "exec", dont_inherit=True), namespace)


if __name__ == "__main__":
    main()
