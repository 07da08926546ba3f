"""The test harness's throwaway PostgreSQL cluster really serves, authenticates, isolates and cleans up."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
from pg_cluster import Database, ServerBinariesNotFound, ThrowawayCluster, find_bindir, memory_folder
from small_fs import small_filesystem


def _one(conn: psycopg2.extensions.connection, query: str, params: tuple[object, ...] = ()) -> object:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()[0]


def _database_exists(cluster: ThrowawayCluster, name: str) -> bool:
    with closing(cluster.connect("postgres")) as conn:
        return bool(_one(conn, "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)))


def test_unix_socket_connection_reaches_the_test_database(pg_db: Database) -> None:
    socket_path = os.path.join(pg_db.env["DB_HOST"], f".s.PGSQL.{pg_db.env['DB_PORT']}")
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
    with closing(pg_db.connect()) as conn:
        assert _one(conn, "SELECT current_database()") == pg_db.name
        assert _one(conn, "SELECT current_user") == "postgres"
        assert _one(conn, "SELECT inet_server_addr()") is None  # NULL means a unix-socket session


def test_tcp_connection_with_password_uses_scram(pg_db: Database) -> None:
    with closing(pg_db.connect(host="127.0.0.1")) as conn:
        assert _one(conn, "SELECT host(inet_server_addr())") == "127.0.0.1"
        assert _one(conn, "SELECT inet_server_port()") == int(pg_db.env["DB_PORT"])
        stored = _one(conn, "SELECT rolpassword FROM pg_authid WHERE rolname = current_user")
        assert isinstance(stored, str) and stored.startswith("SCRAM-SHA-256$")
        host_rules = "SELECT array_agg(DISTINCT auth_method) FROM pg_hba_file_rules WHERE type = 'host'"
        assert _one(conn, host_rules) == ["scram-sha-256"]


def test_tcp_connection_with_wrong_password_is_refused(pg_db: Database) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg_db.connect(host="127.0.0.1", password=pg_db.env["DB_PASSWORD"] + "-wrong").close()


def test_env_points_a_client_tool_at_the_test_database(pg_db: Database, pg_cluster: ThrowawayCluster) -> None:
    env = pg_db.env
    assert set(env) == {"DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD"}
    client_env = {
        "PATH": os.environ.get("PATH", ""),
        "PGHOST": "127.0.0.1",
        "PGPORT": env["DB_PORT"],
        "PGDATABASE": env["DB_NAME"],
        "PGUSER": env["DB_USER"],
        "PGPASSWORD": env["DB_PASSWORD"],
        "PGPASSFILE": os.devnull,
    }
    psql = os.path.join(pg_cluster.bindir, "psql")
    argv = [psql, "--no-psqlrc", "--tuples-only", "--no-align", "--command", "SELECT current_database()"]
    result = subprocess.run(argv, env=client_env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pg_db.name


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_its_own_empty_database(pg_db: Database, run: str) -> None:
    # Both runs create the same table: the second fails if it gets the first run's database back.
    with closing(pg_db.connect()) as conn:
        assert _one(conn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE marker (run text)")
            cur.execute("INSERT INTO marker VALUES (%s)", (run,))
        conn.commit()
        assert _one(conn, "SELECT run FROM marker") == run


def test_databases_in_one_cluster_are_isolated(pg_db: Database, pg_cluster: ThrowawayCluster) -> None:
    other = pg_cluster.create_database(pg_db.name[:50] + "_other")
    try:
        with closing(pg_db.connect()) as conn:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE only_here (id int)")
            conn.commit()
        with closing(other.connect()) as conn:
            assert _one(conn, "SELECT to_regclass('public.only_here')") is None
        with closing(pg_db.connect()) as conn:
            assert _one(conn, "SELECT to_regclass('public.only_here')::text") == "only_here"
    finally:
        pg_cluster.drop_database(other.name)


def test_drop_database_ends_open_sessions_and_removes_it(pg_cluster: ThrowawayCluster) -> None:
    database = pg_cluster.create_database("Mixed Case; needs quoting")
    lingering = database.connect()
    try:
        assert _one(lingering, "SELECT current_database()") == "Mixed Case; needs quoting"
        pg_cluster.drop_database(database.name)
        assert not _database_exists(pg_cluster, database.name)
        with pytest.raises(psycopg2.Error):
            _one(lingering, "SELECT 1")
    finally:
        lingering.close()


@pytest.fixture
def checks_database_dropped(pg_cluster: ThrowawayCluster) -> Iterator[list[str]]:
    """Names put here must be gone once the test's other fixtures are torn down."""
    names: list[str] = []
    yield names
    assert names, "the test did not record its database name"
    for name in names:
        assert not _database_exists(pg_cluster, name), f"database {name!r} survived its test"


# Fixtures are set up in argument order and torn down in reverse, so the check runs after pg_db's drop.
def test_pg_db_is_dropped_after_the_test(checks_database_dropped: list[str], pg_db: Database) -> None:
    assert _database_exists(pg_db.cluster, pg_db.name)
    checks_database_dropped.append(pg_db.name)


def test_server_runs_as_the_postgres_user_when_tests_run_as_root(pg_cluster: ThrowawayCluster) -> None:
    with open(os.path.join(pg_cluster.data_dir, "postmaster.pid"), encoding="utf-8") as pidfile:
        server_pid = int(pidfile.readline())
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert os.stat(f"/proc/{server_pid}").st_uid == expected


def test_find_bindir_prefers_the_newest_versioned_folder(tmp_path: Path) -> None:
    for version in ("9.6", "15", "10", "16"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        names = ("initdb",) if version == "16" else ("initdb", "pg_ctl")  # 16 is incomplete: not a candidate
        for name in names:
            (bindir / name).write_text("#!/bin/sh\n")
            (bindir / name).chmod(0o755)
    found = find_bindir(pg_config=str(tmp_path / "no-pg_config"), pattern=str(tmp_path / "*" / "bin"))
    assert found == str(tmp_path / "15" / "bin")


def test_find_bindir_says_what_to_install_when_nothing_is_there(tmp_path: Path) -> None:
    with pytest.raises(ServerBinariesNotFound, match="install the postgresql server package"):
        find_bindir(pg_config=str(tmp_path / "no-pg_config"), pattern=str(tmp_path / "*" / "bin"))


def test_the_cluster_lives_on_a_tmpfs_with_room_and_elsewhere_otherwise(pg_cluster: ThrowawayCluster, tmp_path: Path):
    with small_filesystem(8 << 20) as tmpfs:
        assert memory_folder(str(tmpfs), min_free=4 << 20) == str(tmpfs)
        assert memory_folder(str(tmpfs), min_free=16 << 20) is None  # too little room
    assert memory_folder(str(tmp_path)) is None  # not a tmpfs mount
    in_memory = memory_folder()
    assert (os.path.dirname(pg_cluster.host) == in_memory) if in_memory else pg_cluster.host.startswith("/")
    with closing(pg_cluster.connect("postgres")) as conn:
        assert _one(conn, "SHOW max_wal_size") == ("256MB" if in_memory else "1GB")
