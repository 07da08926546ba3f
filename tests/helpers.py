"""Running the scripts as real processes, the way operators and CI run them."""

from __future__ import annotations

import errno
import os
import pty
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from script_client import ScriptServer

from backup_store.packs import Content

ROOT = Path(__file__).resolve().parent.parent
# Set to 1, every run_script starts a fresh interpreter, as the tests that are about start-up always do.
COLD_START = os.environ.get("TESTS_COLD_START") == "1"
_server: ScriptServer | None = None
_server_started = threading.Lock()


def script_argv(script: str, *args: str) -> list[str]:
    """argv that runs one of the toolkit's scripts with this interpreter: a fresh one, never the script server,
    so tests that signal, kill or time the process see the real start."""
    return [sys.executable, str(ROOT / script), *args]


def run_script(
    script: str, *args: str, env: dict[str, str], cwd: Path, umask: int | None = None, stdin: str | None = None,
    limits: dict[int, int] | None = None, timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run a script to completion with only `env` as settings (no terminal, like cron and CI).

    `limits` are resource limits of the child ({resource.RLIMIT_FSIZE: bytes, ...}), set before it starts.
    Without umask and limits the process is forked from a server that has imported the scripts already
    (tests/script_client.py), unless something it would inherit differs from what a cold start computes.
    """
    full_env = script_env(env)
    argv = script_argv(script, *args)
    if umask is None and not limits and not COLD_START:
        server = script_server()
        if server.can_run(full_env, cwd):
            return server.run(argv, full_env, cwd, stdin or "", timeout)
    return subprocess.run(
        argv,
        env=full_env,
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        preexec_fn=(lambda: _limit_child(umask, limits or {})) if umask is not None or limits else None,
        timeout=timeout,
    )


def script_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a script run by a test: this process's, with only `env` as the toolkit's settings."""
    own = ("CONFIG", "ENV_", "DB_", "RTO_", "METRICS_FILE")
    return {**{key: value for key, value in os.environ.items() if not key.startswith(own)}, **env}


def script_server() -> ScriptServer:
    """This test process's script server, started on first use."""
    global _server
    with _server_started:
        if _server is None:
            _server = ScriptServer(script_env({}))
        return _server


def stop_script_server() -> None:
    """End this test process's script server, if it has one."""
    global _server
    with _server_started:
        if _server is not None:
            _server.stop()
            _server = None


def _limit_child(umask: int | None, limits: dict[int, int]) -> None:
    if umask is not None:
        os.umask(umask)
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


def git(repo: Path, *args: str) -> str:
    """git in a test repository, with a fixed author so it runs on a machine without git config."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test"}
    return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Everything a restore must reproduce under `root`: type, mode, bytes or link target of each path."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", st.st_mode & 0o7777)
            else:
                found[rel] = ("file", st.st_mode & 0o7777, path.read_bytes())
    return found


def damage_content(content: Content) -> None:
    """Zero a stored content's bytes in place, its size kept: its loose file, or its span of a pack."""
    offset, size = content.span if content.span is not None else (0, os.path.getsize(content.path))
    os.chmod(content.path, 0o600)
    with open(content.path, "r+b") as stored:
        stored.seek(offset)
        stored.write(bytes(size))


def database_state(pg_db, dbname: str | None = None) -> dict:
    """Schema (as pg_dump prints it) and every row of every table and materialized view, sorted."""
    env = {**os.environ, "PGHOST": pg_db.env["DB_HOST"], "PGPORT": pg_db.env["DB_PORT"],
           "PGUSER": pg_db.env["DB_USER"], "PGDATABASE": dbname or pg_db.name}
    schema = subprocess.run(["pg_dump", "--schema-only", "--no-owner"], env=env, check=True,
                            capture_output=True, text=True).stdout
    schema = "\n".join(line for line in schema.splitlines() if not line.startswith("\\restrict")
                       and not line.startswith("\\unrestrict"))
    conn = pg_db.cluster.connect(dbname or pg_db.name)
    rows = {}
    with conn.cursor() as cur:
        cur.execute("SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm') ORDER BY 1")
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT * FROM {table}")
            rows[table] = sorted(map(repr, cur.fetchall()))
        cur.execute("SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public' AND c.relkind = 'S' ORDER BY 1")
        for (sequence,) in cur.fetchall():
            cur.execute(f"SELECT last_value, is_called FROM {sequence}")
            rows[sequence] = cur.fetchone()
    conn.close()
    return {"schema": schema, "rows": rows}


def writer_once_read(fifo: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """Open the fifo's writing end as soon as something reads it (the moment `proc` reaches it); the fd.

    The reader then waits for data, or for the end this fd's closing gives it, for as long as the test needs.
    """
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the process ended before it read the fifo"
        assert time.monotonic() < deadline, f"nothing read {fifo} within {timeout} s"
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO  # no reader yet
            time.sleep(0.001)


def process_state(pid: int) -> str:
    """The one-letter state of a process (Z for a zombie nobody has reaped yet), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def wait_until_dead(pid: int, timeout: float = 30) -> bool:
    """Whether `pid` has died (gone, or a zombie) within `timeout` seconds: a kernel's kill is not instant."""
    deadline = time.monotonic() + timeout
    while process_state(pid) not in ("gone", "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def children(pid: int) -> list[int]:
    """The processes `pid` (any of its threads) started and that have not been reaped, from the kernel's list."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> dict[int, list[str]]:
    """Every living process below `pid` (children, their children...), with its argv."""
    found: dict[int, list[str]] = {}
    frontier = [pid]
    while frontier:
        for child in children(frontier.pop()):
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if child not in found and process_state(child) not in ("gone", "Z"):
                found[child] = [arg.decode(errors="replace") for arg in argv]
                frontier.append(child)
    return found


def wait_for_child(proc: subprocess.Popen, program: str, with_arg: str | None = None, timeout: float = 60) -> int:
    """The pid of the first `program` (file name) that `proc` runs, with an argument starting `with_arg`."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the run ended before it started {program}"
        assert time.monotonic() < deadline, f"no {program} started within {timeout} s"
        for pid, argv in descendants(proc.pid).items():
            if Path(argv[0]).name == program and (with_arg is None or any(a.startswith(with_arg) for a in argv)):
                return pid


def age(root: Path, seconds_ago: int = 3600) -> None:
    """Give every regular file under `root` an mtime well in the past, out of the racy window."""
    when = time.time_ns() - seconds_ago * 10**9
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.utime(path, ns=(when, when))


class Terminal:
    """A pseudo-terminal whose screen a test reads as it is written: `follower` is the end a program writes to
    (its stderr), read on a thread so that a writer never blocks on a full terminal."""

    def __init__(self) -> None:
        self.leader, self.follower = pty.openpty()
        self._seen = b""
        self._closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.leader, 4096)
            except OSError:  # EIO: every writer has closed its end
                chunk = b""
            with self._changed:
                self._seen += chunk
                self._closed = not chunk
                self._changed.notify_all()
            if not chunk:
                return

    def wait_for(self, pattern: bytes, timeout: float = 60) -> re.Match:
        """The first match of `pattern` on the screen, once it is there (AssertionError if it never comes)."""
        with self._changed:
            self._changed.wait_for(lambda: re.search(pattern, self._seen) or self._closed, timeout)
            found = re.search(pattern, self._seen)
        assert found, f"{pattern!r} never appeared on the terminal: {self._seen[-400:]!r}"
        return found

    def screen(self, timeout: float = 60) -> bytes:
        """Everything written, once every writer has closed its end (the program ended)."""
        with self._changed:
            assert self._changed.wait_for(lambda: self._closed, timeout), "the terminal was never closed"
        self._reader.join()
        os.close(self.leader)
        return self._seen


def wait_until(check: Callable[[], object], seconds: float = 20) -> object:
    """Poll until `check` returns something truthy (what it returned), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds} s")
