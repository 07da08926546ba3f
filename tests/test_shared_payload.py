"""Code backups that share their files' content in the store's objects/ folder: the unchanged tree written as
one manifest, stores written in the earlier folder format still read, and cleanup's sweep of stored files."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace
from helpers import tree_snapshot

from backup_store.manifest import (
    MANIFEST,
    Backup,
    UnsafeManifest,
    check_backup,
    load_backup,
    manifest_bytes,
    split_manifest,
)
from backup_store.objects import OBJECTS, store_object
from backup_store.retention import RetentionPolicy, plan_retention
from backup_store.store import BackupStore
from deployed_code.build import build_tree
from deployed_code.snapshot import PAYLOAD_FILE, snapshot_tree

TREE = "tree"
HOUR_NS = 3600 * 10**9


def make_tree(root: Path) -> None:
    """A small code tree, its files an hour old (their stat is trusted), with a symlink and an empty folder."""
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "app.py").write_text("print('v1')\n")
    (root / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (root / "pkg" / "sub" / "same.py").write_text("print('v1')\n")  # the same content as app.py
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("app.py", root / "link.py")
    age(root)


def age(root: Path) -> None:
    old = (os.stat(root).st_mtime_ns - HOUR_NS,) * 2
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=old, follow_symlinks=False)


def take(store: BackupStore, src: Path) -> tuple[Backup, object]:
    with store.lock("test"), store.new_backup() as staging:
        stats = snapshot_tree(staging, src, TREE, store.newest())
    return load_backup(store.root / staging.backup_id), stats


def objects_in(store: BackupStore) -> set[str]:
    return {name for folder in (store.root / OBJECTS).iterdir() for name in os.listdir(folder)}


@pytest.fixture
def store(tmp_path: Path) -> BackupStore:
    return BackupStore(tmp_path / "store", "code")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    make_tree(tmp_path / "src")
    return tmp_path / "src"


def test_each_content_is_stored_once_and_the_backup_folder_holds_only_its_manifest(tmp_path, store, src):
    backup, stats = take(store, src)
    assert os.listdir(backup.path) == [MANIFEST]
    assert stats.files == 4 and len(objects_in(store)) == 3  # app.py and same.py share one object
    assert all(os.stat(backup.payload(e)).st_mode & 0o7777 == PAYLOAD_FILE for e in backup.files)
    assert check_backup(backup) == []
    build_tree(backup, TREE, tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(src)


def test_an_unchanged_tree_writes_the_previous_entries_as_they_are(store, src):
    first, _ = take(store, src)
    second, stats = take(store, src)
    assert stats.linked == stats.files == 4 and stats.copied == stats.rehashed == 0
    first_header, first_entries = split_manifest((first.path / MANIFEST).read_bytes())
    second_header, second_entries = split_manifest((second.path / MANIFEST).read_bytes())
    assert second_entries == first_entries and second_header["fingerprint"] == first_header["fingerprint"]
    assert (second_header["files"], second_header["size"]) == (4, first.size)
    assert check_backup(second) == []


@pytest.mark.parametrize("change", ["content", "folder mode", "symlink target", "new file", "removed file"])
def test_any_change_the_stat_shows_is_not_taken_for_an_unchanged_tree(store, src, change):
    take(store, src)
    mod = src / "pkg" / "mod.py"
    if change == "content":  # same size, the mtime put back: only the ctime tells
        st = mod.stat()
        mod.write_text("VALUE = 2\n")
        os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "folder mode":
        os.chmod(src / "pkg", 0o750)
    elif change == "symlink target":
        (src / "link.py").unlink()
        os.symlink("run.sh", src / "link.py")
    elif change == "new file":
        (src / "empty" / "new.py").write_text("x = 1\n")
        age(src)
    else:
        (src / "pkg" / "sub" / "same.py").unlink()
    second, _ = take(store, src)
    entries = {entry.path: entry for entry in second.entries}
    if change == "content":
        assert Path(second.payload(entries[f"{TREE}/pkg/mod.py"])).read_text() == "VALUE = 2\n"
    elif change == "folder mode":
        assert entries[f"{TREE}/pkg"].mode == 0o750
    elif change == "symlink target":
        assert entries[f"{TREE}/link.py"].target == "run.sh"
    elif change == "new file":
        assert f"{TREE}/empty/new.py" in entries
    else:
        assert f"{TREE}/pkg/sub/same.py" not in entries
    assert check_backup(second) == []


@pytest.mark.parametrize("tree", ["unchanged", "another file changed", "its folder removed"])
def test_content_gone_from_the_store_is_stored_again_by_the_next_backup(tmp_path, store, src, tree):
    first, _ = take(store, src)
    gone = Path(first.payload(next(e for e in first.files if e.path == f"{TREE}/app.py")))
    gone.unlink()  # by hand, or a damaged disk: app.py and pkg/sub/same.py both named it
    if tree == "its folder removed":  # objects/<2 hex>/ as well (it held only that object)
        gone.parent.rmdir()
    if tree == "another file changed":  # no fingerprint match: each file is taken by its stat
        st = (src / "run.sh").stat()
        (src / "run.sh").write_text("#!/bin/sh\nexit 0\n")
        os.utime(src / "run.sh", ns=(st.st_atime_ns, st.st_mtime_ns))  # not racy; the other files untouched
    second, stats = take(store, src)
    assert gone.read_bytes() == b"print('v1')\n"
    assert (stats.files, stats.rehashed, stats.copied) == (4, 2, 1 if tree == "another file changed" else 0)
    assert check_backup(second) == [] and check_backup(load_backup(first.path)) == []
    build_tree(second, TREE, tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(src)


def test_a_backup_after_content_went_missing_restores_and_verifies(tmp_path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    age(cw.live)  # trusted by their stat: the second backup reuses the first one's entries
    assert cw.run("backup").returncode == 0
    app = hashlib.sha256((cw.live / "app.py").read_bytes()).hexdigest()
    stored = cw.store / OBJECTS / app[:2] / app
    stored.unlink()
    taken = cw.run("--json", "backup")
    assert taken.returncode == 0, taken.stderr
    assert json.loads(taken.stdout)["snapshot"]["rehashed"] == 1 and stored.is_file()
    before = cw.tree()
    (cw.live / "app.py").write_text("print('changed')\n")
    restored = cw.run("restore", "latest", "--yes")
    assert restored.returncode == 0, restored.stderr
    assert cw.tree() == before
    verified = cw.run("verify")
    assert verified.returncode == 0 and verified.stdout.startswith(f"verify {cw.live}: OK"), verified.stdout


def test_a_lazily_read_manifest_checks_its_entries_when_they_are_used(store, src):
    backup, _ = take(store, src)
    path = backup.path / MANIFEST
    header, entries = split_manifest(path.read_bytes())
    crafted = json.loads(entries) + [{"path": "../evil", "type": "dir", "mode": 0o700}]
    os.chmod(path, 0o600)
    path.write_bytes(manifest_bytes(header, json.dumps(crafted).encode()))
    lazy = load_backup(backup.path, lazy=True)
    assert lazy.id == backup.id and len(lazy.files) == 4  # from the header
    with pytest.raises(UnsafeManifest, match="not a plain relative path"):
        assert not lazy.entries
    with pytest.raises(UnsafeManifest):
        load_backup(backup.path)
    with store.lock("test"), store.new_backup() as staging:  # the next snapshot reads every file instead
        stats = snapshot_tree(staging, src, TREE, store.newest())
    assert stats.copied == 4 and stats.rehashed == stats.linked == 0
    assert check_backup(load_backup(store.root / staging.backup_id)) == []


def folder_format_backup(store: BackupStore, src: Path, backup_id: str) -> Path:
    """A backup as the earlier version wrote it: its payload in its own folder (0400 files), format 1."""
    folder = store.root / backup_id
    entries = []
    for path in sorted([src, *src.rglob("*")], key=lambda p: str(p.relative_to(src)).split("/")):
        rel = TREE if path == src else f"{TREE}/{path.relative_to(src)}"
        st = os.lstat(path)
        if path.is_symlink():
            os.symlink(os.readlink(path), folder / rel)
            entries.append({"path": rel, "type": "symlink", "target": os.readlink(path), "uid": st.st_uid,
                            "gid": st.st_gid})
        elif path.is_dir():
            (folder / rel).mkdir(parents=True, mode=0o700)
            entries.append({"path": rel, "type": "dir", "mode": st.st_mode & 0o7777, "uid": st.st_uid,
                            "gid": st.st_gid})
        else:
            data = path.read_bytes()
            (folder / rel).write_bytes(data)
            os.chmod(folder / rel, 0o400)
            entries.append({"path": rel, "type": "file", "mode": st.st_mode & 0o7777, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(), "uid": st.st_uid, "gid": st.st_gid,
                            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino})
    manifest = {"format": 1, "id": backup_id, "component": "code", "created_at": "2026-01-01T00:00:00.000Z",
                "tool_version": "0.9", "label": None, "kind": "backup", "source": {"host": "old"},
                "entries": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def test_a_store_written_in_the_folder_format_restores_verifies_and_is_shared_from(tmp_path, store, src):
    store.root.mkdir()
    old = load_backup(folder_format_backup(store, src, "20260101T000000.000Z-code-old-0a1b2c3d"))
    assert old.objects is None and check_backup(old) == []
    build_tree(old, TREE, tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(src)
    new, stats = take(store, src)  # the old payload is linked into objects/, nothing is read
    assert stats.linked == stats.files == 4 and stats.copied == 0
    assert check_backup(new) == []
    (store.root / old.id / TREE / "app.py").chmod(0o600)
    (store.root / old.id / TREE / "app.py").write_text("print('v!')\n")  # damage: verify finds it
    assert check_backup(load_backup(store.root / old.id)) == [f"{TREE}/app.py: checksum mismatch (damaged)"]
    # The new backup's object is that file, linked (as the earlier version linked unchanged files).
    assert check_backup(new) == [f"{TREE}/app.py: checksum mismatch (damaged)",
                                 f"{TREE}/pkg/sub/same.py: checksum mismatch (damaged)"]


def test_cleanup_removes_only_the_content_no_kept_backup_names(store, src):
    first, _ = take(store, src)
    (src / "pkg" / "mod.py").write_text("VALUE = 2\n")  # one file changes
    age(src)
    second, _ = take(store, src)
    assert len(objects_in(store)) == 4
    with store.lock("test"):
        assert store.sweep_objects() == 0  # both backups are kept: nothing goes
        store.remove(first)
        assert store.sweep_objects() == 1  # the first backup's mod.py
    assert objects_in(store) == {e.sha256 for e in second.files}
    assert check_backup(load_backup(second.path)) == []


def test_cleanup_holds_one_manifest_at_a_time(tmp_path, store):
    src = tmp_path / "big"
    for i in range(1000):  # 1,000 entries a manifest, in 12 backups
        (src / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 10}" / f"f{i}.py").write_text(f"N = {i}\n")
    age(src)
    backups = [take(store, src)[0] for _ in range(12)]
    tracemalloc.start()
    try:
        assert len(load_backup(backups[0].path).entries) == 1011
        one = tracemalloc.get_traced_memory()[1]  # what one manifest takes, read whole
        tracemalloc.reset_peak()
        with store.lock("test"):  # as cleanup does: the plan, the removals, the sweep
            plan = plan_retention(store.scan(keep_entries=False)[0], RetentionPolicy(days=0, last=11))
            remove, keep = plan.remove, plan.keep
            assert [b.id for b in remove] == [backups[0].id] and len(keep) == 11
            store.remove(remove[0])
            assert store.sweep_objects() == 0  # the 11 others name the same content
        sweep = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sweep < 3 * one, (sweep, one)


def test_cleanup_removes_no_stored_file_while_a_manifest_cannot_be_read(store, src):
    first, _ = take(store, src)
    (src / "pkg" / "mod.py").write_text("VALUE = 2\n")
    age(src)
    second, _ = take(store, src)
    os.chmod(second.path / MANIFEST, 0o600)
    (second.path / MANIFEST).write_text("{not json")
    with store.lock("test"):
        store.remove(first)
        assert store.sweep_objects() is None
    assert len(objects_in(store)) == 4


def test_a_stored_file_cut_short_is_written_again(tmp_path):
    objects = tmp_path / OBJECTS
    (objects / "ab").mkdir(parents=True)
    data = b"print('hello')\n"
    source = tmp_path / "f.py"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (objects / digest[:2]).mkdir(exist_ok=True)
    (objects / digest[:2] / digest).write_bytes(data[:5])  # a crash before the data reached the disk
    assert store_object(str(source), str(objects)) == (len(data), digest)
    assert (objects / digest[:2] / digest).read_bytes() == data
