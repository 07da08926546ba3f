"""The backup store (backup_store: store, staging, manifest, locks) called directly on real files: a backup
reads back as it was written, damage is named, retention and `latest` leave regular backups alone, and what
a killed run leaves is named and removed."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import ROOT, tree_snapshot

from backup_store.locks import HeldLocks
from backup_store.manifest import MANIFEST, Backup, check_backup, load_backup
from backup_store.retention import RetentionPolicy, plan_retention
from backup_store.store import BACKUP_ID, BackupStore, refuse_damaged
from common.errors import LockBusy, ToolkitError, UsageError
from common.files import temp_name
from common.proc import run_tool


def make_source(root: Path) -> Path:
    """A small folder with what a configuration or code tree holds: nested files, an executable, an empty file
    and folder, binary content, a symlink inside and one leading out."""
    (root / "conf.d" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "app.yml").write_text("server:\n  port: 8080\n")
    (root / "conf.d" / "cache.json").write_text('{"ttl": 60}\n')
    (root / "conf.d" / "deep" / "blob.bin").write_bytes(bytes(range(256)) * 40)
    (root / "run.sh").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "zero").write_bytes(b"")
    os.symlink("conf.d/cache.json", root / "current.json")
    os.symlink("/etc/hostname", root / "outside")
    return root


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src")


@pytest.fixture
def store(tmp_path: Path) -> BackupStore:
    return BackupStore(tmp_path / "store", "config")


def contents(root: Path) -> dict[str, bytes | str | None]:
    """Each path under `root`: a file's bytes, a symlink's target, None for a folder (modes apart)."""
    return {rel: (found[2] if found[0] == "file" else found[1] if found[0] == "link" else None)
            for rel, found in tree_snapshot(root).items()}


def take(store: BackupStore, source: Path, label: str | None = None, safety: bool = False) -> Backup:
    """A backup of `source` under `tree/`, as the config script takes one."""
    with store.lock("test"), store.new_backup(label, safety=safety) as staging:
        staging.add_tree(source, "tree")
    return staging.backup


# -- a backup reads back as it was written ---------------------------------------------------------------


def test_a_backup_reads_back_byte_identical_with_every_checksum_verified(tmp_path: Path, store: BackupStore,
                                                                         source: Path):
    os.mkfifo(source / "a.fifo")  # neither configuration nor code: passed over, and said so
    env = tmp_path / ".env"
    env.write_text("API_TOKEN=x\n")
    with store.lock("test"), store.new_backup("before deploy", name="main db") as staging:
        staging.source = {"host": "web-1", "path": str(source)}
        staging.extra = {"custom": [1, 2], "id": "not the id"}  # extra cannot take the place of a core field
        staging.add_tree(source, "tree")
        staging.add_file(env, "env")
        (staging.path / "dump").write_bytes(b"written by a tool\n")  # as pg_dump writes its own file
        staging.adopt("dump")
    written = staging.backup
    assert staging.skipped == [str(source / "a.fifo")]
    os.unlink(source / "a.fifo")

    loaded = load_backup(written.path)
    assert loaded == written and store.backups() == [loaded]
    assert json.loads((loaded.path / MANIFEST).read_text())["id"] == loaded.id
    assert BACKUP_ID.fullmatch(loaded.id) and "-config-main_db-" in loaded.id
    assert (loaded.label, loaded.source, loaded.is_safety) == ("before deploy", staging.source, False)
    assert loaded.extra["custom"] == [1, 2] and loaded.extra["kind"] == "backup"
    assert contents(loaded.path / "tree") == contents(source)
    for entry in loaded.files:
        data = (loaded.path / entry.path).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest()), entry.path
        assert os.stat(loaded.path / entry.path).st_mode & 0o777 == 0o600  # private, whatever the source's
    assert {os.stat(loaded.path / e.path).st_mode & 0o777 for e in loaded.entries if e.type == "dir"} == {0o700}
    modes = {entry.path: entry.mode for entry in loaded.entries if entry.type != "symlink"}
    assert modes["tree/run.sh"] == 0o755 and modes["tree/app.yml"] == os.stat(source / "app.yml").st_mode & 0o777
    targets = {entry.path: entry.target for entry in loaded.entries if entry.type == "symlink"}
    assert targets == {"tree/current.json": "conf.d/cache.json", "tree/outside": "/etc/hostname"}
    assert (loaded.path / "env").read_bytes() == env.read_bytes()
    assert check_backup(loaded) == []
    refuse_damaged(loaded)
    assert sorted(os.listdir(store.root)) == [".lock", loaded.id]  # nothing left of the staging


def test_the_manifest_is_written_last_and_names_every_payload_item_once(store: BackupStore, source: Path):
    backup = take(store, source)
    manifest = json.loads((backup.path / MANIFEST).read_text())
    assert {key: manifest[key] for key in ("id", "component", "kind", "label", "format")} == {
        "id": backup.id, "component": "config", "kind": "backup", "label": None, "format": 1}
    paths = [entry["path"] for entry in manifest["entries"]]
    on_disk = {os.path.relpath(os.path.join(folder, name), backup.path)
               for folder, folders, files in os.walk(backup.path) for name in folders + files}
    assert len(paths) == len(set(paths)) and set(paths) == on_disk - {MANIFEST}
    # Written after the payload (and made durable): nothing of the payload is newer than it.
    written = os.stat(backup.path / MANIFEST).st_mtime_ns
    assert all(os.lstat(backup.path / path).st_mtime_ns <= written for path in paths)


def test_check_backup_names_each_damaged_file(store: BackupStore, source: Path):
    backup = take(store, source)
    payload = backup.path / "tree"
    flipped = bytearray((payload / "conf.d/deep/blob.bin").read_bytes())
    flipped[5000] ^= 1  # same size, one bit: only the checksum can tell
    (payload / "conf.d/deep/blob.bin").write_bytes(bytes(flipped))
    (payload / "app.yml").write_text("server:\n")
    (payload / "run.sh").unlink()
    (payload / "zero").unlink()
    (payload / "zero").mkdir()
    os.unlink(payload / "current.json")
    os.symlink("app.yml", payload / "current.json")
    (payload / "stray.txt").write_text("?")
    assert sorted(check_backup(backup)) == sorted([
        "tree/conf.d/deep/blob.bin: checksum mismatch (damaged)",
        "tree/app.yml: size 8, manifest says 21 (damaged)",
        "tree/run.sh: missing from the backup",
        "tree/zero: not a regular file",
        "tree/current.json: symlink changed",
        "tree/stray.txt: in the backup folder but not in its manifest",
    ])
    with pytest.raises(ToolkitError, match=r"is damaged: .* \(and 5 more\); refused, nothing changed"):
        refuse_damaged(backup)


def test_store_resolves_and_checks_backups(tmp_path: Path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("alpha")
    store = BackupStore(tmp_path / "store", "config")
    with store.lock("test"):
        for label in ("one", "two"):
            with store.new_backup(label) as staging:
                staging.add_tree(source, "tree")
    older, newer = sorted(store.backups(), key=lambda b: b.created_at)
    assert store.resolve("latest").id == newer.id
    assert store.resolve(older.id).id == older.id
    assert store.resolve(str(older.path / "tree" / "a.txt")).id == older.id
    assert check_backup(older) == []
    (older.path / "tree" / "stray").write_text("?")
    assert check_backup(older) == ["tree/stray: in the backup folder but not in its manifest"]
    with pytest.raises(UsageError):
        store.resolve("nope")
    with pytest.raises(RuntimeError), store.new_backup("unlocked"):
        pass


def test_failed_backup_leaves_nothing(tmp_path: Path):
    store = BackupStore(tmp_path / "store", "config")
    with store.lock("test"), pytest.raises(UsageError), store.new_backup("doomed") as staging:
        staging.add_file(tmp_path, "not-a-file")
    assert [p.name for p in store.root.iterdir()] == [".lock"]
    assert store.backups() == []


# -- ids, `latest` and safety backups ----------------------------------------------------------------------


def test_ids_made_one_after_another_differ_and_sort_by_time(store: BackupStore):
    with store.lock("test"):
        made = []
        for _ in range(20):  # several in the same millisecond
            with store.new_backup() as staging:
                pass
            made.append(staging.backup.id)
    assert len(set(made)) == 20
    stamps = [backup_id.split("-")[0] for backup_id in made]
    assert stamps == sorted(stamps)  # to the millisecond; within one, the random part decides
    assert [backup.id for backup in store.backups()] == sorted(made, reverse=True)
    assert [os.path.basename(folder) for folder in store.backup_folders()] == sorted(made, reverse=True)


def test_resolve_latest_passes_over_safety_backups(store: BackupStore, source: Path):
    with pytest.raises(UsageError, match="no backups .* yet"):
        store.resolve("latest")
    first_safety = take(store, source, safety=True)
    with pytest.raises(UsageError, match="only safety backups"):
        store.resolve("latest")
    regular = take(store, source, label="mine")
    newer_safety = take(store, source, safety=True)
    assert store.newest().id == newer_safety.id and newer_safety.is_safety
    assert store.resolve("latest").id == regular.id
    assert store.resolve(newer_safety.id).id == newer_safety.id  # by its id, a safety backup restores
    assert store.latest(lambda backup: backup.label != "mine") is None
    with pytest.raises(UsageError, match="only safety backups"):
        store.resolve("latest", lambda backup: backup.id != regular.id)
    assert [backup.is_safety for backup in store.backups()] == [True, False, True]
    assert store.backups()[-1].id == first_safety.id


# -- retention --------------------------------------------------------------------------------------------

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
_numbers = iter(range(1_000_000))


def made(days_ago: float, safety: bool = False) -> Backup:
    """A backup as retention sees it: a time, and whether it is a safety backup."""
    created = NOW - timedelta(days=days_ago)
    backup_id = created.strftime("%Y%m%dT%H%M%S.%f")[:-3] + f"Z-config-host-{next(_numbers):08x}"
    return Backup(Path(backup_id), backup_id, "config", created, None, {}, [],
                  {"kind": "safety" if safety else "backup"})


def ids(backups: list[Backup]) -> list[str]:
    return [backup.id for backup in backups]


def retention_split(backups: list[Backup], days: int, keep: int, now: datetime = NOW, safety_days: int | None = None,
                    protected: set[str] = frozenset()) -> tuple[list[Backup], list[Backup]]:
    """DAYS --keep N as a cleanup runs it, safety backups kept as long as DAYS unless said otherwise."""
    policy = RetentionPolicy(days=days, last=keep, safety_days=days if safety_days is None else safety_days)
    plan = plan_retention(backups, policy, {backup_id: ["protected"] for backup_id in protected}, now=now)
    return plan.remove, plan.keep


def test_retention_keeps_the_newest_regular_backups_whatever_the_safety_backups():
    regular = [made(days) for days in (30, 40, 50, 60, 70)]
    remove, keep = retention_split(regular, days=7, keep=3, now=NOW)
    assert ids(keep) == ids(regular[:3]) and ids(remove) == ids(regular[3:])
    # Safety backups since the newest regular one (restores, updates) stay, older than DAYS or not: they undo
    # what was done since. And they push not one regular backup more out.
    since = [made(days, safety=True) for days in (1, 8, 12, 20)]
    remove, keep = retention_split(regular + since, days=7, keep=3, now=NOW)
    assert ids(keep) == ids(since + regular[:3]) and ids(remove) == ids(regular[3:])
    # One taken before the newest regular backup goes once older than DAYS, one younger than DAYS stays.
    before = made(35, safety=True)
    remove, keep = retention_split([*regular, before], days=7, keep=3, now=NOW)
    assert ids(remove) == ids([before, *regular[3:]])
    assert ids(retention_split([*regular, before], days=36, keep=3, now=NOW)[0]) == ids(regular[3:])
    # The newest backup stays even when it is an old safety backup; protected ids always stay.
    lone = [made(90, safety=True), made(100, safety=True)]
    assert ids(retention_split(lone, days=7, keep=1, now=NOW)[1]) == [lone[0].id]
    remove, keep = retention_split(regular, days=7, keep=1, now=NOW, protected={regular[4].id})
    assert ids(keep) == [regular[0].id, regular[4].id]
    with pytest.raises(UsageError, match="keeps nothing"):
        RetentionPolicy(last=0).checked()
    with pytest.raises(UsageError, match="DAYS must be 0 or more"):
        RetentionPolicy(days=-1, last=1).checked()


def test_retention_rules_hold_for_any_mix_of_backups():
    """Random mixes: the newest `keep` regular backups, the newest backup and anything younger than DAYS always
    stay, and adding safety backups never changes which regular backups go."""
    rng = random.Random(15)
    for _ in range(400):
        backups = [made(rng.uniform(0, 60), safety=rng.random() < 0.5) for _ in range(rng.randint(1, 12))]
        days, keep = rng.randint(0, 30), rng.randint(1, 4)
        remove, kept = retention_split(backups, days, keep, now=NOW)
        assert sorted(ids(remove + kept)) == sorted(ids(backups)) and not set(ids(remove)) & set(ids(kept))
        newest_first = sorted(backups, key=lambda backup: backup.created_at, reverse=True)
        regular = [backup for backup in newest_first if not backup.is_safety]
        assert set(ids(regular[:keep])) <= set(ids(kept))
        assert newest_first[0].id in ids(kept)
        assert all(backup.created_at < NOW - timedelta(days=days) for backup in remove)
        removed_regular = [backup for backup in remove if not backup.is_safety]
        assert ids(removed_regular) == ids(retention_split(regular, days, keep, now=NOW)[0])


def test_retention_plan_on_a_store_then_remove_leaves_exactly_what_it_keeps(store: BackupStore, source: Path):
    oldest, older = take(store, source), take(store, source)
    take(store, source, safety=True)  # before the newest regular one: it may go
    newer, newest = take(store, source), take(store, source)
    after = take(store, source, safety=True)  # since the newest regular one: it undoes what was done since
    remove, keep = retention_split(store.backups(), 0, 2, now=datetime.now(UTC), protected={oldest.id})
    assert ids(keep) == [after.id, newest.id, newer.id, oldest.id]
    assert older.id in ids(remove) and len(remove) == 2
    for backup in remove:
        store.remove(backup)
    assert ids(store.backups()) == ids(keep) and store.leftovers() == []
    assert all(check_backup(backup) == [] for backup in store.backups())


# -- what a killed run leaves ------------------------------------------------------------------------------

_KILLED_MID_BACKUP = """
import os, signal, sys
from pathlib import Path
from backup_store.store import BackupStore
store = BackupStore(Path(sys.argv[1]), "config")
with store.lock("a backup killed half-way"), store.new_backup() as staging:
    staging.add_tree(Path(sys.argv[2]), "tree")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_an_interrupted_backup_leaves_is_named_and_removed_under_the_lock(tmp_path: Path, store: BackupStore,
                                                                              source: Path):
    kept = take(store, source)
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_BACKUP, str(store.root), str(source)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging = [name for name in os.listdir(store.root) if name.startswith(".staging-")]
    assert len(staging) == 1 and (store.root / staging[0] / "tree" / "app.yml").is_file()
    half_deleted = store.root / f".deleting-{kept.id}-0a1b2c"  # a remove killed between its rename and rmtree
    half_deleted.mkdir()
    cut_off = temp_name(store.root / "deployed.json")  # an atomic write killed before its rename
    cut_off.write_text("{")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", store.root / ".staging-a-link")  # not ours to follow or remove

    assert store.backups() == [kept]  # none of it is a backup
    assert store.leftovers() == sorted([staging[0], half_deleted.name, cut_off.name])
    with pytest.raises(RuntimeError, match="needs the store lock"):
        store.remove_leftovers()
    with store.lock("cleanup"):
        assert store.remove_leftovers() == sorted([staging[0], half_deleted.name, cut_off.name])
    assert store.leftovers() == [] and store.backups() == [kept] and check_backup(kept) == []
    assert (tmp_path / "elsewhere").is_dir() and (store.root / ".staging-a-link").is_symlink()


