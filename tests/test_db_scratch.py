"""The scratch databases of swap restores: names that never collide, restores killed mid-way, and leftovers
that verify names and cleanup drops, but never under a restore that is still running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import database_state, process_state, run_script, script_argv, wait_for_child, wait_until_dead
from test_database_rollback import RICH_SCHEMA, DbWorkspace, break_database

from common.errors import ToolkitError
from common.settings import Settings
from database.dumps import rename_back_statements
from database.scratch import (
    DRILLING,
    KEPT,
    RESTORING,
    UNDONE,
    being_built,
    claim_key,
    claimed,
    parse_scratch_name,
    scratch_name,
    scratch_names,
)
from database.server import DbServer


@pytest.fixture
def dbw(pg_db, tmp_path: Path) -> DbWorkspace:
    workspace = DbWorkspace(pg_db, tmp_path)
    workspace.sql(RICH_SCHEMA)
    return workspace


def start(dbw: DbWorkspace, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """database_rollback.py as a process of its own, left running."""
    return subprocess.Popen(script_argv("database_rollback.py", *args), cwd=dbw.root,
                            env={**os.environ, **dbw.env, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def scratch_of(dbw: DbWorkspace, role: str) -> set[str]:
    return {name for name in dbw.databases()
            if (found := parse_scratch_name(dbw.pg_db.name, name)) and found.role == role}


def wait_for_sessions_to_end(dbw: DbWorkspace, timeout: float = 30) -> None:
    """Until the server has let go of every session of the toolkit (a killed client's backend exits a moment
    after its socket closes, and with it the advisory locks it held)."""
    deadline = time.monotonic() + timeout
    while dbw.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'database_rollback.py'") != [(0,)]:
        assert time.monotonic() < deadline, "the killed run's sessions did not end"
        time.sleep(0.005)


def stop_and_kill(proc: subprocess.Popen, child: int) -> None:
    """Hold `child` where it is, SIGKILL the script, and check the child died with it."""
    os.kill(child, signal.SIGSTOP)
    proc.kill()
    proc.communicate()
    try:
        assert wait_until_dead(child), f"{child} outlived the killed script"
    finally:
        if process_state(child) not in ("gone", "Z"):
            os.kill(child, signal.SIGKILL)


def test_two_names_made_in_the_same_second_differ_and_fit_63_bytes():
    moment = datetime(2026, 11, 29, 3, 0, 0, tzinfo=UTC)
    for live in ("app", "ä" * 40, "x" * 63):
        names = {scratch_name(live, RESTORING, moment) for _ in range(50)}
        assert len(names) == 50
        restoring, kept = scratch_names(live, moment)
        for name, role in ((restoring, RESTORING), (kept, KEPT)):
            found = parse_scratch_name(live, name)
            assert len(name.encode()) <= 63
            assert found is not None and (found.name, found.role, found.made) == (name, role, moment)
    assert parse_scratch_name("app", "app__before_20200101000000").role == KEPT  # named before the random part
    assert parse_scratch_name("app", "other__restore_20200101000000_abcdef") is None
    assert parse_scratch_name("app", "app__restore_2020") is None


def test_sigkill_mid_restore_leaves_a_leftover_verify_names_cleanup_drops_and_a_retry_succeeds(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    break_database(dbw)
    tmp = dbw.root / "tmp"
    tmp.mkdir()
    proc = start(dbw, "restore", "latest", "--yes", env={"TMPDIR": str(tmp)})
    stop_and_kill(proc, wait_for_child(proc, "pg_restore", "--dbname"))
    assert list(tmp.iterdir()) == []  # no password file
    leftovers = scratch_of(dbw, RESTORING)
    assert len(leftovers) == 1
    wait_for_sessions_to_end(dbw)

    # A server process that is no client (autovacuum analysing the loaded tables; here a walsender) may be on
    # the leftover: it is still a leftover.
    visitor = dbw.pg_db.cluster.connect(next(iter(leftovers)), replication="database")
    try:
        verify = dbw.run("--json", "verify")
    finally:
        visitor.close()
    assert verify.returncode == 3, verify.stdout
    assert [p for p in json.loads(verify.stdout)["problems"] if leftovers.pop() in p and "cleanup" in p]

    retry = dbw.run("restore", "latest", "--yes")
    assert retry.returncode == 0, retry.stderr
    assert database_state(dbw.pg_db) == before

    leftover = scratch_of(dbw, RESTORING)
    cleanup = dbw.run("--json", "cleanup", "30")
    assert cleanup.returncode == 0, cleanup.stderr
    assert set(json.loads(cleanup.stdout)["dropped_databases"]) == leftover
    assert scratch_of(dbw, RESTORING) == set()
    assert dbw.run("verify").returncode == 0


def test_a_running_restore_is_spared_by_cleanup_and_verify_while_another_store_restores(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    other_store = {**dbw.env, "BACKUP_DIR": str(dbw.root / "other-backups")}
    assert dbw.run("backup").returncode == 0
    assert run_script("database_rollback.py", "backup", env=other_store, cwd=dbw.root).returncode == 0
    break_database(dbw)

    first = start(dbw, "--json", "restore", "latest", "--yes")
    held = wait_for_child(first, "pg_restore", "--dbname")
    os.kill(held, signal.SIGSTOP)  # the first restore is building its database, and stays there
    try:
        building = scratch_of(dbw, RESTORING)
        assert len(building) == 1
        # The first run holds its store's lock: these runs use the other store, as a second team would.
        verify = run_script("database_rollback.py", "--json", "verify", env=other_store, cwd=dbw.root)
        assert verify.returncode == 0, verify.stdout
        assert any("being built" in note for note in json.loads(verify.stdout)["notes"])
        cleanup = run_script("database_rollback.py", "--json", "cleanup", "0", env=other_store, cwd=dbw.root)
        assert cleanup.returncode == 0, cleanup.stderr
        assert json.loads(cleanup.stdout)["dropped_databases"] == []
        assert scratch_of(dbw, RESTORING) == building
        second = run_script("database_rollback.py", "restore", "latest", "--yes", env=other_store, cwd=dbw.root)
        assert second.returncode == 0, second.stderr
        assert database_state(dbw.pg_db) == before
    finally:
        os.kill(held, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert database_state(dbw.pg_db) == before
    assert scratch_of(dbw, RESTORING) == set()
    assert len(scratch_of(dbw, KEPT)) == 2


def test_a_live_database_left_refusing_connections_is_named_by_verify_and_opened_by_a_restore(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    # What a restore killed between refusing new connections and the renames leaves behind.
    dbw.sql(f'ALTER DATABASE "{dbw.pg_db.name}" WITH ALLOW_CONNECTIONS false', dbname="postgres")
    verify = dbw.run("--json", "verify")
    assert verify.returncode == 3, verify.stderr
    (problem,) = json.loads(verify.stdout)["problems"]
    assert "does not accept connections" in problem and "ALLOW_CONNECTIONS true" in problem
    restore = dbw.run("restore", "latest", "--yes")
    assert restore.returncode == 0, restore.stderr
    assert database_state(dbw.pg_db) == before
    assert dbw.run("verify").returncode == 0


def test_a_drill_killed_mid_restore_leaves_what_verify_names_and_cleanup_drops(dbw: DbWorkspace):
    assert dbw.run("backup").returncode == 0
    env = {**os.environ, **dbw.env, "POINTS_DIR": str(dbw.root / "points")}
    drill = subprocess.Popen(script_argv("rollback.py", "drill"), cwd=dbw.root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop_and_kill(drill, wait_for_child(drill, "pg_restore", "--dbname"))
    wait_for_sessions_to_end(dbw)
    # The drill's database, or the one its restore builds beside it (named from a cut of the drill's name
    # when the live name is long, as here).
    leftovers = {name for name in dbw.databases() if parse_scratch_name(dbw.pg_db.name, name)}
    assert len(leftovers) == 1

    verify = dbw.run("--json", "verify")
    assert verify.returncode == 3
    named = json.loads(verify.stdout)["problems"]
    assert all(any(name in problem for problem in named) for name in leftovers)
    cleanup = dbw.run("--json", "cleanup", "30")
    assert set(json.loads(cleanup.stdout)["dropped_databases"]) == leftovers
    assert not {name for name in dbw.databases() if parse_scratch_name(dbw.pg_db.name, name)}


def test_drill_names_and_their_restores_are_recognised_for_short_names():
    drill = scratch_name("app", DRILLING)
    assert parse_scratch_name("app", drill).role == DRILLING
    assert parse_scratch_name("app", scratch_name(drill, RESTORING)).role == RESTORING
    assert parse_scratch_name("other", drill) is None


def test_an_undo_gives_back_a_database_that_takes_connections(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    break_database(dbw)
    restored = json.loads(dbw.run("--json", "restore", "latest", "--yes").stdout)
    kept = restored["previous_database"]
    dbw.sql(f'ALTER DATABASE "{kept}" WITH ALLOW_CONNECTIONS false')  # as a swap killed just after its commit
    broken_again = rename_back_statements(dbw.pg_db.name, kept)
    for statement in broken_again:
        dbw.sql(statement, dbname="postgres")
    assert database_state(dbw.pg_db) != before  # the broken database is back, and it takes connections
    (undone,) = scratch_of(dbw, UNDONE)
    notes = json.loads(dbw.run("--json", "verify").stdout)["notes"]
    assert any(undone in note and "kept" in note for note in notes)  # named, and cleanup DAYS drops it when old


def _server(dbw: DbWorkspace) -> DbServer:
    return DbServer.from_settings(Settings.load(None, environ=dbw.env))


def _claim_pid(dbw: DbWorkspace, name: str) -> int:
    (pid,) = dbw.sql(f"SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                     f" AND ((classid::bigint << 32) | objid::bigint) = {claim_key(name)}")[0]
    return pid


def test_a_claim_outlives_the_servers_idle_timeout_and_knows_when_it_is_lost(dbw: DbWorkspace):
    name = scratch_name(dbw.pg_db.name, RESTORING)
    dbw.sql("ALTER DATABASE postgres SET idle_session_timeout = '100ms'")
    try:
        with claimed(_server(dbw), name) as claim:
            time.sleep(0.5)  # not a wait for anything: the time the server gives an idle session, five times over
            claim.check()
            assert being_built_now(dbw, name)
            dbw.sql(f"SELECT pg_terminate_backend({_claim_pid(dbw, name)})")
            with pytest.raises(ToolkitError, match="was lost"):
                claim.check()
    finally:
        dbw.sql("ALTER DATABASE postgres RESET idle_session_timeout")


def being_built_now(dbw: DbWorkspace, name: str) -> bool:
    conn = dbw.pg_db.cluster.connect("postgres")
    try:
        with conn.cursor() as cur:
            return name in being_built(cur, [name])
    finally:
        conn.close()


def test_a_restore_whose_claim_is_lost_switches_nothing_in(dbw: DbWorkspace):
    assert dbw.run("backup").returncode == 0
    break_database(dbw)
    broken = database_state(dbw.pg_db)
    proc = start(dbw, "restore", "latest", "--yes")
    pg_restore = wait_for_child(proc, "pg_restore", "--dbname")
    os.kill(pg_restore, signal.SIGSTOP)
    try:
        (scratch,) = scratch_of(dbw, RESTORING)
        dbw.sql(f"SELECT pg_terminate_backend({_claim_pid(dbw, scratch)})")  # as a proxy's idle timeout would
    finally:
        os.kill(pg_restore, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "was lost" in err.decode()
    assert database_state(dbw.pg_db) == broken and not scratch_of(dbw, RESTORING)
