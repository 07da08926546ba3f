"""Where code_rollback.py builds and switches trees: a new host's first deploy, and what stopped runs leave behind
(named by verify, removed by cleanup, never while a run still builds it), down to SIGKILL at any moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace, commit_v2, git_archive_tree
from helpers import git, script_argv, writer_once_read

from backup_store.copier import PARALLEL_FROM
from backup_store.manifest import load_backup


@pytest.fixture(params=["plain-folder", "symlink"])
def cw(request, tmp_path: Path) -> CodeWorkspace:
    return CodeWorkspace(tmp_path, symlink_layout=request.param == "symlink")


# -- a new host ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deployment", ["deploy", "srv/app/deploy"])
def test_first_rollback_into_a_missing_folder_creates_it_without_a_safety_backup(tmp_path: Path, deployment: str):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    cw.live = tmp_path / "new-host" / deployment
    cw.env["DEPLOYMENT_DIR"] = str(cw.live)
    result = cw.run("--json", "rollback", "v1", "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["safety_backup"] is None and "does not exist yet" in report["safety_backup_skipped"]
    assert cw.live.is_dir() and not cw.live.is_symlink()
    assert cw.tree() == git_archive_tree(cw.repo, "v1", tmp_path / "expected")
    assert cw.run("verify").returncode == 0
    text = cw.run("rollback", "v1", "--yes")  # the second one has something to save
    assert text.returncode == 0 and "no safety backup" not in text.stdout and "to undo" in text.stdout


def test_first_rollback_into_a_missing_current_makes_the_symlink_layout(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    cw.live = tmp_path / "app" / "current"
    cw.env["DEPLOYMENT_DIR"] = str(cw.live)
    result = cw.run("rollback", "v1", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"no safety backup: {cw.live} does not exist yet: nothing to save" in result.stdout
    release = f"commit-{git(cw.repo, 'rev-parse', 'v1')[:12]}"
    assert os.readlink(cw.live) == f"releases/{release}"
    assert cw.tree() == git_archive_tree(cw.repo, "v1", tmp_path / "expected")
    commit_v2(cw)
    assert cw.run("rollback", "HEAD", "--yes").returncode == 0
    newer = f"commit-{git(cw.repo, 'rev-parse', 'HEAD')[:12]}"
    assert os.readlink(cw.live) == f"releases/{newer}"
    kept = sorted(name for name in os.listdir(tmp_path / "app" / "releases") if not name.startswith("."))
    assert kept == sorted([release, newer])  # the old one is kept (beside each, its manifest)
    assert cw.run("verify").returncode == 0


def test_restore_into_a_symlink_to_nothing_builds_the_release_it_needs(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    assert cw.run("backup").returncode == 0
    expected = cw.tree()
    os.rename(tmp_path / "releases", tmp_path / "old-releases")  # `current` now points at nothing
    result = cw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert "points at nothing" in json.loads(result.stdout)["safety_backup_skipped"]
    assert cw.tree() == expected and Path(os.path.realpath(cw.live)).parent == tmp_path / "releases"


# -- what a stopped run leaves ---------------------------------------------------------------------------


def half_built(cw: CodeWorkspace) -> list[Path]:
    """Every `.NAME.tmp-*` beside DEPLOYMENT_DIR and in its releases folder, and unfinished backups in the store."""
    places = {cw.root, cw.root / "releases"}
    found = [item for place in places for item in place.iterdir() if item.name.startswith(f".{cw.live.name}.tmp-")]
    return sorted(found) + sorted(item for item in cw.store.iterdir() if item.name.startswith(".staging-"))


def test_a_killed_restores_half_built_tree_is_named_by_verify_and_removed_by_cleanup(cw: CodeWorkspace):
    live = Path(os.path.realpath(cw.live))
    (live / "f300.py").write_bytes(os.urandom(2000))
    assert cw.run("backup").returncode == 0  # a few files are stored loose: f300.py's can be swapped for a fifo
    for i in range(600):  # the others, enough for the build to copy on several processes
        if i != 300:
            (live / f"f{i:03d}.py").write_bytes(os.urandom(2000))
    assert cw.run("backup").returncode == 0
    backed_up = cw.tree()
    backup_id = cw.backup_ids()[0]
    (live / "app.py").write_text("print('deployed')\n")
    # The live f300.py differs from the backup's: the safety backup taken meanwhile stores other content, and
    # never rewrites the stored copy this test holds (it would replace what it takes for an object cut short).
    (live / "f300.py").write_bytes(os.urandom(2000))
    before = cw.tree()
    backup = load_backup(cw.store / backup_id)
    # The stored copy of f300.py (in the store's shared objects/): the copy worker that reaches it waits to read it.
    held = Path(backup.payload(next(entry for entry in backup.entries if entry.path == "tree/f300.py")))
    content = held.read_bytes()
    held.unlink()
    os.mkfifo(held)
    proc = subprocess.Popen(script_argv("code_rollback.py", "restore", backup_id, "--yes"),
                            env={**os.environ, **cw.env}, cwd=cw.root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    writer = writer_once_read(held, proc)
    try:
        building = [p for p in half_built(cw) if ".tmp-" in p.name]
        assert len(building) == 1 and building[0].is_dir()
        # A cleanup meanwhile waits for the lock the restore holds: the tree it is building stays.
        busy = cw.run("cleanup", "0", "--keep", "1")
        assert busy.returncode == 75 and building[0].is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        os.close(writer)
    held.unlink()
    held.write_bytes(content)
    os.chmod(held, 0o400)
    assert cw.tree() == before
    left = half_built(cw)
    assert building[0] in left

    result = cw.run("--json", "verify")
    assert result.returncode == 3
    problems = json.loads(result.stdout)["problems"]
    assert all(any(str(path) in problem and "cleanup" in problem for problem in problems) for path in left)
    result = cw.run("--json", "--dry-run", "cleanup", "30")
    assert json.loads(result.stdout)["would_remove_half_built"] == [str(p) for p in left if ".tmp-" in p.name]
    assert all(path.exists() for path in left)
    result = cw.run("--json", "cleanup", "30")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed_half_built"] == [str(p) for p in left if ".tmp-" in p.name]
    assert half_built(cw) == []
    assert cw.run("restore", backup_id, "--yes").returncode == 0
    assert cw.tree() == backed_up


# -- SIGKILL at ten moments of a restore -------------------------------------------------------------------


def session_processes(session: int) -> list[int]:
    """The live processes of a session (a killed run's children would still be in it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, _group, sid = stat[stat.rindex(")") + 2:].split()[:4]
        if int(sid) == session and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def wait_for_no_processes(session: int, timeout: float = 10) -> list[int]:
    """Wait until nothing of the session runs; what is still running at the timeout."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def test_sigkill_at_ten_moments_of_a_restore_leaves_old_or_new_nothing_unnamed_and_a_retry_works(tmp_path: Path):
    """Killed at ten evenly spread moments of its work: no process of the run lives on, DEPLOYMENT_DIR is the whole
    old tree or the whole new one, and a retry right after succeeds; verify names every half-built tree, cleanup
    removes them.

    The plain-folder layout, where half-built trees are left beside DEPLOYMENT_DIR itself; the symlink layout's
    are covered above, and its switch under SIGKILL in test_code_tree. The tree is just large enough for the
    build to copy on several processes (PARALLEL_FROM files), and the moments are spread over what a run does
    once it has started, not over the interpreter's start, where a kill finds nothing to leave behind."""
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    live = cw.live
    for d in range(20):
        (live / f"d{d:02d}").mkdir()
        for f in range(20):
            (live / f"d{d:02d}" / f"f{f:02d}.py").write_bytes(os.urandom(1500))
    assert len(list(live.rglob("*.py"))) >= PARALLEL_FROM
    assert cw.run("backup").returncode == 0
    new_tree = cw.tree()

    def break_live() -> None:
        for path in Path(os.path.realpath(cw.live)).rglob("f1*.py"):
            path.write_text("old\n")

    argv = script_argv("code_rollback.py", "restore", "latest", "--yes")
    env = {**os.environ, **cw.env}
    break_live()
    old_tree = cw.tree()
    whole = float("inf")
    for _ in range(2):  # the shorter of two runs: the first one also hashes every just-written file
        break_live()
        began = time.monotonic()
        assert subprocess.run(argv, env=env, cwd=cw.root, capture_output=True).returncode == 0
        whole = min(whole, time.monotonic() - began)
    began = time.monotonic()  # a run that stops once started: its interpreter, imports, settings and store
    started = subprocess.run(script_argv("code_rollback.py", "restore", "no-such-backup", "--yes"), env=env,
                             cwd=cw.root, capture_output=True)
    assert started.returncode == 2 and b"no backup 'no-such-backup'" in started.stderr
    start = min(time.monotonic() - began, whole / 2)
    outcomes = set()
    for moment in range(10):
        break_live()
        proc = subprocess.Popen(argv, env=env, cwd=cw.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        # Not synchronisation: it picks where in the run's work the kill lands.
        time.sleep(start + (whole - start) * (moment + 0.5) / 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_for_no_processes(proc.pid) == [], f"kill {moment}: processes of the killed run live on"
        seen = cw.tree()
        assert seen in (old_tree, new_tree), f"kill {moment}: a mix of old and new"
        outcomes.add("new" if seen == new_tree else "old")
        retry = cw.run("restore", "latest", "--yes")
        assert retry.returncode == 0, f"kill {moment}: {retry.stderr}"
        assert cw.tree() == new_tree
    assert "old" in outcomes
    # What the ten kills left, the later restores working beside it all along.
    left = half_built(cw)
    assert left
    problems = json.loads(cw.run("--json", "verify").stdout)["problems"]
    assert [path for path in left if not any(str(path) in problem for problem in problems)] == []
    assert cw.run("cleanup", "30", "--keep", "100").returncode == 0
    assert half_built(cw) == []
    assert cw.run("verify").returncode == 0