def test_a_received_backup_is_whole_or_absent(tmp_path: Path, store: BackupStore, source: Path):
    backup = take(store, source)
    other = BackupStore(tmp_path / "other", "config")
    with other.lock("pull"):
        with pytest.raises(ToolkitError, match="not a backup id"), other.receive("../escape"):
            pass
        with pytest.raises(RuntimeError, match="manifest was not written"), other.receive(backup.id) as folder:
            (folder / "half").write_text("a pull cut off before its manifest")
        assert other.backups() == [] and other.leftovers() == []
        with other.receive(backup.id) as folder:
            shutil.copytree(backup.path, folder, symlinks=True, dirs_exist_ok=True)
        with pytest.raises(UsageError, match="already in"), other.receive(backup.id):
            pass
    assert other.backups() == [load_backup(other.root / backup.id)] and check_backup(other.backups()[0]) == []


# -- the lock ---------------------------------------------------------------------------------------------


def test_store_lock_is_exclusive_and_names_its_holder(tmp_path: Path):
    store = BackupStore(tmp_path / "store", "config")
    other = BackupStore(tmp_path / "store", "config")
    with store.lock("first run"):
        with pytest.raises(LockBusy, match="first run") as busy, other.lock("second run"):
            pass
        assert busy.value.exit_code == 75
    with other.lock("second run"):
        pass


