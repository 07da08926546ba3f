"""code_rollback.py backup, restore, verify, list and cleanup on real folders and a real git repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace, commit_v2, git_archive_tree, in_place_workspace
from helpers import git, script_argv, tree_snapshot, writer_once_read

from backup_store.manifest import load_backup


@pytest.fixture
def in_place(tmp_path: Path) -> CodeWorkspace:
    return in_place_workspace(tmp_path)


@pytest.fixture(params=["plain-folder", "symlink"])
def cw(request, tmp_path: Path) -> CodeWorkspace:
    return CodeWorkspace(tmp_path, symlink_layout=request.param == "symlink")


def test_restore_gives_back_exactly_the_backup(cw: CodeWorkspace):
    before = cw.tree()
    result = cw.run("backup", "--label", "v1")
    assert result.returncode == 0, result.stderr
    live = Path(os.path.realpath(cw.live))
    (live / "app.py").write_text("print('broken')\n")
    (live / "pkg" / "__init__.py").unlink()
    (live / "new.py").write_text("x = 1\n")
    os.chmod(live / "run.sh", 0o644)
    broken = cw.tree()

    result = cw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == before
    assert os.readlink(Path(os.path.realpath(cw.live)) / "outside-link") == "/etc/hostname"
    report = json.loads(result.stdout)
    assert report["switch"]["how"] == ("symlink" if cw.live.is_symlink() else "exchange")
    assert report["safety_backup"] in cw.backup_ids()
    assert not [p for p in cw.root.iterdir() if p.name.startswith(".deploy.tmp")]
    # The safety backup, taken while the new tree was built, is the tree the restore replaced.
    result = cw.run("restore", report["safety_backup"], "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == broken


def test_restore_of_a_large_tree_while_the_safety_backup_copies_it_too(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    for i in range(600):  # enough for both the build and the safety backup to copy on several processes
        folder = cw.live / f"mod{i % 12:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{i:03d}.py").write_bytes(os.urandom(1000 + i))
    assert cw.run("backup").returncode == 0
    before = cw.tree()
    for path in cw.live.rglob("f*.py"):
        path.write_bytes(os.urandom(900))  # every file changed: the safety backup copies them all
    changed = cw.tree()

    result = cw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == before
    safety = json.loads(result.stdout)["safety_backup"]
    assert cw.run("restore", safety, "--yes").returncode == 0
    assert cw.tree() == changed


def test_replaced_tree_is_set_aside_until_cleanup(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    assert cw.run("backup").returncode == 0
    (cw.live / "app.py").write_text("print('broken')\n")
    broken = cw.tree()

    first = json.loads(cw.run("--json", "restore", "latest", "--yes").stdout)["replaced_tree"]
    assert first and Path(first).parent == cw.root and tree_snapshot(Path(first)) == broken
    second = json.loads(cw.run("--json", "restore", "latest", "--yes").stdout)["replaced_tree"]
    assert second != first

    result = cw.run("--json", "--dry-run", "cleanup", "0", "--keep", "1")
    assert json.loads(result.stdout)["would_remove_trees"] == [first] and Path(first).is_dir()
    result = cw.run("--json", "cleanup", "0", "--keep", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed_trees"] == [first]
    assert not Path(first).exists() and Path(second).is_dir()
    assert cw.run("cleanup", "30", "--keep", "1").returncode == 0 and Path(second).is_dir()


def test_verify_names_edited_and_deleted_files(cw: CodeWorkspace):
    assert cw.run("backup").returncode == 0
    assert cw.run("verify").returncode == 0
    live = Path(os.path.realpath(cw.live))
    (live / "app.py").write_text("print('hand edit')\n")
    (live / "run.sh").unlink()
    result = cw.run("--json", "verify")
    assert result.returncode == 3
    problems = json.loads(result.stdout)["problems"]
    assert "changed app.py" in problems and "removed run.sh" in problems


def test_verify_compile_catches_a_syntax_error(cw: CodeWorkspace):
    assert cw.run("backup").returncode == 0
    (Path(os.path.realpath(cw.live)) / "app.py").write_text("def broken(:\n")
    result = cw.run("verify", "--compile")
    assert result.returncode == 3
    assert "app.py: does not compile" in result.stdout
    assert not list(Path(os.path.realpath(cw.live)).rglob("*.pyc"))


def stored_file(cw: CodeWorkspace, backup_id: str, path: str) -> Path:
    """Where backup `backup_id` keeps the content of its file `path`."""
    backup = load_backup(cw.store / backup_id)
    return Path(backup.payload(next(entry for entry in backup.files if entry.path == path)))


def test_unchanged_second_backup_shares_every_file(cw: CodeWorkspace):
    assert cw.run("backup").returncode == 0
    result = cw.run("--json", "backup")
    assert result.returncode == 0
    stats = json.loads(result.stdout)["snapshot"]
    assert stats["copied"] == 0 and stats["linked"] + stats["rehashed"] == stats["files"] == 3
    newest, oldest = cw.backup_ids()
    inodes = {stored_file(cw, backup, "tree/app.py").stat().st_ino for backup in (newest, oldest)}
    assert len(inodes) == 1


def test_damaged_backup_is_refused_and_live_tree_unchanged(cw: CodeWorkspace):
    assert cw.run("backup").returncode == 0
    payload = stored_file(cw, cw.backup_ids()[0], "tree/app.py")
    os.chmod(payload, 0o600)
    payload.write_text("print('v1!')\n")
    (Path(os.path.realpath(cw.live)) / "app.py").write_text("print('deployed')\n")
    before, backups = cw.tree(), cw.backup_ids()
    result = cw.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert "damaged" in result.stderr
    assert cw.tree() == before
    assert cw.backup_ids() == backups  # the safety backup taken meanwhile went with the failed build


def test_lock_held_exits_75_and_commit_is_recorded(cw: CodeWorkspace):
    from backup_store.store import BackupStore

    with BackupStore(cw.store, "code").lock("a deploy in progress"):
        assert cw.run("backup").returncode == 75
    result = cw.run("--json", "backup")
    assert json.loads(result.stdout)["commit"] == git(cw.repo, "rev-parse", "HEAD")
    assert cw.run("cleanup", "0", "--keep", "1").returncode == 0
    assert len(cw.backup_ids()) == 1


def test_rollback_to_a_tag_gives_exactly_git_archive_of_it(cw: CodeWorkspace):
    commit_v2(cw)
    result = cw.run("rollback", "v1", "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == git_archive_tree(cw.repo, "v1", cw.root / "expected")
    assert cw.run("verify").returncode == 0
    listing = json.loads(cw.run("--json", "list").stdout)["backups"]
    deployed = next(b for b in listing if (b["label"] or "").startswith("deployed by rollback"))
    manifest = json.loads((cw.store / deployed["id"] / "manifest.json").read_text())
    assert manifest["source"]["commit"] == git(cw.repo, "rev-parse", "v1")  # what runs, not REPO_PATH's HEAD
    (Path(os.path.realpath(cw.live)) / "app.py").write_text("edited\n")
    assert cw.run("verify").returncode == 3


def test_rolling_back_to_the_same_tag_twice_works(cw: CodeWorkspace):
    commit_v2(cw)
    expected = git_archive_tree(cw.repo, "v1", cw.root / "expected")
    for _ in range(2):
        assert cw.run("rollback", "v1", "--yes").returncode == 0
        assert cw.run("restore", cw.backup_ids()[-1], "--yes").returncode == 0  # back to the first deploy
    result = cw.run("rollback", "v1", "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == expected


@pytest.mark.parametrize("revision", ["0000dead", "--output=x", "--upload-pack=touch pwned", "-h"])
def test_bad_revisions_are_refused_with_nothing_changed(cw: CodeWorkspace, revision: str):
    before = cw.tree()
    result = cw.run("rollback", "--yes", "--", revision)
    assert result.returncode == 2, result.stderr
    assert cw.tree() == before
    assert not (cw.root / "x").exists() and not (cw.repo / "x").exists()
    assert not list(cw.root.rglob("pwned"))
    assert cw.backup_ids() == []


def test_in_place_dirty_working_copy_is_refused_then_stashed(in_place: CodeWorkspace):
    v1 = git(in_place.repo, "rev-parse", "v1")
    (in_place.repo / "app.py").write_text("print('local fix')\n")
    result = in_place.run("rollback", "v1", "--yes")
    assert result.returncode == 1
    assert "app.py" in result.stderr and "--stash" in result.stderr
    assert (in_place.repo / "app.py").read_text() == "print('local fix')\n"

    result = in_place.run("rollback", "HEAD~1", "--yes", "--stash")
    assert result.returncode == 0, result.stderr
    assert git(in_place.repo, "rev-parse", "HEAD") == v1
    assert "before rollback to" in git(in_place.repo, "stash", "list")
    assert "local fix" in git(in_place.repo, "stash", "show", "-p")
    assert (in_place.repo / "app.py").read_text() == "print('v1')\n"
    assert in_place.run("verify").returncode == 0


def test_in_place_restore_keeps_git_untouched(in_place: CodeWorkspace):
    assert in_place.run("backup").returncode == 0
    head = git(in_place.repo, "rev-parse", "HEAD")
    # `git status` (run to record local changes) may refresh .git/index on its own; the rest must not change.
    git_files = {k: v for k, v in tree_snapshot(in_place.repo / ".git").items() if k != "index"}
    before = {k: v for k, v in tree_snapshot(in_place.repo).items() if not k.startswith(".git")}
    (in_place.repo / "app.py").write_text("print('hot fix')\n")
    (in_place.repo / "v2.py").unlink()
    (in_place.repo / "stray.txt").write_text("?\n")
    result = in_place.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert {k: v for k, v in tree_snapshot(in_place.repo).items() if not k.startswith(".git")} == before
    assert {k: v for k, v in tree_snapshot(in_place.repo / ".git").items() if k != "index"} == git_files
    assert git(in_place.repo, "rev-parse", "HEAD") == head


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_restore_stopped_mid_build_changes_nothing_and_leaves_nothing_behind(tmp_path: Path, stop):
    """Stopped while a copy worker waits on a payload file: the live tree, the store and the folder are as before."""
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    (cw.live / "f300.py").write_bytes(os.urandom(2000))
    assert cw.run("backup").returncode == 0  # a few files are stored loose: f300.py's can be swapped for a fifo
    for i in range(600):
        if i != 300:
            (cw.live / f"f{i:03d}.py").write_bytes(os.urandom(2000))
    assert cw.run("backup").returncode == 0  # the others, enough for the build to copy on several processes
    backup_id = cw.backup_ids()[0]
    for path in cw.live.glob("f*.py"):
        path.write_bytes(os.urandom(500))  # the safety backup has every file to copy
    before, stored = cw.tree(), sorted(os.listdir(cw.store))
    held = stored_file(cw, backup_id, "tree/f300.py")  # the worker that reaches it waits to open it
    held.unlink()
    os.mkfifo(held)
    proc = subprocess.Popen(script_argv("code_rollback.py", "restore", backup_id, "--yes"),
                            env={**os.environ, **cw.env}, cwd=cw.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    writer = writer_once_read(held, proc)  # a copy worker is reading it
    try:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
    assert proc.returncode == 1 and "interrupted by SIG" in err
    assert cw.tree() == before
    assert sorted(os.listdir(cw.store)) == stored  # no safety backup, no staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code_backups", "deploy", "releases", "repo"]


def test_a_restore_stopped_while_its_safety_backup_runs_cancels_it(tmp_path: Path):
    """SIGTERM after the build, while the safety backup is still busy: it is cancelled, nothing is left behind."""
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    assert cw.run("backup").returncode == 0
    backed_up = cw.tree()
    (cw.live / "app.py").write_text("print('deployed')\n")
    before, stored = cw.tree(), sorted(os.listdir(cw.store))
    # The safety backup asks git for the working copy's state; git's fsmonitor hook holds it there.
    hold = tmp_path / "hold"
    os.mkfifo(hold)
    hook = tmp_path / "releases" / "fsmonitor.sh"
    hook.write_text(f"#!/bin/sh\n[ -p {hold} ] && cat {hold} > /dev/null && rm -f {hold}\nexit 1\n")
    os.chmod(hook, 0o755)
    git(cw.repo, "config", "core.fsmonitor", str(hook))
    proc = subprocess.Popen(script_argv("code_rollback.py", "restore", "latest", "--yes"),
                            env={**os.environ, **cw.env}, cwd=cw.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    writer = writer_once_read(hold, proc)  # the hook is reading: the safety backup has begun and waits
    deadline = time.monotonic() + 60
    try:
        built = None
        while built is None or tree_snapshot(built) != backed_up:
            assert proc.poll() is None and time.monotonic() < deadline  # the build runs on meanwhile
            built = next((p for p in tmp_path.iterdir() if p.name.startswith(".deploy.tmp")), None)
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
    finally:
        os.close(writer)  # the hook, then git, then the cancelled snapshot end
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted by SIGTERM" in err
    assert cw.tree() == before
    assert sorted(os.listdir(cw.store)) == stored  # no safety backup, no staging folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy")]


def test_in_place_restore_reports_what_it_does_not_how_the_tree_differed(in_place: CodeWorkspace):
    assert in_place.run("backup").returncode == 0
    (in_place.repo / "app.py").write_text("print('hot fix')\n")
    (in_place.repo / "v2.py").unlink()
    (in_place.repo / "stray.txt").write_text("?\n")
    repo = in_place.repo
    plan = in_place.run("restore", "latest", "--dry-run")
    assert plan.stdout.splitlines()[1:4] == [f"  re-create  {repo}/v2.py", f"  delete     {repo}/stray.txt",
                                             f"  change     {repo}/app.py"]
    result = in_place.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:4] == [f"  re-created {repo}/v2.py", f"  deleted    {repo}/stray.txt",
                                               f"  changed    {repo}/app.py"]


def test_release_restore_dry_run_says_what_the_switch_would_change(cw: CodeWorkspace):
    assert cw.run("backup").returncode == 0
    live = Path(os.path.realpath(cw.live))
    (live / "app.py").write_text("print('v2')\n")
    (live / "new.py").write_text("x = 2\n")
    (live / "pkg" / "__init__.py").unlink()
    before = cw.tree()
    result = cw.run("restore", "latest", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        f"  re-create  {cw.live}/pkg/__init__.py", f"  delete     {cw.live}/new.py", f"  change     {cw.live}/app.py"]
    assert json.loads(cw.run("--json", "restore", "latest", "--dry-run").stdout)["changes"] == {
        "re_created": ["pkg/__init__.py"], "deleted": ["new.py"], "changed": ["app.py"]}
    assert cw.tree() == before
