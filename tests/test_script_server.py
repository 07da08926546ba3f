"""The script server behind run_script: a forked run must be what a cold `python script.py` is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ROOT, script_server, wait_until_dead
from script_client import ScriptServer
from script_server import _watching_reads

# Prints what a process gets from its start rather than from its code: environment, folder, fds, argv, module
# path, signal handlers and mask, umask, limits, standard streams, flags, locale, __main__; then its stdin.
PROBE = """\
import json, locale, multiprocessing.process, os, resource, signal, sys, tempfile, threading, time

def handler(h):
    return {signal.SIG_DFL: "SIG_DFL", signal.SIG_IGN: "SIG_IGN", None: None}.get(h, getattr(h, "__name__", None))

def stream(s):
    raw = getattr(s.buffer, "raw", s.buffer)
    return [s.name, s.mode, s.encoding, s.errors, s.line_buffering, s.write_through, type(s.buffer).__name__,
            raw.name, s.isatty()]

print(json.dumps({
    "environ": dict(os.environ), "cwd": os.getcwd(), "fds": sorted(os.listdir("/proc/self/fd")), "argv": sys.argv,
    "path": sys.path[1:], "signals": {s.name: handler(signal.getsignal(s)) for s in signal.Signals
                                       if s not in (signal.SIGKILL, signal.SIGSTOP)},
    "mask": sorted(map(int, signal.pthread_sigmask(signal.SIG_BLOCK, []))),
    "umask": open("/proc/self/status").read().split("Umask:")[1].split()[0],
    "limits": {n: resource.getrlimit(getattr(resource, n)) for n in dir(resource) if n.startswith("RLIMIT_")},
    "stdio": [stream(s) for s in (sys.stdin, sys.stdout, sys.stderr)],
    "dunder": [sys.__stdin__ is sys.stdin, sys.__stdout__ is sys.stdout, sys.__stderr__ is sys.stderr],
    "flags": str(sys.flags), "threads": threading.active_count(), "group": [os.getpgrp(), os.getsid(0)],
    "tempdir": tempfile.tempdir, "locale": locale.setlocale(locale.LC_ALL), "encoding": locale.getpreferredencoding(),
    "tz": time.tzname, "main": [__name__, __file__, __spec__, type(__loader__).__name__, __cached__],
    "multiprocessing": multiprocessing.process.ORIGINAL_DIR, "stdin": sys.stdin.read(),
}, sort_keys=True))
sys.stdout.write("ends\\r\\nin\\rno newline")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def server() -> ScriptServer:
    return script_server()


