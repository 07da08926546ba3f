"""Code trees: snapshots that link unchanged files, trees built aside byte for byte, atomic switches."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import ROOT, age, tree_snapshot

from backup_store.manifest import Backup, Entry, check_backup, load_backup
from backup_store.store import BackupStore
from common.errors import ToolkitError, UsageError
from deployed_code.build import build_tree
from deployed_code.layout import switch_in
from deployed_code.snapshot import PAYLOAD_FILE, snapshot_tree
from deployed_code.tree import code_excluder, remove_tree

TREE = "tree"
HOUR_NS = 3600 * 10**9


# -- helpers ------------------------------------------------------------------------------------------


def make_source(root: Path, outside: Path) -> None:
    """A small code tree with everything a restore must reproduce, and things a snapshot leaves out."""
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the tree\n")
    root.mkdir()
    (root / "app.py").write_text("print('hello')\n")
    (root / "run.sh").write_text("#!/bin/sh\nexec python3 app.py\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "settings.cfg").write_text("mode = production\n")
    os.chmod(root / "settings.cfg", 0o640)
    (root / "readonly.txt").write_text("do not edit\n")
    os.chmod(root / "readonly.txt", 0o444)
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "lib" / "pkg" / "__init__.py").write_text("")
    (root / "lib" / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (root / "lib" / "pkg" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "empty").mkdir(mode=0o750)
    os.chmod(root / "empty", 0o750)
    (root / "sealed").mkdir()
    (root / "sealed" / "inside.txt").write_text("in a read-only folder\n")
    os.chmod(root / "sealed", 0o555)
    os.symlink(outside / "secret.txt", root / "link_out")
    os.symlink(outside, root / "link_out_dir")
    os.symlink("lib/pkg/mod.py", root / "rel_link")
    os.symlink("nowhere", root / "dangling")
    # Left out of every code snapshot:
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\x00pyc")
    (root / "lib" / "pkg" / "__pycache__").mkdir()
    (root / "lib" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00pyc")
    (root / "logs").mkdir()
    (root / "logs" / "today.log").write_text("log line\n")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "x.js").write_text("x\n")


EXCLUDE = ["*.log", "node_modules/"]


def expected_tree(root: Path) -> dict[str, tuple]:
    """What a snapshot of `root` holds: everything but .git, __pycache__ and the EXCLUDE patterns."""
    left_out = code_excluder(EXCLUDE)
    found = tree_snapshot(root)
    keep = {}
    for rel, value in found.items():
        parts = rel.split("/")
        if not any(left_out("/".join(parts[: i + 1])) for i in range(len(parts))):
            keep[rel] = value
    return keep


def take(store: BackupStore, src: Path, previous: Backup | None = None):
    """One snapshot of `src` into the store; the sealed backup and the stats."""
    with store.lock("test"), store.new_backup() as staging:
        stats = snapshot_tree(staging, src, TREE, previous, EXCLUDE)
    return load_backup(store.root / staging.backup_id), stats


def payload_files(backup: Backup) -> dict[str, os.stat_result]:
    return {entry.path: os.lstat(backup.payload(entry)) for entry in backup.files}


def payload_of(backup: Backup, path: str) -> Path:
    """Where the backup keeps the content of its file `path`."""
    return Path(backup.payload(next(entry for entry in backup.files if entry.path == path)))


@pytest.fixture
def store(tmp_path: Path) -> BackupStore:
    return BackupStore(tmp_path / "store", "code")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    make_source(tmp_path / "src", tmp_path / "outside")
    return tmp_path / "src"


# -- snapshot and build -------------------------------------------------------------------------------


def test_snapshot_then_build_gives_exactly_the_source(tmp_path, store, source):
    outside_before = tree_snapshot(tmp_path / "outside")
    backup, stats = take(store, source)
    assert check_backup(backup) == []
    paths = {entry.path for entry in backup.entries}
    assert f"{TREE}/empty" in paths and f"{TREE}/link_out_dir" in paths
    assert not any(part in (".git", "__pycache__", "node_modules") for p in paths for part in p.split("/"))
    assert not any(p.endswith(".log") for p in paths)
    assert not any(p.startswith(f"{TREE}/link_out_dir/") for p in paths)  # the outside folder is not entered
    assert stats.files == stats.copied == len(backup.files) == 8

    target = tmp_path / "built"
    built = build_tree(backup, TREE, target)
    assert built.files == 8 and built.symlinks == 4
    assert tree_snapshot(target) == expected_tree(source)
    assert os.stat(target).st_mode & 0o7777 == os.stat(source).st_mode & 0o7777
    assert os.readlink(target / "link_out") == str(tmp_path / "outside" / "secret.txt")
    assert os.readlink(target / "link_out_dir") == str(tmp_path / "outside")
    assert (target / "empty").is_dir() and not any((target / "empty").iterdir())
    assert os.stat(target / "run.sh").st_mode & 0o777 == 0o755
    assert tree_snapshot(tmp_path / "outside") == outside_before  # never followed, nothing written there
    # A copy, not links into the store: live code shares no inode with a backup.
    for entry in backup.files:
        rel = entry.path[len(TREE) + 1:]
        assert os.stat(target / rel).st_ino != os.stat(backup.payload(entry)).st_ino
        assert os.stat(target / rel).st_nlink == 1
    remove_tree(target)
    assert not target.exists()


def test_payload_files_are_read_only(store, source):
    age(source)
    first, _ = take(store, source)
    second, _ = take(store, source, first)
    for backup in (first, second):
        for rel, st in payload_files(backup).items():
            assert st.st_mode & 0o7777 == PAYLOAD_FILE, rel
    # The manifest keeps the source's modes, not the payload's.
    modes = {entry.path: entry.mode for entry in second.files}
    assert modes[f"{TREE}/run.sh"] == 0o755 and modes[f"{TREE}/settings.cfg"] == 0o640


def test_unchanged_second_snapshot_shares_every_file_without_reading_it(store, source):
    age(source)
    first, _ = take(store, source)
    assert all(entry.mtime_ns and entry.ino and entry.ctime_ns for entry in first.files)
    second, stats = take(store, source, first)
    assert stats.files == stats.linked == 8 and stats.copied == stats.rehashed == stats.bytes_copied == 0
    before, after = payload_files(first), payload_files(second)
    assert before.keys() == after.keys()
    for rel in before:
        assert after[rel].st_ino == before[rel].st_ino, rel  # one stored copy of each content
    assert os.listdir(second.path) == ["manifest.json"]  # the content is in the store's objects/ only
    assert {e.path: e.sha256 for e in second.files} == {e.path: e.sha256 for e in first.files}
    assert check_backup(second) == []
    # The linked backup stands alone: removing the first one leaves it whole.
    with store.lock("test"):
        store.remove(first)
    assert check_backup(second) == []


def test_recently_modified_files_are_hashed_then_linked(store, source):
    first, _ = take(store, source)  # files written a moment ago: their stat is not trusted next time
    assert all(entry.mtime_ns is None and entry.ino is None for entry in first.files)
    second, stats = take(store, source, first)
    assert stats.rehashed == stats.files == 8 and stats.linked == stats.copied == 0
    before, after = payload_files(first), payload_files(second)
    assert all(after[rel].st_ino == before[rel].st_ino for rel in before)


def test_changed_files_are_copied_anew(store, source):
    age(source)
    mod = source / "lib" / "pkg" / "mod.py"
    app = source / "app.py"
    cfg = source / "settings.cfg"
    first, _ = take(store, source)
    # Same size, new content, different mtime.
    mod.write_text("VALUE = 2\n")
    st = mod.stat()
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns - HOUR_NS // 2))
    # Same size, new content, mtime put back as it was: only ctime tells, so it is hashed and copied.
    old = app.stat()
    app.write_text("print('HELLO')\n")
    os.utime(app, ns=(old.st_atime_ns, old.st_mtime_ns))
    # Same content, new mode: hashed, and linked since the bytes are the same.
    os.chmod(cfg, 0o600)
    second, stats = take(store, source, first)
    assert stats.copied == 2 and stats.rehashed == 1 and stats.linked == 5
    before, after = payload_files(first), payload_files(second)
    for path, text in ((f"{TREE}/lib/pkg/mod.py", "VALUE = 2\n"), (f"{TREE}/app.py", "print('HELLO')\n")):
        assert after[path].st_ino != before[path].st_ino
        assert after[path].st_nlink == before[path].st_nlink == 1
        assert payload_of(second, path).read_text() == text
        assert after[path].st_mode & 0o7777 == PAYLOAD_FILE
    assert payload_of(first, f"{TREE}/lib/pkg/mod.py").read_text() == "VALUE = 1\n"  # the first backup is untouched
    assert after[f"{TREE}/settings.cfg"].st_ino == before[f"{TREE}/settings.cfg"].st_ino
    assert {e.path: e.mode for e in second.files}[f"{TREE}/settings.cfg"] == 0o600
    assert check_backup(first) == [] and check_backup(second) == []
    target = source.parent / "built"
    build_tree(second, TREE, target)
    assert tree_snapshot(target) == expected_tree(source)


def test_a_replaced_file_with_the_same_stat_but_a_new_inode_is_not_trusted(store, source):
    age(source)
    first, _ = take(store, source)
    mod = source / "lib" / "pkg" / "mod.py"
    st = mod.stat()
    fresh = mod.with_name("mod.new")
    fresh.write_text("VALUE = 9\n")
    os.utime(fresh, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(fresh, mod)  # what a deploy tool preserving mtimes does
    second, stats = take(store, source, first)
    assert stats.copied == 1
    assert payload_of(second, f"{TREE}/lib/pkg/mod.py").read_text() == "VALUE = 9\n"


def test_excluder():
    left_out = code_excluder(["*.log", "node_modules/", "build/tmp", " "])
    assert left_out(".git") and left_out("sub/.git") and left_out("a/b/__pycache__")
    assert left_out("x.log") and left_out("deep/er/x.log") and left_out("web/node_modules")
    assert left_out("build/tmp") and not left_out("other/build/tmp_x") and not left_out("build")
    assert not left_out("app.py") and not left_out("logs") and not left_out(".gitignore")


def test_a_store_inside_the_tree_is_refused(tmp_path, source):
    inner = BackupStore(source / "backups", "code")
    with inner.lock("test"), pytest.raises(UsageError, match="inside"), inner.new_backup() as staging:
        snapshot_tree(staging, source, TREE)


def test_snapshot_through_a_current_symlink_takes_the_release(tmp_path, store, source):
    os.symlink(source, tmp_path / "current")
    backup, _ = take(store, tmp_path / "current")
    root = next(entry for entry in backup.entries if entry.path == TREE)
    assert root.type == "dir"
    build_tree(backup, TREE, tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == expected_tree(source)


# -- build_tree refusals --------------------------------------------------------------------------------


def fake_backup(folder: Path, entries: list[Entry]) -> Backup:
    folder.mkdir(exist_ok=True)
    return Backup(folder, "fake", "code", datetime.now(UTC), None, {}, entries)


@pytest.mark.parametrize("bad", [f"{TREE}/../evil", f"{TREE}//abs", f"{TREE}/./x", f"{TREE}/a/../../evil"])
def test_build_refuses_paths_that_leave_the_tree(tmp_path, bad):
    backup = fake_backup(tmp_path / "b", [Entry(TREE, "dir", mode=0o755), Entry(bad, "dir", mode=0o755)])
    target = tmp_path / "out" / "built"
    target.parent.mkdir()
    with pytest.raises(ToolkitError, match="leave the tree"):
        build_tree(backup, TREE, target)
    assert not target.exists() and sorted(os.listdir(tmp_path / "out")) == []
    assert not (tmp_path / "evil").exists()


def test_build_refuses_an_absolute_prefix(tmp_path):
    backup = fake_backup(tmp_path / "b", [Entry("/etc", "dir", mode=0o755)])
    with pytest.raises(ToolkitError, match="leave the tree"):
        build_tree(backup, "/etc", tmp_path / "built")
    assert not (tmp_path / "built").exists()


def test_build_never_writes_through_a_symlink_of_the_backup(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "b"
    (folder / TREE).mkdir(parents=True)
    (folder / TREE / "pwned").write_text("x")
    backup = fake_backup(folder, [
        Entry(TREE, "dir", mode=0o755),
        Entry(f"{TREE}/link", "symlink", target=str(outside)),
        Entry(f"{TREE}/link/pwned", "file", mode=0o644, size=1, sha256="0" * 64),
    ])
    with pytest.raises(ToolkitError, match="not inside one of the backup's folders"):
        build_tree(backup, TREE, tmp_path / "built")
    assert list(outside.iterdir()) == [] and not (tmp_path / "built").exists()


def test_build_refuses_an_existing_target_and_a_damaged_backup(tmp_path, store, source):
    backup, _ = take(store, source)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        build_tree(backup, TREE, existing)
    assert (existing / "keep").read_text() == "mine"
    damaged = payload_of(backup, f"{TREE}/lib/pkg/mod.py")
    os.chmod(damaged, 0o600)
    damaged.write_text("VALUE = 7\n")  # same size, other bytes
    with pytest.raises(ToolkitError, match="checksum"):
        build_tree(backup, TREE, tmp_path / "built")
    assert not (tmp_path / "built").exists()


# -- switch_in ------------------------------------------------------------------------------------------


def make_release(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "version.txt").write_text(text)
    return path


@pytest.mark.parametrize("absolute", [False, True])
def test_switch_a_symlink_layout(tmp_path, absolute):
    old = make_release(tmp_path / "releases" / "a", "a\n")
    new = make_release(tmp_path / "releases" / "b", "b\n")
    current = tmp_path / "current"
    os.symlink(str(old) if absolute else "releases/a", current)
    result = switch_in(new, current)
    assert result.how == "symlink" and result.previous == old
    assert current.is_symlink()
    assert os.readlink(current) == (str(new) if absolute else "releases/b")
    assert (current / "version.txt").read_text() == "b\n"
    assert (old / "version.txt").read_text() == "a\n"  # kept for the caller
    assert 0 <= result.seconds < 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]  # no temporary link left


def test_switch_a_plain_folder_by_exchange(tmp_path):
    live = make_release(tmp_path / "app", "old\n")
    (live / "only_old.txt").write_text("gone after the switch\n")
    new = make_release(tmp_path / ".app.new", "new\n")
    new_inode = os.stat(new).st_ino
    result = switch_in(new, live)
    assert result.how == "exchange" and result.previous == new
    assert os.stat(live).st_ino == new_inode and not live.is_symlink()
    assert tree_snapshot(live) == {"version.txt": ("file", 0o644 & ~_umask(), b"new\n")}
    assert (new / "version.txt").read_text() == "old\n" and (new / "only_old.txt").exists()
    assert 0 <= result.seconds < 1
    remove_tree(result.previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]


def test_switch_when_nothing_is_live(tmp_path):
    new = make_release(tmp_path / ".app.new", "new\n")
    result = switch_in(new, tmp_path / "app")
    assert result.how == "rename" and result.previous is None
    assert (tmp_path / "app" / "version.txt").read_text() == "new\n" and not new.exists()


def test_switch_refuses_what_is_not_a_folder(tmp_path):
    new = make_release(tmp_path / "new", "new\n")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        switch_in(new, tmp_path / "file")
    with pytest.raises(UsageError):
        switch_in(tmp_path / "file", tmp_path / "app")
    assert (tmp_path / "file").read_text() == "x" and (new / "version.txt").exists()


def test_restore_by_build_and_switch_gives_exactly_the_backup(tmp_path, store, source):
    backup, _ = take(store, source)
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "outside", live, symlinks=True)
    (live / "stray.txt").write_text("not in the backup\n")
    built = tmp_path / ".live.new"
    build_tree(backup, TREE, built)
    result = switch_in(built, live)
    assert tree_snapshot(live) == expected_tree(source)
    assert (result.previous / "stray.txt").exists()
    remove_tree(result.previous)  # holds the read-only folder of the source too
    assert not result.previous.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- SIGKILL --------------------------------------------------------------------------------------------

RESTORE_SCRIPT = """
import sys
from pathlib import Path
from deployed_code.build import build_tree
from deployed_code.layout import switch_in
from backup_store.manifest import load_backup
backup, target, live = load_backup(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
build_tree(backup, "tree", target)
switch_in(target, live)
"""


def big_source(root: Path) -> None:
    for d in range(20):
        folder = root / f"d{d:02d}"
        folder.mkdir(parents=True)
        for f in range(50):
            (folder / f"f{f:02d}.py").write_bytes(os.urandom(2048))
    (root / "big.bin").write_bytes(os.urandom(8_000_000))


def start_restore(backup: Backup, target: Path, live: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RESTORE_SCRIPT, str(backup.path), str(target), str(live)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_sigkill_during_build_leaves_live_untouched(tmp_path, store):
    big_source(tmp_path / "src")
    backup, _ = take(store, tmp_path / "src")
    live = make_release(tmp_path / "app", "old\n")
    old, inode = tree_snapshot(live), os.lstat(live).st_ino
    target = tmp_path / ".app.new"
    proc = start_restore(backup, target, live)
    deadline = time.monotonic() + 30
    while not target.exists():  # kill the moment the build has begun
        assert proc.poll() is None, "the restore ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert tree_snapshot(live) == old and os.lstat(live).st_ino == inode
    assert target.exists() and tree_snapshot(target) != expected_tree(tmp_path / "src")  # a half tree, aside
    remove_tree(target)


@pytest.mark.parametrize("layout", ["folder", "symlink"])
def test_sigkill_at_any_moment_leaves_the_old_tree_or_the_new_one(tmp_path, store, layout):
    big_source(tmp_path / "src")
    backup, _ = take(store, tmp_path / "src")
    new_tree = tree_snapshot(tmp_path / "src")

    def prepare(base: Path) -> tuple[Path, Path]:
        old = make_release(base / "releases" / "old", "old\n")
        if layout == "folder":
            return base / "releases" / ".old.new", old
        os.symlink("releases/old", base / "current")
        return base / "releases" / "new", base / "current"

    target, live = prepare(tmp_path / "timing")
    began = time.monotonic()
    assert start_restore(backup, target, live).wait() == 0
    whole = time.monotonic() - began
    assert tree_snapshot(live.resolve()) == new_tree
    old_tree = {"version.txt": ("file", 0o644 & ~_umask(), b"old\n")}
    outcomes = set()
    for i in range(10):
        target, live = prepare(tmp_path / f"run{i}")
        proc = start_restore(backup, target, live)
        time.sleep(whole * i / 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert live.is_symlink() == (layout == "symlink")
        seen = tree_snapshot(live.resolve())
        assert seen in (old_tree, new_tree), f"run {i}: a mix of old and new"
        outcomes.add("new" if seen == new_tree else "old")
    assert "old" in outcomes  # the early kills left the old tree in place
