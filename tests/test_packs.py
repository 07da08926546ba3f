"""Pack files: a large backup's small contents appended to a few packs (backup_store.packs), read back by span."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace
from helpers import damage_content, tree_snapshot
from s3_server import Bucket

from backup_store.manifest import Backup, check_backup, load_backup
from backup_store.objects import OBJECTS, stored_names
from backup_store.packs import PACK_FROM, PACKED_BELOW, PACKS
from backup_store.store import BackupStore
from common.errors import Interrupted
from deployed_code.build import build_tree
from deployed_code.snapshot import snapshot_tree

MANY = PACK_FROM + 44
BIG = PACKED_BELOW + 5  # stays a loose object


def fill(root: Path, seed: bytes = b"") -> None:
    """MANY small files (one duplicate of another) in a few folders, and one large file."""
    for i in range(MANY):
        folder = root / f"pkg{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"m{i:03d}.py").write_bytes(hashlib.sha256(seed + str(i).encode()).digest() * (20 + i % 50))
    (root / "pkg0" / "copy.py").write_bytes((root / "pkg1" / "m001.py").read_bytes())
    (root / "big.bin").write_bytes(os.urandom(BIG))


def pack_files(store: Path) -> list[str]:
    return sorted(os.listdir(store / PACKS)) if (store / PACKS).is_dir() else []


def loose_objects(store: Path) -> set[str]:
    return {name for folder in (store / OBJECTS).iterdir() for name in os.listdir(folder)}


def take(store: BackupStore, src: Path, cancelled=None):
    with store.lock("test"), store.new_backup() as staging:
        snapshot_tree(staging, src, "tree", store.newest(), cancelled=cancelled)
    return load_backup(store.root / staging.backup_id)


def packed_workspace(tmp_path: Path) -> tuple[CodeWorkspace, Backup]:
    """A deployed tree of MANY files and its backup, taken by the script: its small files packed."""
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    fill(cw.live)
    assert cw.run("backup").returncode == 0
    return cw, load_backup(cw.store / cw.backup_ids()[0])


def test_a_large_backup_packs_its_small_files_and_restores_them_byte_for_byte(tmp_path: Path):
    cw, backup = packed_workspace(tmp_path)
    packs = pack_files(cw.store)
    assert packs and all(name.startswith("pack-") for name in packs)
    assert {name.rpartition(".")[2] for name in packs} == {"pack", "idx"}
    assert all(os.stat(cw.store / PACKS / name).st_mode & 0o777 == 0o400 for name in packs)
    big = hashlib.sha256((cw.live / "big.bin").read_bytes()).hexdigest()
    assert big in loose_objects(cw.store)  # the large file stays loose; the small ones of this run are packed
    assert len(loose_objects(cw.store)) < 10
    assert {entry.sha256 for entry in backup.files} <= stored_names(str(cw.store / OBJECTS))
    assert check_backup(backup) == []
    before = cw.tree()
    (cw.live / "pkg3" / "m003.py").write_text("edited\n")
    (cw.live / "pkg4" / "m004.py").unlink()
    restored = cw.run("restore", cw.backup_ids()[0], "--yes")
    assert restored.returncode == 0, restored.stderr
    assert cw.tree() == before


def test_damage_inside_a_pack_is_named_and_the_restore_refused(tmp_path: Path):
    cw, backup = packed_workspace(tmp_path)
    entry = next(entry for entry in backup.files if entry.path == "tree/pkg2/m009.py")
    assert backup.content(entry).span is not None  # it is packed
    damage_content(backup.content(entry))
    assert check_backup(backup) == ["tree/pkg2/m009.py: checksum mismatch (damaged)"]
    (cw.live / "app.py").write_text("print('deployed')\n")
    before = cw.tree()
    result = cw.run("restore", backup.id, "--yes")
    assert result.returncode == 1 and "m009.py" in result.stderr
    assert cw.tree() == before


def test_a_pack_cut_short_is_not_trusted_and_the_next_backup_stores_its_contents_again(tmp_path: Path):
    cw, first = packed_workspace(tmp_path)
    pack = next(cw.store / PACKS / name for name in pack_files(cw.store) if name.endswith(".pack"))
    os.chmod(pack, 0o600)
    os.truncate(pack, pack.stat().st_size - 1)
    problems = check_backup(first)
    assert problems and all(line.endswith(": missing from the backup") for line in problems)
    taken = cw.run("backup")  # the tree is as it was: what the pack held is read and stored again
    assert taken.returncode == 0, taken.stderr
    second = load_backup(cw.store / cw.backup_ids()[0])
    assert second.id != first.id and check_backup(second) == []
    before = cw.tree()
    shutil.rmtree(cw.live / "pkg5")
    restored = cw.run("restore", second.id, "--yes")
    assert restored.returncode == 0, restored.stderr
    assert cw.tree() == before


def test_cleanup_removes_a_pack_once_no_backup_names_anything_in_it(tmp_path: Path):
    src = tmp_path / "src"
    fill(src, b"first")
    store = BackupStore(tmp_path / "store", "code")
    first = take(store, src)
    first_packs = set(pack_files(store.root))
    holding = Path(first.content(next(entry for entry in first.files if entry.path == "tree/pkg1/m001.py")).path)
    kept = src / "pkg1" / "m001.py"
    for path in src.rglob("m*.py"):
        if path != kept:
            path.write_bytes(hashlib.sha256(b"second" + path.name.encode()).digest() * 30)
    second = take(store, src)
    assert set(pack_files(store.root)) > first_packs
    with store.lock("test"):
        assert store.sweep_objects() == 0
        store.remove(first)
        store.sweep_objects()
    # A pack holding m001.py's content (the second backup names it: m001.py and copy.py are unchanged) is
    # rewritten with that one only: its index goes, its file at the next sweep.
    remaining = set(pack_files(store.root)) & first_packs
    assert holding.name in remaining and all(name.endswith(".pack") for name in remaining)
    assert check_backup(load_backup(second.path)) == []
    kept.write_text("changed too\n")
    (src / "pkg0" / "copy.py").write_text("its copy too\n")
    third = take(store, src)
    with store.lock("test"):
        store.remove(second)
        store.sweep_objects()
    assert not set(pack_files(store.root)) & first_packs
    assert check_backup(load_backup(third.path)) == []
    build_tree(load_backup(third.path), "tree", tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(src)


def test_a_backup_stopped_part_way_leaves_no_pack_behind(tmp_path: Path):
    src = tmp_path / "src"
    fill(src)
    store = BackupStore(tmp_path / "store", "code")
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2 * MANY - 50  # asked once a file as the walk queues it, once as it is copied

    with pytest.raises(Interrupted):
        take(store, src, cancelled)
    assert pack_files(store.root) == [] and store.backup_folders() == []


def test_a_packed_backup_goes_to_a_remote_and_comes_back_byte_for_byte(tmp_path: Path, remote: Bucket):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    cw.env.update(remote.env)
    fill(cw.live)
    assert cw.run("backup").returncode == 0
    backup_id = cw.backup_ids()[0]
    pushed = cw.run("push", backup_id)
    assert pushed.returncode == 0, pushed.stderr
    before = cw.tree()
    shutil.rmtree(cw.store)
    pulled = cw.run("pull", backup_id)
    assert pulled.returncode == 0, pulled.stderr
    shutil.rmtree(cw.live / "pkg6")
    restored = cw.run("restore", backup_id, "--yes", "--no-backup")
    assert restored.returncode == 0, restored.stderr
    assert cw.tree() == before


def mostly_replaced(tmp_path: Path) -> tuple[BackupStore, Path, object, object, set[str]]:
    """A store whose first backup's packs are only a tenth named by the second, with the first removed."""
    src = tmp_path / "src"
    fill(src, b"first")
    store = BackupStore(tmp_path / "store", "code")
    first = take(store, src)
    first_packs = {name.removesuffix(".pack") for name in pack_files(store.root) if name.endswith(".pack")}
    for n, path in enumerate(sorted(src.rglob("m*.py"))):
        if n % 10:
            path.write_bytes(hashlib.sha256(b"second" + path.name.encode()).digest() * 30)
    second = take(store, src)
    return store, src, first, second, first_packs


