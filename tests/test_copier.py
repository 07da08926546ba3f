"""Copies on several processes: byte for byte, every failure raised here, no worker outliving its parent."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, damage_content, tree_snapshot, writer_once_read

import backup_store.copier
from backup_store.copier import PARALLEL_FROM, CopyFailed, CopyJob, copy_all
from backup_store.manifest import load_backup
from backup_store.store import BackupStore
from common.errors import ToolkitError
from deployed_code.build import build_tree
from deployed_code.snapshot import snapshot_tree

MANY = PARALLEL_FROM + 344  # enough for the workers to share the runs


def children() -> set[int]:
    """This process's living children (zombies included until reaped)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def make_files(folder: Path, count: int = MANY) -> list[Path]:
    """`count` files of 0 bytes to a little over 1 MiB (the copy's chunk), some executable."""
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"f{i:04d}"
        size = 1_048_700 if i % 97 == 0 else (i * 131) % 9000
        path.write_bytes(os.urandom(size))
        os.chmod(path, 0o755 if i % 5 == 0 else 0o640)
        paths.append(path)
    return paths


def jobs_for(sources: list[Path], dest: Path, seen: dict[int, tuple[int, str]]) -> list[CopyJob]:
    dest.mkdir()
    jobs = []
    for n, src in enumerate(sources):
        def done(size: int, digest: str, n: int = n) -> None:
            assert n not in seen, "reported twice"
            seen[n] = (size, digest)

        jobs.append(CopyJob(str(src), str(dest / src.name), src.stat().st_mode & 0o777, None, done))
    return jobs


@pytest.mark.parametrize("runs", ["short", "long"])
def test_many_files_are_copied_byte_for_byte_and_each_reported_once(tmp_path, monkeypatch, runs):
    if runs == "long":  # runs of 200 files: reported in several pipe writes each
        monkeypatch.setattr(backup_store.copier, "_MAX_RUNS", 3)
    sources = make_files(tmp_path / "src")
    before = children()
    seen: dict[int, tuple[int, str]] = {}
    copy_all(jobs_for(sources, tmp_path / "out", seen), workers=2)
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(tmp_path / "src")
    for n, src in enumerate(sources):
        data = src.read_bytes()
        assert seen[n] == (len(data), hashlib.sha256(data).hexdigest())
    assert children() == before  # every worker reaped


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_copy_stops_every_worker_and_names_the_file(tmp_path, workers):
    sources = make_files(tmp_path / "src")
    sources[MANY // 2].unlink()
    sources[MANY // 2].mkdir()  # opens, but cannot be read
    before = children()
    with pytest.raises(CopyFailed) as failed:
        copy_all(jobs_for(sources, tmp_path / "out", {}), workers=workers)
    assert failed.value.errno == errno.EISDIR and failed.value.filename == str(sources[MANY // 2])
    assert str(failed.value) == f"could not read {sources[MANY // 2]}: Is a directory"
    assert children() == before


def test_an_existing_destination_is_never_written_through(tmp_path):
    sources = make_files(tmp_path / "src")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    jobs = jobs_for(sources, tmp_path / "out", {})
    os.symlink(outside, jobs[7].dest)
    with pytest.raises(CopyFailed) as failed:
        copy_all(jobs, workers=2)
    assert failed.value.errno == errno.EEXIST and failed.value.filename == jobs[7].dest
    assert str(failed.value) == f"could not write {jobs[7].dest}: File exists"
    assert outside.read_text() == "not yours\n"


def test_a_check_failing_here_stops_the_workers(tmp_path):
    sources = make_files(tmp_path / "src")
    jobs = jobs_for(sources, tmp_path / "out", {})

    def damaged(size: int, digest: str) -> None:
        raise ToolkitError("f0100 does not match its checksum")

    jobs[100].done = damaged
    before = children()
    with pytest.raises(ToolkitError, match="checksum"):
        copy_all(jobs, workers=2)
    assert children() == before


KILLED_PARENT = """
import fcntl, os, sys
from pathlib import Path
from backup_store.copier import CopyJob, copy_all
src, out, lock = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
held = os.open(lock, os.O_RDWR | os.O_CREAT)
fcntl.flock(held, fcntl.LOCK_EX)  # as the store's lock is held through a backup
names = sorted(os.listdir(src))
copy_all([CopyJob(str(src / n), str(out / n), 0o600, None, lambda size, digest: None) for n in names], workers=2)
"""


def open_files(pid: int) -> set[str]:
    """What the process has open (a worker opens and closes files meanwhile: those may be missed)."""
    folder = Path(f"/proc/{pid}/fd")
    found = set()
    for fd in os.listdir(folder):
        try:
            found.add(os.readlink(folder / fd))
        except FileNotFoundError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_workers_die_with_a_killed_parent_and_hold_no_lock(tmp_path):
    make_files(tmp_path / "src")
    fifo = tmp_path / "src" / "f0000"  # the first run's worker waits on it, mid-copy
    fifo.unlink()
    os.mkfifo(fifo)
    (tmp_path / "out").mkdir()
    lock = tmp_path / "lock"
    parent = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(tmp_path / "src"), str(tmp_path / "out"),
                               str(lock)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    writer = writer_once_read(fifo, parent)  # a worker is reading it, mid-copy
    deadline = time.monotonic() + 30
    try:
        listing = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        while len(workers := listing.read_text().split()) < 2:  # the fifo may be opened before the second fork
            assert time.monotonic() < deadline
            time.sleep(0.001)
        workers = [int(pid) for pid in workers]
        while not (reading := [pid for pid in workers if str(fifo) in open_files(pid)]):
            assert time.monotonic() < deadline  # the reader's open returns once the writer is there
            time.sleep(0.001)
        assert len(reading) == 1 and str(lock) not in open_files(reading[0])  # the parent's lock is not kept
        parent.send_signal(signal.SIGKILL)
        assert parent.wait() == -signal.SIGKILL
        # The worker reading the fifo would wait for ever: only dying with its parent ends it.
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their parent"
            time.sleep(0.001)
        free = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(free)
    finally:
        os.close(writer)


def test_a_tree_large_enough_for_several_workers_round_trips(tmp_path):
    make_files(tmp_path / "src")
    (tmp_path / "src" / "sub").mkdir()
    os.symlink("../f0001", tmp_path / "src" / "sub" / "link")
    store = BackupStore(tmp_path / "store", "code")
    with store.lock("test"), store.new_backup() as staging:
        stats = snapshot_tree(staging, tmp_path / "src", "tree")
    backup = load_backup(store.root / staging.backup_id)
    assert stats.copied == MANY and stats.bytes_copied == stats.bytes
    for entry in backup.files:
        data = (tmp_path / "src" / entry.path.removeprefix("tree/")).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    build_tree(backup, "tree", tmp_path / "built")
    assert tree_snapshot(tmp_path / "built") == tree_snapshot(tmp_path / "src")
    damage_content(backup.content(next(entry for entry in backup.files if entry.path == "tree/f0300")))
    with pytest.raises(ToolkitError, match="f0300 does not match its checksum"):
        build_tree(backup, "tree", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_plain_tree_backup_of_many_files_records_each_checksum(tmp_path):
    make_files(tmp_path / "src")
    store = BackupStore(tmp_path / "store", "config")
    with store.lock("test"), store.new_backup() as staging:
        staging.add_tree(tmp_path / "src", "tree")
    backup = load_backup(store.root / staging.backup_id)
    assert len(backup.files) == MANY
    for entry in backup.files:
        data = (tmp_path / "src" / entry.path.removeprefix("tree/")).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert (backup.path / entry.path).read_bytes() == data
