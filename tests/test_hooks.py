"""PRE_RESTORE_HOOK and POST_RESTORE_HOOK as small scripts: done when they exit, stopped with all they started,
their output bounded, and checked before a restore's first change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import process_state, script_argv, wait_until_dead
from point_system import System, take_point

from common.hooks import OUTPUT_KEPT_BYTES, run_hook


@pytest.fixture
def system(tmp_path: Path, pg_db) -> System:
    return System(tmp_path, pg_db)


def test_a_start_hook_that_leaves_the_application_running_is_done_when_it_exits(system: System):
    before = system.state()
    take_point(system)
    system.break_everything()
    app_pid = system.root / "app.pid"
    start = f"sh -c 'sleep 600 & echo $! > {app_pid}; echo started'"  # the application, in the background
    result = system.run("--json", "restore", "latest", "--yes", POST_RESTORE_HOOK=start, HOOK_TIMEOUT_SECONDS="60")
    pid = int(app_pid.read_text())
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        hook = report["hooks"][0]
        assert (hook["name"], hook["exit_code"], hook["output"]) == ("POST_RESTORE_HOOK", 0, "started\n")
        assert hook["seconds"] < 30  # not the HOOK_TIMEOUT_SECONDS the output staying open used to cost
        assert system.state() == before
        assert process_state(pid) not in ("gone", "Z")  # the application still runs after the tool has gone
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_hook_past_its_timeout_is_stopped_with_everything_it_started(system: System):
    take_point(system)
    system.break_everything()
    broken = system.state()
    child_pid = system.root / "child.pid"
    stop = f"sh -c 'sleep 777 & echo $! > {child_pid}; exec sleep 600'"  # hangs, and started something
    result = system.run("restore", "latest", "--yes", PRE_RESTORE_HOOK=stop, HOOK_TIMEOUT_SECONDS="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PRE_RESTORE_HOOK" in result.stderr and "did not finish within 1 s" in result.stderr
    assert "nothing was restored" in result.stderr
    assert wait_until_dead(int(child_pid.read_text()), timeout=10)  # `sleep 777` survived the tool before
    assert system.state() == broken


_MEASURED = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True)
sys.stdout.buffer.write(done.stdout)
sys.stderr.buffer.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)  # KiB, the largest child
sys.exit(done.returncode)
"""


def test_what_is_kept_of_a_hooks_output_is_bounded_in_memory_the_report_and_the_audit_log(system: System):
    take_point(system)
    system.break_everything()
    size = 200_000_000
    # 200 MB on stderr, one line without an end, then a failure: the tool used to hold it all, twice over.
    flood = f"sh -c 'head -c {size} /dev/zero | tr \"\\0\" x >&2; echo \" the end\" >&2; exit 4'"
    env = {**os.environ, **system.env, "POST_RESTORE_HOOK": flood}
    done = subprocess.run([sys.executable, "-c", _MEASURED, *script_argv("rollback.py", "--json", "restore",
                                                                           "latest", "--yes")],
                          env=env, cwd=system.root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    largest_kib = int(done.stderr.strip().splitlines()[-1])
    assert largest_kib < 150 * 1024, f"{largest_kib} KiB"
    report = json.loads(done.stdout)
    assert "POST_RESTORE_HOOK" in report["failure"] and "(exit 4)" in report["failure"]
    assert report["failure"].count("x") < 400 and "x the end" in report["failure"]
    hook = report["hooks"][0]
    assert len(hook["output"]) == OUTPUT_KEPT_BYTES and hook["output"].endswith("xx the end\n")
    assert hook["output_dropped_bytes"] == size + len(" the end\n") - OUTPUT_KEPT_BYTES
    assert len(done.stdout) < 2 * OUTPUT_KEPT_BYTES
    audit = (system.root / "points" / "audit.log").read_text().splitlines()[-1]
    assert len(audit) < OUTPUT_KEPT_BYTES and json.loads(audit)["exit_code"] == 1


@pytest.mark.parametrize("setting", ["PRE_RESTORE_HOOK", "POST_RESTORE_HOOK"])
def test_a_hook_that_cannot_run_stops_the_restore_before_its_first_change(system: System, setting: str):
    take_point(system)
    system.break_everything()
    broken = system.state()
    not_executable = system.root / "start-app.sh"
    not_executable.write_text("#!/bin/sh\necho started\n")
    for command, why in ((f"{system.root}/no-such-hook --now", "no such executable file"),
                         ("start-the-app-typo", "not found on PATH"),
                         (str(not_executable), "not executable")):
        result = system.run("restore", "latest", "--yes", **{setting: command})
        assert result.returncode == 2, result.stdout + result.stderr
        assert setting in result.stderr and why in result.stderr and "nothing changed" in result.stderr
        assert system.state() == broken


def test_a_hook_that_writes_without_end_is_still_stopped_at_its_timeout():
    hook = run_hook("PRE_RESTORE_HOOK", ["yes", "a line that never ends"], timeout=1)
    assert hook.exit_code is None and hook.seconds < 10
    assert len(hook.output) == OUTPUT_KEPT_BYTES and hook.output.endswith("never ends\n")


def test_what_a_hook_leaves_writing_to_its_output_keeps_running(tmp_path: Path):
    """After the hook exits its output is read and thrown away: closed, it would kill the writer (SIGPIPE)."""
    group, ticks = tmp_path / "group", tmp_path / "ticks"
    # "started" comes first: the writer starts after it, so the hook's output begins with it on any scheduler
    script = f"echo $$ > {group}; echo started; (while :; do echo tick; echo tick >> {ticks}; done) &"
    hook = run_hook("POST_RESTORE_HOOK", ["sh", "-c", script], timeout=30)
    assert hook.exit_code == 0 and hook.output.startswith("started\n")
    try:
        deadline = time.monotonic() + 30
        while not ticks.exists():  # the writer may not have run yet when the hook's shell exits
            assert time.monotonic() < deadline, "the background writer never started"
        seen = ticks.stat().st_size
        while ticks.stat().st_size < seen + 100_000:  # it goes on writing, to its output too
            assert time.monotonic() < deadline, "the background writer stopped"
    finally:
        os.killpg(int(group.read_text()), signal.SIGKILL)