def test_cleanup_rewrites_a_mostly_unnamed_pack_with_what_is_still_named(tmp_path: Path):
    store, src, first, second, first_packs = mostly_replaced(tmp_path)
    size_before = sum(os.path.getsize(store.root / PACKS / f"{stem}.pack") for stem in first_packs)
    with store.lock("test"):
        store.remove(first)
        assert store.sweep_objects() > MANY // 2
    names = pack_files(store.root)
    assert not {f"{stem}.idx" for stem in first_packs} & set(names)
    # The rewritten packs' files stay until the next sweep: a reader that listed them before still reads them.
    assert {f"{stem}.pack" for stem in first_packs} <= set(names)
    assert check_backup(load_backup(second.path)) == []
    with store.lock("test"):
        assert store.sweep_objects() == 0
    assert not {f"{stem}.pack" for stem in first_packs} & set(pack_files(store.root))
    size_after = sum(os.path.getsize(store.root / PACKS / name) for name in pack_files(store.root))
    assert size_after < size_before + os.path.getsize(src / "big.bin")  # the tenth kept, beside the second's packs
    backup = load_backup(second.path)
    assert check_backup(backup) == []
    build_tree(backup, "tree", tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(src)


def test_a_mostly_unnamed_pack_with_a_damaged_content_is_left_as_it_is(tmp_path: Path):
    store, src, first, second, first_packs = mostly_replaced(tmp_path)
    kept = next(entry for entry in second.files
                if entry.path.endswith(".py") and second.content(entry).span is not None
                and Path(second.content(entry).path).stem in first_packs)
    damage_content(second.content(kept))
    with store.lock("test"):
        store.remove(first)
        store.sweep_objects()
    left = Path(second.content(kept).path).stem
    assert f"{left}.idx" in pack_files(store.root) and f"{left}.pack" in pack_files(store.root)
    assert check_backup(load_backup(second.path)) == [f"{kept.path}: checksum mismatch (damaged)"]


def test_a_loose_object_cut_short_is_stored_again_by_a_large_run(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_bytes(b"print('a')\n" * 100)
    store = BackupStore(tmp_path / "store", "code")
    first = take(store, src)  # one file: stored loose
    loose = Path(first.payload(first.files[0]))
    os.chmod(loose, 0o600)
    os.truncate(loose, 10)  # as a crash before the syncfs could leave it
    fill(src)
    (src / "b.py").write_bytes(b"print('a')\n" * 100)  # a.py's content, under a name no backup had
    second = take(store, src)
    entry = next(entry for entry in second.files if entry.path == "tree/b.py")
    assert second.content(entry).span is not None  # written again, into the run's pack
    assert check_backup(second) == []
    build_tree(second, "tree", tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(src)
