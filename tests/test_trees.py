"""Comparing a live folder with a backup and putting it back (backup_store/trees.py), called directly on real
files: every kind of drift is named, a restore makes the folder exactly the backup and touches only what
differs, and a restore that cannot finish changes nothing."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import tree_snapshot
from test_backup_store import make_source, take

from backup_store.manifest import Backup, Entry, UnsafeManifest
from backup_store.store import BackupStore
from backup_store.trees import TreeDiff, diff_tree, restore_tree, tree_entries
from common.errors import ToolkitError


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Backup, Path]:
    """A backup of a small tree, and a live copy of that tree to drift from it."""
    source = make_source(tmp_path / "src")
    backup = take(BackupStore(tmp_path / "store", "config"), source)
    live = tmp_path / "live"
    shutil.copytree(source, live, symlinks=True)
    return backup, live


def drift(live: Path, outside: Path) -> None:
    """One of each difference a live tree can have from its backup."""
    (live / "app.yml").write_text("server:\n  port: 9090\n")  # content
    os.chmod(live / "conf.d" / "cache.json", 0o640)  # mode only
    (live / "new.txt").write_text("added\n")
    (live / "new-dir" / "inner").mkdir(parents=True)
    (live / "new-dir" / "inner" / "file").write_text("added too\n")
    (live / "run.sh").unlink()
    shutil.rmtree(live / "empty")
    os.unlink(live / "current.json")
    os.symlink("app.yml", live / "current.json")  # another target
    (live / "zero").unlink()
    (live / "zero").mkdir()  # a folder where the backup has a file
    shutil.rmtree(live / "conf.d" / "deep")
    os.symlink(outside, live / "conf.d" / "deep")  # a symlink out of the tree where the backup has a folder
    os.chmod(live, 0o750)


def test_every_kind_of_drift_is_named_once(backed_up: tuple[Backup, Path], tmp_path: Path):
    backup, live = backed_up
    wanted = tree_entries(backup, "tree")
    assert diff_tree(wanted, live) == TreeDiff()
    (tmp_path / "outside").mkdir()
    drift(live, tmp_path / "outside")
    diff = diff_tree(wanted, live)
    assert diff.to_json() == {
        "added": ["new-dir", "new-dir/inner", "new-dir/inner/file", "new.txt"],
        "removed": ["conf.d/deep/blob.bin", "empty", "run.sh"],
        "changed": [".", "app.yml", "conf.d/cache.json", "conf.d/deep", "current.json", "zero"],
    }
    assert diff.restore_json() == {"re_created": diff.removed, "deleted": diff.added, "changed": diff.changed}
    assert diff.restore_lines("/srv/app", done=False)[0] == "  re-create  /srv/app/conf.d/deep/blob.bin"
    # What `exclude` leaves out is never named: not a new path, nor anything in a folder left out.
    assert diff_tree(wanted, live, exclude=lambda rel: rel.startswith("new")).added == []
    assert diff_tree(wanted, tmp_path / "nowhere").removed == [".", *sorted(rel for rel in wanted if rel)]


def test_restore_makes_the_folder_exactly_the_backup_touching_only_what_differs(backed_up: tuple[Backup, Path],
                                                                               tmp_path: Path):
    backup, live = backed_up
    expected, root_mode = tree_snapshot(live), os.stat(live).st_mode & 0o7777
    outside = tmp_path / "outside"
    outside.mkdir()
    drift(live, outside)
    same = [os.lstat(live / name).st_ino for name in ("outside", "conf.d")]
    restore_tree(backup, "tree", live, diff_tree(tree_entries(backup, "tree"), live))
    assert tree_snapshot(live) == expected and os.stat(live).st_mode & 0o7777 == root_mode
    assert diff_tree(tree_entries(backup, "tree"), live) == TreeDiff()
    assert os.listdir(outside) == []  # the folder went back in place of the symlink, never through it
    assert [os.lstat(live / name).st_ino for name in ("outside", "conf.d")] == same  # not in the diff: untouched
    assert [path for path in live.parent.rglob("*") if ".tmp-" in path.name] == []


def test_restore_into_a_missing_folder_creates_it_and_puts_single_files_in_their_own_place(tmp_path: Path):
    source = make_source(tmp_path / "src")
    env = tmp_path / "app.env"
    env.write_text("API_TOKEN=abc\n")
    store = BackupStore(tmp_path / "store", "config")
    with store.lock("test"), store.new_backup() as staging:
        staging.add_tree(source, "tree")
        staging.add_file(env, "env")
    backup = staging.backup
    live, live_env = tmp_path / "new-host" / "config", tmp_path / "new-host" / "etc" / "app.env"
    env_entry = next(entry for entry in backup.entries if entry.path == "env")
    restore_tree(backup, "tree", live, diff_tree(tree_entries(backup, "tree"), live), [(env_entry, live_env)])
    assert tree_snapshot(live) == tree_snapshot(source)
    assert live_env.read_bytes() == env.read_bytes()
    assert os.stat(live_env).st_mode & 0o777 == os.stat(env).st_mode & 0o777


def test_a_restore_that_cannot_read_the_backup_changes_nothing(backed_up: tuple[Backup, Path], tmp_path: Path):
    backup, live = backed_up
    (tmp_path / "outside").mkdir()
    drift(live, tmp_path / "outside")
    before = tree_snapshot(live)
    os.unlink(backup.path / "tree" / "run.sh")  # the backup lost a file since it was checked
    with pytest.raises(ToolkitError, match=r"could not read .*run\.sh.*; nothing was changed"):
        restore_tree(backup, "tree", live, diff_tree(tree_entries(backup, "tree"), live))
    assert tree_snapshot(live) == before
    assert [path for path in live.rglob("*") if ".tmp-" in path.name] == []


def test_a_live_path_that_is_not_a_folder_is_refused_before_anything_changes(backed_up: tuple[Backup, Path]):
    backup, live = backed_up
    shutil.rmtree(live)
    live.write_text("a file where the configuration folder was\n")
    with pytest.raises(ToolkitError, match="is not a folder: nothing was changed"):
        restore_tree(backup, "tree", live, TreeDiff(changed=["."]))
    assert live.read_text() == "a file where the configuration folder was\n"


def test_a_backup_whose_tree_is_a_symlink_is_refused():
    backup = Backup(Path("b"), "b", "config", datetime.now(UTC), None, {}, [Entry("tree", "symlink", target="/etc")])
    with pytest.raises(UnsafeManifest, match="tree is a symlink, not a folder"):
        tree_entries(backup, "tree")
