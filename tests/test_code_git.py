"""The git side of code_rollback.py: commits exported safely on any Python 3.11, HEAD after in-place restores,
repositories with no commit yet, and the undo of a stashing rollback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace, git_archive_tree, in_place_workspace
from helpers import git, run_script, tree_snapshot

from common.errors import ToolkitError
from deployed_code.git import extract_archive

# -- export -------------------------------------------------------------------------------------------------


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


HOSTILE = {
    "parent": [(member("../outside.txt"), b"x")],
    "deep parent": [(member("a/../../outside.txt"), b"x")],
    "absolute": [(member("/tmp/outside.txt"), b"x")],
    "through a symlink": [(member("up", tarfile.SYMTYPE, ".."), b""), (member("up/outside.txt"), b"x")],
    "absolute symlink": [(member("etc", tarfile.SYMTYPE, "/etc"), b"")],
    "symlink out": [(member("d", tarfile.DIRTYPE, mode=0o755), b""), (member("d/out", tarfile.SYMTYPE, "../.."), b"")],
    # Each link alone stays inside; together `a` leads out (b is the tree itself, so b/b/b/.. is its parent).
    "links that lead out together": [(member("a", tarfile.SYMTYPE, "b/b/b/.."), b""),
                                     (member("b", tarfile.SYMTYPE, "."), b"")],
    "device": [(member("null", tarfile.CHRTYPE), b"")],
    "fifo": [(member("pipe", tarfile.FIFOTYPE), b"")],
    "hard link": [(member("f"), b"x"), (member("g", tarfile.LNKTYPE, "f"), b"")],
    "twice": [(member("f"), b"x"), (member("f"), b"y")],
    "empty symlink target": [(member("nothing", tarfile.SYMTYPE, ""), b"")],
}


@pytest.mark.parametrize("case", HOSTILE)
def test_an_archive_that_would_leave_the_tree_is_refused_and_nothing_is_written(tmp_path: Path, case: str):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    target = sandbox / "release"
    with pytest.raises(ToolkitError, match="refused"):
        extract_archive(tar_of(*HOSTILE[case]), target, "commit abc")
    assert not target.exists()
    assert sorted(os.listdir(sandbox)) == [] and sorted(os.listdir(tmp_path)) == ["sandbox"]


def test_an_archive_keeps_modes_links_and_folders_and_drops_unsafe_bits(tmp_path: Path):
    archive = tar_of((member("bin", tarfile.DIRTYPE, mode=0o755), b""),
                     (member("bin/run", mode=0o6777), b"#!/bin/sh\n"), (member("lib/deep/x.py"), b"x = 1\n"),
                     (member("link", tarfile.SYMTYPE, "lib/deep/x.py"), b""),
                     (member("empty", tarfile.DIRTYPE, mode=0o700), b""))
    extract_archive(archive, tmp_path / "t", "test")
    assert tree_snapshot(tmp_path / "t") == {
        "bin": ("dir", 0o755), "bin/run": ("file", 0o755, b"#!/bin/sh\n"), "empty": ("dir", 0o700),
        "lib": ("dir", 0o755), "lib/deep": ("dir", 0o755), "lib/deep/x.py": ("file", 0o644, b"x = 1\n"),
        "link": ("link", "lib/deep/x.py")}


@pytest.fixture(params=["plain-folder", "symlink"])
def cw(request, tmp_path: Path) -> CodeWorkspace:
    return CodeWorkspace(tmp_path, symlink_layout=request.param == "symlink")


def test_rollback_of_a_commit_with_links_and_nested_folders_gives_exactly_git_archive(cw: CodeWorkspace):
    (cw.repo / "pkg" / "sub").mkdir()
    (cw.repo / "pkg" / "sub" / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(cw.repo / "pkg" / "sub" / "tool.sh", 0o775)
    os.symlink("pkg/sub/tool.sh", cw.repo / "tool")
    os.symlink("../app.py", cw.repo / "pkg" / "app_link")
    git(cw.repo, "add", "-A")
    git(cw.repo, "commit", "-q", "-m", "links")
    result = cw.run("rollback", "HEAD", "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == git_archive_tree(cw.repo, "HEAD", cw.root / "expected")


def test_rollback_to_a_commit_with_a_link_out_of_the_tree_is_refused_and_nothing_changes(cw: CodeWorkspace):
    os.symlink("../../../etc", cw.repo / "etc")
    git(cw.repo, "add", "-A")
    git(cw.repo, "commit", "-q", "-m", "a link out")
    before, entries = cw.tree(), sorted(os.listdir(cw.root))
    result = cw.run("rollback", "HEAD", "--yes")
    assert result.returncode == 1
    assert "the symlink 'etc' points out of the tree: refused" in result.stderr and "unexpected" not in result.stderr
    assert cw.tree() == before
    assert sorted(set(os.listdir(cw.root)) - {"code_backups"}) == entries and cw.backup_ids() == []
    if cw.live.is_symlink():
        assert os.listdir(cw.root / "releases") == ["v1"]


# -- HEAD after an in-place restore --------------------------------------------------------------------------


@pytest.fixture
def in_place(tmp_path: Path) -> CodeWorkspace:
    return in_place_workspace(tmp_path)


def head(cw: CodeWorkspace) -> tuple[str, str]:
    """(branch or "", commit) of the working copy."""
    branch = subprocess.run(["git", "-C", str(cw.repo), "symbolic-ref", "-q", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return branch, git(cw.repo, "rev-parse", "HEAD")


def files(cw: CodeWorkspace) -> dict:
    return {k: v for k, v in tree_snapshot(cw.repo).items() if not k.startswith(".git")}


def test_restore_after_a_rollback_puts_head_back_on_its_branch(in_place: CodeWorkspace):
    """rollback TAG, then restore latest: HEAD on main again, nothing shown as changed, and everything after works."""
    v2 = head(in_place)
    assert v2[0] == "main"
    v2_files = files(in_place)
    assert in_place.run("backup", "--label", "v2").returncode == 0
    assert in_place.run("rollback", "v1", "--yes").returncode == 0
    v1_files = files(in_place)

    result = in_place.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert head(in_place) == v2
    assert files(in_place) == v2_files
    assert git(in_place.repo, "status", "--porcelain") == ""
    assert json.loads(result.stdout)["head"]["how"] == "branch"
    assert in_place.run("verify").returncode == 0

    # The restore's own undo puts back what it replaced: v1 detached, clean.
    undo = json.loads(result.stdout)["safety_backup"]
    assert in_place.run("restore", undo, "--yes").returncode == 0
    assert head(in_place) == ("", git(in_place.repo, "rev-parse", "v1"))
    assert files(in_place) == v1_files and git(in_place.repo, "status", "--porcelain") == ""
    # And the next rollback is not stopped by "local changes".
    assert in_place.run("restore", "latest", "--yes").returncode == 0
    result = in_place.run("rollback", "v1", "--yes")
    assert result.returncode == 0, result.stderr


def test_restore_detaches_at_the_backups_commit_when_its_branch_moved_on(in_place: CodeWorkspace):
    v2 = git(in_place.repo, "rev-parse", "HEAD")
    v2_files = files(in_place)
    assert in_place.run("backup").returncode == 0
    (in_place.repo / "v3.py").write_text("\n")
    git(in_place.repo, "add", "-A")
    git(in_place.repo, "commit", "-q", "-m", "v3")

    result = in_place.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert head(in_place) == ("", v2)
    assert f"HEAD detached at {v2[:12]}: branch main has moved on" in result.stdout
    assert files(in_place) == v2_files and git(in_place.repo, "status", "--porcelain") == ""
    assert in_place.run("verify").returncode == 0


def test_restore_of_a_backup_with_local_changes_shows_only_those(in_place: CodeWorkspace):
    (in_place.repo / "app.py").write_text("print('hot fix')\n")
    assert in_place.run("backup").returncode == 0
    assert in_place.run("rollback", "v1", "--yes", "--stash").returncode == 0
    git(in_place.repo, "stash", "drop")

    result = in_place.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert head(in_place)[0] == "main"
    assert git(in_place.repo, "status", "--porcelain") == "M app.py"
    assert (in_place.repo / "app.py").read_text() == "print('hot fix')\n"


def test_rollback_with_stash_prints_an_undo_that_gives_everything_back(in_place: CodeWorkspace):
    (in_place.repo / "app.py").write_text("print('local fix')\n")
    before, where = files(in_place), head(in_place)
    result = in_place.run("--json", "rollback", "v1", "--yes", "--stash")
    assert result.returncode == 0, result.stderr
    undo = json.loads(result.stdout)["undo"]
    assert undo == [f"git -C {in_place.repo} checkout main", f"git -C {in_place.repo} stash pop"]
    for command in undo:
        subprocess.run(command.split(), check=True, capture_output=True)
    assert files(in_place) == before and head(in_place) == where


# -- a repository with no commit yet -------------------------------------------------------------------------


def test_backup_of_a_repository_with_no_commit_yet_records_it_so(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("print('draft')\n")
    env = {"REPO_PATH": str(repo), "CODE_BACKUP_DIR": str(tmp_path / "store")}
    result = run_script("code_rollback.py", "--json", "backup", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["backup"]["id"]
    source = json.loads((tmp_path / "store" / backup_id / "manifest.json").read_text())["source"]
    assert source["commit"] is None and source["unborn"] is True and source["branch"] == "main"

    (repo / "app.py").write_text("print('broken')\n")
    result = run_script("code_rollback.py", "restore", backup_id, "--yes", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (repo / "app.py").read_text() == "print('draft')\n"
    assert "taken before the repository's first commit" in result.stdout


def test_restore_that_cannot_move_head_says_what_is_done_and_how_to_finish(in_place: CodeWorkspace):
    v2, v2_files = head(in_place), files(in_place)
    assert in_place.run("backup").returncode == 0
    assert in_place.run("rollback", "v1", "--yes").returncode == 0
    (in_place.repo / ".git" / "index.lock").write_text("")  # another git command is writing the index
    result = in_place.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert f"are back in {in_place.repo}, but git reset failed" in result.stderr
    assert files(in_place) == v2_files
    (in_place.repo / ".git" / "index.lock").unlink()
    by_hand = result.stderr.split("to put HEAD where the backup was taken: ")[1].strip()
    for command in by_hand.split(" && "):
        subprocess.run(command.split(), check=True, capture_output=True)
    assert head(in_place) == v2 and git(in_place.repo, "status", "--porcelain") == ""