_TAKE_LOCK = """
import sys
from pathlib import Path
from common.errors import LockBusy
from backup_store.store import BackupStore
try:
    with BackupStore(Path(sys.argv[1]), "config").lock("a step"):
        print("locked")
except LockBusy as exc:
    print(exc)
"""


def test_a_store_lock_held_for_a_run_is_handed_down_to_the_scripts_it_runs(tmp_path: Path):
    """A child given the held lock's descriptor works under it; without it, or for another store, it is
    refused; the child's end releases nothing; a third run is kept out until the holder lets go."""
    held, other = BackupStore(tmp_path / "held", "config"), BackupStore(tmp_path / "other", "config")
    with other.lock("someone else"), HeldLocks("rollback.py restore", 0) as locks:
        locks.take(held.root / ".lock")

        def child(store: BackupStore, handed: bool) -> str:
            return run_tool([sys.executable, "-c", _TAKE_LOCK, str(store.root)], "child", cwd=ROOT,
                            env={**(locks.child_env() if handed else {}), "PYTHONPATH": str(ROOT)},
                            pass_fds=locks.fds if handed else ()).stdout.decode().strip()

        assert child(held, handed=True) == "locked"
        assert child(held, handed=True) == "locked"  # the first child's end did not release it
        assert "'rollback.py restore'" in child(held, handed=False)
        assert "'someone else'" in child(other, handed=True)  # only the locks actually handed down
        with held.lock("this process, under its own held lock (a pull before the steps)"):
            assert held.locked
    assert child(held, handed=False) == "locked"
