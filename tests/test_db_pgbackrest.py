"""The pgbackrest engine (DB_ENGINE=pgbackrest) against the real pgbackrest and a cluster that archives its WAL."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import database_state, run_script, script_env
from pg_archive import ArchivingCluster
from pg_cluster import Database, runuser
from point_system import System, take_point


@pytest.fixture
def archiving() -> Iterator[ArchivingCluster]:
    cluster = ArchivingCluster().start()
    try:
        cluster.cluster.create_database("app")
        yield cluster
    finally:
        cluster.stop()


def sql(database: Database, statement: str) -> None:
    conn = database.connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def run(archiving: ArchivingCluster, tmp_path: Path, *args: str):
    env = {**archiving.env("app"), "BACKUP_DIR": str(tmp_path / "db_backups")}
    return run_script("database_rollback.py", *args, env=env, cwd=tmp_path)


def backup_labels(archiving: ArchivingCluster) -> list[str]:
    stanzas = json.loads(archiving.pgbackrest("info", "--output=json").stdout)
    return [backup["label"] for backup in stanzas[0].get("backup", [])]


def test_a_mark_follows_a_first_full_backup_and_records_where_it_is(archiving: ArchivingCluster, tmp_path: Path):
    first = run(archiving, tmp_path, "--json", "backup")
    assert first.returncode == 0, first.stderr
    mark = json.loads(first.stdout)["mark"]
    labels = backup_labels(archiving)
    assert len(labels) == 1 and labels[0].endswith("F")  # none before: a full one
    assert mark["pgbackrest_backup"] == labels[0] and mark["restore_point"] == json.loads(first.stdout)["backup"]["id"]
    second = run(archiving, tmp_path, "--json", "backup")
    assert second.returncode == 0, second.stderr
    later = json.loads(second.stdout)["mark"]
    assert backup_labels(archiving) == labels  # the newest backup is recent: a mark only
    assert _lsn(later["lsn"]) > _lsn(mark["lsn"])
    listed = run(archiving, tmp_path, "--json", "list")
    assert [b["id"] for b in json.loads(listed.stdout)["backups"]] == [later["restore_point"], mark["restore_point"]]


def test_a_mark_is_refused_before_anything_changes_while_archiving_is_broken(archiving: ArchivingCluster,
                                                                            tmp_path: Path):
    archiving.break_archiving()
    result = run(archiving, tmp_path, "backup")
    assert result.returncode == 1
    assert "pgbackrest check failed" in result.stderr and "nothing was changed" in result.stderr
    assert backup_labels(archiving) == []
    listed = run(archiving, tmp_path, "--json", "list")
    assert json.loads(listed.stdout)["backups"] == []


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def test_a_restore_to_a_mark_gives_the_rows_of_its_moment_and_keeps_the_data_directory_it_replaced(
        archiving: ArchivingCluster, tmp_path: Path):
    app = Database("app", archiving.cluster)
    sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text);"
             " INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(1, 1000) i")
    marked = run(archiving, tmp_path, "--json", "backup")
    assert marked.returncode == 0, marked.stderr
    mark = json.loads(marked.stdout)["mark"]["restore_point"]
    at_mark = database_state(app)
    sql(app, "DELETE FROM orders WHERE id % 3 = 0; UPDATE orders SET note = 'deployed' WHERE id < 50;"
             " CREATE TABLE added_since (id int)")
    after = database_state(app)
    assert after != at_mark
    restored = run(archiving, tmp_path, "--json", "restore", mark, "--yes")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert database_state(app) == at_mark
    kept = Path(report["kept_data_dir"])
    assert (kept / "PG_VERSION").is_file() and kept.name.endswith(mark)



def test_a_restore_that_fails_after_the_stop_keeps_the_replaced_directory_and_its_undo_works(
        archiving: ArchivingCluster, tmp_path: Path):
    app = Database("app", archiving.cluster)
    sql(app, "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 100)")
    marked = run(archiving, tmp_path, "--json", "backup")
    assert marked.returncode == 0, marked.stderr
    mark = json.loads(marked.stdout)["mark"]["restore_point"]
    sql(app, "INSERT INTO orders SELECT generate_series(101, 200)")
    live = database_state(app)
    # A start that fails until a file exists: the restore fails once the cluster is stopped, moved and restored.
    ready = tmp_path / "ready"
    env = {**archiving.env("app"), "BACKUP_DIR": str(tmp_path / "db_backups"),
           "PG_START_COMMAND": failing_start(archiving, ready)}
    failed = run_script("database_rollback.py", "restore", mark, "--yes", env=env, cwd=tmp_path)
    assert failed.returncode == 1
    assert "kept whole as" in failed.stderr and "to put it back" in failed.stderr
    undo = failed.stderr.split("to put it back:\n", 1)[1].strip().splitlines()
    ready.touch()
    for line in undo[1:]:  # the server is not running: its stop is the one line that would fail
        subprocess.run(shlex.split(line), check=True)
    assert database_state(app) == live


def failing_start(archiving: ArchivingCluster, ready: Path) -> str:
    """A PG_START_COMMAND that fails until `ready` exists, then starts the cluster as its start would."""
    start = [os.path.join(archiving.cluster.bindir, "pg_ctl"), "-D", archiving.cluster.data_dir,
             "-l", archiving.cluster.log_file, "-w", "start"]
    if os.geteuid() == 0:
        start = [runuser(), "-u", "postgres", "--", *start]
    return shlex.join(["sh", "-c", 'test -e "$0" && exec "$@"', str(ready), *start])


def test_a_point_whose_mark_restore_fails_after_the_stop_prints_the_undo_that_puts_the_cluster_back(
        archiving: ArchivingCluster, tmp_path: Path):
    system = System(tmp_path, Database("app", archiving.cluster))
    system.env.update(archiving.env("app"))
    point = take_point(system)
    system.break_everything()
    broken = system.state()
    ready = tmp_path / "ready"
    result = system.run("--json", "restore", point["id"], "--yes", PG_START_COMMAND=failing_start(archiving, ready))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["restored"] == ["config", "code"] and "database" in report["failure"]
    ready.touch()
    for line in report["undo"][1:]:  # the database's first (its stop: the server is down), then code, config
        subprocess.run(line, shell=True, check=True, env=script_env(system.env))  # as the operator's shell
    assert system.state() == broken


def test_a_mark_of_another_stanza_is_refused_before_the_server_stops(archiving: ArchivingCluster, tmp_path: Path):
    marked = run(archiving, tmp_path, "--json", "backup")
    assert marked.returncode == 0, marked.stderr
    mark = json.loads(marked.stdout)["mark"]["restore_point"]
    env = {**archiving.env("app"), "BACKUP_DIR": str(tmp_path / "db_backups"), "PGBACKREST_STANZA": "elsewhere"}
    refused = run_script("database_rollback.py", "restore", mark, "--yes", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "nothing was changed" in refused.stderr
    assert archiving.cluster.query("app", "SELECT 1") == [(1,)]  # still running
    assert not list(Path(archiving.cluster.data_dir).parent.glob("*.before-*"))


def test_verify_says_a_mark_is_restorable_and_names_broken_archiving(archiving: ArchivingCluster, tmp_path: Path):
    assert run(archiving, tmp_path, "backup").returncode == 0
    verified = run(archiving, tmp_path, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "restorable" in verified.stdout
    archiving.break_archiving()
    broken = run(archiving, tmp_path, "verify")
    assert broken.returncode == 3 and "pgbackrest check failed" in broken.stdout


def test_rollback_restores_a_point_whose_database_part_is_a_mark_in_the_runbooks_order(
        archiving: ArchivingCluster, tmp_path: Path):
    system = System(tmp_path, Database("app", archiving.cluster))
    system.env.update(archiving.env("app"))
    before = system.state()
    point = take_point(system)
    mark = json.loads(run(archiving, tmp_path, "--json", "list").stdout)["backups"][0]["id"]
    assert point["parts"]["db"] == mark
    system.break_everything()
    result = system.run("--json", "restore", point["id"], "--yes")
    assert result.returncode == 0, result.stderr + result.stdout
    assert system.state() == before
    report = json.loads(result.stdout)
    assert report["restored"] == ["config", "code", "db"]
    assert report["database_plan"]["action"] == "mark restore"
    assert any(" mv " in f" {line} " and ".before-" in line for line in report["undo"])  # the old PGDATA back
