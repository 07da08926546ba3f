"""SIGKILL of `database_rollback.py restore` at ten distinct stages of a restore.

Each stage is reached on a real condition, never a timer: a child tool is frozen (SIGSTOP) as it starts
or once it has written a given share of the data, or the script's own statement waits for a lock this
test holds (COMMENT ON DATABASE in an open transaction blocks CREATE DATABASE from that template and
ALTER DATABASE ... RENAME of that database). Then the script is SIGKILLed, and whatever the stage:
no process it started is left, no file it wrote holds the password, a retry right away restores the
backup exactly, `verify` names every `__restore_` database left behind and `cleanup` drops them all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
from helpers import database_state, descendants, script_argv, wait_for_child, wait_until_dead
from test_database_rollback import RICH_SCHEMA, DbWorkspace

from database.scratch import KEPT, RESTORING, parse_scratch_name

FILLER_ROWS = 60_000  # enough data (4 MB) for pg_restore to be frozen a third and two thirds in
SWAP_STAGES = ["listing the dump", "creating the scratch database", "pg_restore starting",
               "a third of the data restored", "two thirds of the data restored", "renaming the live database",
               "renaming the restored database", "switched in"]
IN_PLACE_STAGES = ["in place: safety pg_dump", "in place: a third of the data restored"]
POLL_SECONDS = 0.002


class Restore:
    """One database, one backup of it, the runs of `restore` against it, and a connection to watch them."""

    def __init__(self, dbw: DbWorkspace, tmp: Path):
        self.dbw, self.tmp = dbw, tmp
        self.live = dbw.pg_db.name
        self.backed_up = database_state(dbw.pg_db)
        assert dbw.run("backup").returncode == 0
        self.backup_id = dbw.backup_ids()[0]
        self.watcher = dbw.pg_db.cluster.connect("postgres")  # not the live database: a swap ends its sessions
        self.watcher.autocommit = True
        self.data_bytes = self.size(self.live) - self.size("template0")  # what a restore writes, roughly

    def start(self, *extra: str) -> subprocess.Popen:
        env = {**os.environ, **self.dbw.env, "TMPDIR": str(self.tmp)}
        return subprocess.Popen(script_argv("database_rollback.py", "restore", self.backup_id, "--yes", *extra),
                                cwd=self.dbw.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def query(self, statement: str, *args: object) -> list:
        with self.watcher.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall()

    def scratch(self, role: str) -> list[str]:
        return sorted(name for (name,) in self.query("SELECT datname FROM pg_database")
                      if (found := parse_scratch_name(self.live, name)) and found.role == role)

    def size(self, name: str) -> int:
        return self.query("SELECT coalesce(pg_database_size(%s), 0)", name)[0][0]

    def wait(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"never reached: {what}"
            time.sleep(POLL_SECONDS)

    def waiting_for_lock(self, statement: str) -> bool:
        return bool(self.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'database_rollback.py'"
                               " AND wait_event_type = 'Lock' AND query ILIKE %s", statement + "%"))

    def sessions_ended(self) -> bool:
        return self.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'database_rollback.py'"
                          ) == [(0,)]


@contextmanager
def holding(dbw: DbWorkspace, database: str) -> Iterator[None]:
    """A lock on `database` (COMMENT ON DATABASE in an open transaction) until the block ends."""
    conn = dbw.pg_db.cluster.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(f"COMMENT ON DATABASE \"{database}\" IS 'held by a test'")
        yield
    finally:
        conn.rollback()
        conn.close()


def freeze_when(restore: Restore, pid: int, database: str, share: float) -> None:
    """Let the frozen `pid` run until `database` holds `share` of the data, then freeze it again."""
    target = restore.size(database) + share * restore.data_bytes
    os.kill(pid, signal.SIGCONT)
    restore.wait(lambda: restore.size(database) >= target, f"{share:.0%} of the data in {database}")
    os.kill(pid, signal.SIGSTOP)


def kill_at(restore: Restore, stage: str) -> list[int]:
    """Run a restore to `stage` and SIGKILL it there; the pids of every process it had started."""
    held = {"creating the scratch database": "template0", "renaming the live database": restore.live}.get(stage)
    with holding(restore.dbw, held) if held else nullcontext():
        proc = restore.start(*(["--in-place"] if stage.startswith("in place") else []))
        try:
            return _run_to(restore, proc, stage)
        except BaseException:
            _end_for_good(proc)  # a run left holding the store's lock would fail every later stage too
            raise


def _run_to(restore: Restore, proc: subprocess.Popen, stage: str) -> list[int]:
    """Bring the run to `stage` and SIGKILL it there."""
    if stage == "listing the dump":
        os.kill(wait_for_child(proc, "pg_restore", "--list"), signal.SIGSTOP)
    elif stage == "creating the scratch database":
        restore.wait(lambda: restore.waiting_for_lock("CREATE DATABASE"), "CREATE DATABASE waiting")
    elif stage == "renaming the live database":
        restore.wait(lambda: restore.waiting_for_lock("ALTER DATABASE"), "the first rename waiting")
    elif stage == "in place: safety pg_dump":
        os.kill(wait_for_child(proc, "pg_dump", "--format"), signal.SIGSTOP)
    elif stage == "in place: a third of the data restored":
        pid = wait_for_child(proc, "pg_restore", "--dbname")
        os.kill(pid, signal.SIGSTOP)
        freeze_when(restore, pid, restore.live, 1 / 3)
    else:
        return _kill_in_the_swap(restore, proc, stage)
    return _kill(proc)


def _kill_in_the_swap(restore: Restore, proc: subprocess.Popen, stage: str) -> list[int]:
    pid = wait_for_child(proc, "pg_restore", "--dbname")
    os.kill(pid, signal.SIGSTOP)
    (scratch,) = restore.scratch(RESTORING)
    if stage in ("a third of the data restored", "two thirds of the data restored"):
        freeze_when(restore, pid, scratch, 1 / 3 if stage.startswith("a third") else 2 / 3)
    elif stage == "renaming the restored database":
        with holding(restore.dbw, scratch):
            os.kill(pid, signal.SIGCONT)
            restore.wait(lambda: restore.waiting_for_lock("ALTER DATABASE"), "the second rename waiting")
            return _kill(proc)
    elif stage == "switched in":
        os.kill(pid, signal.SIGCONT)
        restore.wait(lambda: restore.scratch(RESTORING) == [] or proc.poll() is not None, "the switch")
    return _kill(proc)


def _end_for_good(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started, frozen or not."""
    for pid in [*descendants(proc.pid), proc.pid]:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    proc.communicate()