def cold_run(argv: list[str], env: dict[str, str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    """What run_script did before it had a server: a fresh interpreter."""
    return subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60)


def test_a_forked_run_starts_as_a_fresh_interpreter_does(server: ScriptServer, tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**server.env, "ONLY_THIS_RUN": "é €"}
    argv = [sys.executable, str(probe), "3"]
    forked = server.run(argv, env, tmp_path, "line one\r\nline two\rthree é", timeout=60)
    cold = cold_run(argv, env, tmp_path, "line one\r\nline two\rthree é")
    assert (forked.returncode, forked.stdout, forked.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert forked.returncode == 3 and forked.stderr == ""
    assert forked.stdout.endswith("}\nends\nin\nno newline")  # text=True makes every line ending \n
    state = json.loads(forked.stdout.split("\n")[0])
    assert state["environ"]["ONLY_THIS_RUN"] == "é €" and state["stdin"] == "line one\r\nline two\rthree é"


def test_the_next_run_sees_nothing_of_the_last_one(server: ScriptServer, tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    argv = [sys.executable, str(probe), "0"]
    server.run(argv, {**server.env, "LEFT_BEHIND": "1"}, tmp_path, "", timeout=60)
    state = json.loads(server.run(argv, server.env, ROOT, "", timeout=60).stdout.split("\n")[0])
    assert "LEFT_BEHIND" not in state["environ"] and state["cwd"] == str(ROOT)


@pytest.mark.parametrize("args", [["--help"], ["backup", "--bogus"], ["--json", "list"]])
@pytest.mark.parametrize("script", ["config_rollback.py", "code_rollback.py", "database_rollback.py", "rollback.py"])
def test_each_script_prints_and_exits_as_from_a_cold_start(server: ScriptServer, tmp_path: Path, script: str,
                                                           args: list[str]):
    argv = [sys.executable, str(ROOT / script), *args]
    env = {**server.env, "CONFIG_BACKUP_DIR": "c", "CODE_BACKUP_DIR": "k", "BACKUP_DIR": "d", "POINTS_DIR": "p",
           "REPO_PATH": str(tmp_path), "DB_HOST": str(tmp_path)}
    forked, cold = server.run(argv, env, tmp_path, "", timeout=60), cold_run(argv, env, tmp_path)
    assert (forked.args, forked.returncode, forked.stdout, forked.stderr) == (cold.args, cold.returncode, cold.stdout,
                                                                              cold.stderr)
    assert forked.returncode == {"--help": 0, "backup": 2, "--json": 0}[args[0]], forked.stderr


@pytest.mark.parametrize(("code", "returncode", "stderr_end"), [
    ("raise ValueError('boom')", 1, "ValueError: boom\n"),
    ("import sys; sys.exit('a message instead of a code')", 1, "a message instead of a code\n"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -15, ""),
    ("import threading, time; threading.Thread(target=lambda: (time.sleep(0.2), print('joined'))).start()", 0, ""),
    ("import atexit; atexit.register(print, 'at exit')", 0, ""),
])
def test_an_ending_gives_the_exit_code_and_output_of_a_cold_start(server: ScriptServer, tmp_path: Path, code: str,
                                                                   returncode: int, stderr_end: str):
    (tmp_path / "end.py").write_text(code + "\n")
    argv = [sys.executable, str(tmp_path / "end.py")]
    forked, cold = server.run(argv, server.env, tmp_path, "", timeout=60), cold_run(argv, server.env, tmp_path)
    assert (forked.returncode, forked.stdout) == (cold.returncode, cold.stdout)
    assert forked.returncode == returncode and forked.stderr.endswith(stderr_end) and cold.stderr.endswith(stderr_end)


def test_a_run_past_its_timeout_is_killed(server: ScriptServer, tmp_path: Path):
    (tmp_path / "stuck.py").write_text("import os, sys, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        server.run([sys.executable, str(tmp_path / "stuck.py")], server.env, tmp_path, "", timeout=2)
    assert wait_until_dead(int(stopped.value.stdout))


def test_runs_from_several_threads_at_once_each_get_their_own_streams(server: ScriptServer, tmp_path: Path):
    # More than a pipe holds each way: the server's client must write and read at once, or it would hang.
    (tmp_path / "echo.py").write_text("import sys\ndata = sys.stdin.read()\nsys.stdout.write(data)\n"
                                      "sys.stderr.write(data[::-1])\n")
    argv = [sys.executable, str(tmp_path / "echo.py")]
    inputs = [f"{n}" * 300_000 + "\n" for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda data: server.run(argv, server.env, tmp_path, data, timeout=60), inputs))
    assert [(run.returncode, run.stdout, run.stderr) for run in runs] == [(0, d, d[::-1]) for d in inputs]


def test_what_a_fork_would_inherit_wrongly_goes_to_a_cold_start(server: ScriptServer, tmp_path: Path):
    """Settings the interpreter reads as it starts, variables the imports read, and the umask the toolkit reads at
    import are the server's in a forked child: a run that wants others cannot be forked."""
    assert server.can_run(server.env, tmp_path)
    for name, value in (("LC_ALL", "C"), ("PYTHONHASHSEED", "1"), ("TZ", "Asia/Tokyo"), ("TMPDIR", str(tmp_path)),
                        *((name, server.env.get(name, "") + "x") for name in server.read_at_import)):
        assert not server.can_run({**server.env, name: value}, tmp_path), name
    assert not server.can_run(server.env, tmp_path / "missing")
    before = os.umask(0o077)
    try:
        if before == 0o077:
            os.umask(0o022)
        assert not server.can_run(server.env, tmp_path)
    finally:
        os.umask(before)


def test_the_server_ends_when_its_test_process_lets_go(tmp_path: Path):
    own = ScriptServer(dict(os.environ))
    (tmp_path / "ok.py").write_text("print('ok')\n")
    assert own.run([sys.executable, str(tmp_path / "ok.py")], own.env, tmp_path, "", timeout=60).stdout == "ok\n"
    assert own.stop() == 0


def test_the_server_notes_what_an_import_reads_of_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "reads_state.py").write_text(
        "import os\nA = os.environ.get('SOME_SETTING')\nB = 'OTHER' in os.environ\nC = os.getcwd()\n"
        "D = dict(os.environ)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with _watching_reads() as reads:
        __import__("reads_state")
    assert {"SOME_SETTING", "OTHER"} <= reads.variables
    assert reads.working_folder == reads.whole_environment == ["reads_state"]
    assert os.getcwd.__module__ == "posix" and "SOME_SETTING" not in os.environ  # as it was, outside
