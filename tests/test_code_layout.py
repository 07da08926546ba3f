"""Where code_rollback.py builds and switches trees: a new host's first deploy, and what stopped runs leave behind
(named by verify, removed by cleanup, never while a run still builds it), down to SIGKILL at any moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace, commit_v2, git_archive_tree
from helpers import git, script_argv, writer_once_read


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
    assert sorted(os.listdir(tmp_path / "app" / "releases")) == sorted([release, newer])  # the old one is kept
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
    for i in range(600):  # enough for the build to copy on several processes
        (live / f"f{i:03d}.py").write_bytes(os.urandom(2000))
    assert cw.run("backup").returncode == 0
    backed_up = cw.tree()
    backup_id = cw.backup_ids()[0]
    (live / "app.py").write_text("print('deployed')\n")
    before = cw.tree()
    held = cw.store / backup_id / "tree" / "f300.py"  # the copy worker that reaches it waits to read it
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
