"""The shared library (common/) on real files and processes: safe files, settings, the tool runner, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, process_state, wait_until_dead

from common.errors import SettingError, ToolkitError, UsageError
from common.files import atomic_write, make_private_dir, resolve_inside
from common.proc import run_tool, secret_file
from common.settings import Settings
from common.signals import stop_signals_held


def test_atomic_write_sets_mode_whatever_the_umask_and_leaves_no_temp(tmp_path: Path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a.conf", b"one", mode=0o644)
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        atomic_write(tmp_path / "b.conf", b"two")
        make_private_dir(tmp_path / "x" / "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.conf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.conf").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "x" / "y").stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.conf", "b.conf", "x"]


def test_resolve_inside_refuses_escapes(tmp_path: Path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.yml").write_text("a: 1\n")
    os.symlink(tmp_path, root / "out")
    os.symlink("sub/ok.yml", root / "inner-link.yml")
    assert resolve_inside(root, "sub/ok.yml") == (root / "sub" / "ok.yml").resolve()
    assert resolve_inside(root, "inner-link.yml") == (root / "sub" / "ok.yml").resolve()
    for bad in ("../x", "/etc/passwd", "sub/../../x", "out/anything"):
        with pytest.raises(UsageError):
            resolve_inside(root, bad)


def test_settings_precedence_and_errors(tmp_path: Path):
    env_file = tmp_path / "s.env"
    env_file.write_text("DB_PORT=6543\nDB_NAME=fromfile\nEMPTY=\n")
    settings = Settings.load(str(env_file), environ={"DB_NAME": "fromenv", "DB_BAD": "12x"})
    assert settings.text("DB_NAME") == "fromenv"
    assert settings.integer("DB_PORT", 5432) == 6543
    assert settings.text("EMPTY", "default") == "default"
    assert settings.integer("UNSET", 7) == 7
    with pytest.raises(SettingError, match="DB_BAD must be a whole number"):
        settings.integer("DB_BAD", 1)
    with pytest.raises(SettingError, match="DB_PASSWORD is not set"):
        settings.text("DB_PASSWORD", required=True)
    with pytest.raises(SettingError, match="no such file"):
        Settings.load(str(tmp_path / "missing.env"), environ={})


def test_run_tool_shows_stderr_of_a_failing_tool():
    with pytest.raises(ToolkitError) as failure:
        run_tool([sys.executable, "-c", "import sys; sys.stderr.write('boom: bad thing\\n'); sys.exit(4)"], "the tool")
    assert "the tool failed (exit 4): boom: bad thing" in str(failure.value)
    with pytest.raises(ToolkitError, match="not found"):
        run_tool(["no-such-tool-anywhere"], "a missing tool")


def test_run_tool_passes_secrets_through_environment_not_argv():
    result = run_tool([sys.executable, "-c", "import os; print(os.environ['SECRET_FILE'])"], "env check",
                      env={"SECRET_FILE": "/private/path"})
    assert result.stdout.decode().strip() == "/private/path"


def test_sigterm_stops_the_child_tool(tmp_path: Path):
    """A wrapper running a long tool is sent SIGTERM: the tool must not outlive it."""
    fifo = tmp_path / "child.pid"
    os.mkfifo(fifo)
    child_code = f"import os, time; open({str(fifo)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    wrapper_code = (
        "import signal, sys\n"
        "from commands.run import _raise_interrupted\n"
        "from common.proc import run_tool\n"
        "signal.signal(signal.SIGTERM, _raise_interrupted)\n"
        f"run_tool([sys.executable, '-c', {child_code!r}], 'a long tool')\n"
    )
    wrapper = subprocess.Popen([sys.executable, "-c", wrapper_code], cwd=ROOT, stderr=subprocess.PIPE)
    with open(fifo) as reader:  # blocks until the child is running
        child_pid = int(reader.read())
    wrapper.send_signal(signal.SIGTERM)
    _, err = wrapper.communicate(timeout=30)
    assert b"interrupted by SIGTERM" in err
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_sigkill_of_the_toolkit_kills_the_tool_it_runs(tmp_path: Path):
    """SIGKILL cannot be caught, so only the kernel can end the child: it must not outlive its parent."""
    fifo = tmp_path / "child.pid"
    os.mkfifo(fifo)
    child_code = f"import os, time; open({str(fifo)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    wrapper_code = ("import sys\nfrom common.proc import run_tool\n"
                    f"run_tool([sys.executable, '-c', {child_code!r}], 'a long tool')")
    wrapper = subprocess.Popen([sys.executable, "-c", wrapper_code], cwd=ROOT)
    with open(fifo) as reader:  # blocks until the child is running
        child_pid = int(reader.read())
    wrapper.kill()
    wrapper.wait()
    try:
        assert wait_until_dead(child_pid), "the tool outlived the process that started it"
    finally:
        if process_state(child_pid) not in ("gone", "Z"):
            os.kill(child_pid, signal.SIGKILL)


def test_secret_file_reaches_the_child_and_has_no_name_anywhere(tmp_path: Path):
    with secret_file("hunter2\n") as secret:
        mode = os.fstat(secret.fd).st_mode & 0o777
        result = run_tool([sys.executable, "-c", "import os, sys; print(open(sys.argv[1]).read().strip(),"
                           " oct(os.stat(sys.argv[1]).st_mode & 0o777))", secret.child_path],
                          "read", pass_fds=[secret.fd])
        fd = secret.fd
    assert mode == 0o600
    assert result.stdout.decode().split() == ["hunter2", "0o600"]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the block: the memory is gone with the last holder


def test_stop_signals_held_notes_a_signal_and_delivers_it_when_the_block_ends():
    seen, noted = [], []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("handled"))
    try:
        with stop_signals_held(lambda: noted.append("noted")):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # handlers run between bytecodes: give it some
                pass
            seen.append("block went on")
        assert seen == ["block went on", "handled"] and noted == ["noted"]
    finally:
        signal.signal(signal.SIGTERM, previous)