def _kill(proc: subprocess.Popen) -> list[int]:
    started = list(descendants(proc.pid))
    proc.kill()
    proc.communicate()
    return started


@pytest.fixture(scope="module")
def restore(pg_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restore]:
    """One database with some data and its backup, shared by the stages (each breaks it, then restores it)."""
    database = pg_cluster.create_database("kill_test")
    root = tmp_path_factory.mktemp("kills")
    (root / "tmp").mkdir()
    dbw = DbWorkspace(database, root)
    dbw.sql(RICH_SCHEMA + "CREATE TABLE filler AS SELECT i, md5(i::text) AS h"
                          f" FROM generate_series(1, {FILLER_ROWS}) i;")
    restore = Restore(dbw, root / "tmp")
    yield restore
    for name in restore.scratch(KEPT) + restore.scratch(RESTORING):
        pg_cluster.drop_database(name)
    restore.watcher.close()
    pg_cluster.drop_database(database.name)


@pytest.mark.parametrize("stage", SWAP_STAGES + IN_PLACE_STAGES)
def test_sigkill_at_each_stage_of_a_restore_leaves_nothing_behind_and_a_retry_succeeds(restore: Restore,
                                                                                       stage: str):
    dbw = restore.dbw
    dbw.sql("DELETE FROM filler WHERE i % 3 = 0; DROP VIEW IF EXISTS big_orders; UPDATE customers SET name = 'x'")

    started = kill_at(restore, stage)

    for pid in started:
        assert wait_until_dead(pid), f"{pid} outlived the killed restore"
    assert list(restore.tmp.iterdir()) == [], "a file was left in TMPDIR"
    retry = restore.start(*(["--in-place"] if stage.startswith("in place") else []))
    _, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err
    assert database_state(dbw.pg_db) == restore.backed_up

    restore.wait(restore.sessions_ended, "the killed run's sessions ending")  # and with them its locks
    leftovers = restore.scratch(RESTORING)
    verify = dbw.run("--json", "verify")
    assert verify.returncode == (3 if leftovers else 0), verify.stdout
    problems = json.loads(verify.stdout)["problems"]
    assert [name for name in leftovers if any(name in problem for problem in problems)] == leftovers
    assert len(problems) == len(leftovers), problems
    cleanup = dbw.run("cleanup", "30")
    assert cleanup.returncode == 0, cleanup.stderr
    assert restore.scratch(RESTORING) == []
    assert [item.name for item in dbw.store.iterdir() if item.name.startswith(".staging")] == []
