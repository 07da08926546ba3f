"""A restore on disks too small for it: refused before anything is built, with the figures; a disk that fills
anyway names its first cause and the half-built database goes. Real small filesystems (tmpfs) hold a
tablespace, or the pg_wal of a throwaway cluster of the test's own."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import database_state, script_argv, writer_once_read
from pg_cluster import Database, ThrowawayCluster
from small_fs import fill, free_bytes, small_filesystem
from test_database_rollback import RICH_SCHEMA, DbWorkspace

MIB = 1024 * 1024


def big_table(rows: int) -> str:
    """SQL that makes a table of about 130 bytes a row."""
    return f"CREATE TABLE big AS SELECT i, repeat('x', 100) AS pad FROM generate_series(1, {rows}) i"


@pytest.fixture
def dbw(pg_db, tmp_path: Path) -> DbWorkspace:
    workspace = DbWorkspace(pg_db, tmp_path)
    workspace.sql(RICH_SCHEMA)
    return workspace


def scratch_databases(dbw: DbWorkspace) -> set[str]:
    return {name for name in dbw.databases() if "__restore_" in name or "__before_" in name}


@pytest.fixture
def small_tablespace(dbw: DbWorkspace) -> Iterator[Path]:
    """The live database moved into a tablespace on a 64 MiB filesystem; moved back and dropped afterwards."""
    name = "small_" + secrets.token_hex(4)
    with small_filesystem(64 * MIB) as mountpoint:
        folder = mountpoint / "tablespace"
        folder.mkdir()
        os.chown(folder, mountpoint.stat().st_uid, mountpoint.stat().st_gid)
        dbw.sql(f"CREATE TABLESPACE {name} LOCATION '{folder}'", dbname="postgres")
        dbw.sql(f'ALTER DATABASE "{dbw.pg_db.name}" SET TABLESPACE {name}', dbname="postgres")
        try:
            yield mountpoint
        finally:
            for database in scratch_databases(dbw):
                dbw.pg_db.cluster.drop_database(database)
            dbw.sql(f'ALTER DATABASE "{dbw.pg_db.name}" SET TABLESPACE pg_default', dbname="postgres")
            dbw.sql(f"DROP TABLESPACE {name}", dbname="postgres")


@pytest.mark.parametrize("mode", [[], ["--in-place"], ["--dry-run"]])
def test_a_restore_that_would_fill_the_tablespaces_disk_is_refused_with_the_figures(
        dbw: DbWorkspace, small_tablespace: Path, mode: list[str]):
    assert dbw.run("backup").returncode == 0
    fill(small_tablespace, leave=4 * MIB)  # the application's other data: a copy of the database no longer fits
    state, databases, backups = database_state(dbw.pg_db), dbw.databases(), dbw.backup_ids()

    result = dbw.run("restore", "latest", "--yes", *mode)
    assert result.returncode == 1
    message = result.stderr
    assert "not enough free space for this restore, nothing was changed" in message
    # About the 4 MiB left (the server may have written a little since), and the figure needed.
    assert re.search(rf"{small_tablespace}/tablespace: [34]\.\d MiB free, \d+\.\d MiB needed", message), message
    assert "for the restored database (the database's size when the backup was taken)" in message
    in_place = mode == ["--in-place"]
    assert ("a swap restore (without --in-place) needs as much" if in_place else "--in-place needs no less") in message
    assert database_state(dbw.pg_db) == state
    assert dbw.databases() == databases
    assert dbw.backup_ids() == backups  # not even the in-place restore's safety backup


@pytest.fixture
def small_wal_cluster() -> Iterator[tuple[ThrowawayCluster, Path]]:
    """A cluster of its own whose pg_wal is a symlink to a 24 MiB filesystem, in 1 MiB segments.

    After a crash it stays down, as a server whose recovery found no space does, rather than racing the test."""
    with small_filesystem(24 * MIB) as mountpoint:
        wal = mountpoint / "wal"
        cluster = ThrowawayCluster(wal_dir=str(wal), wal_segment_mb=1,
                                   settings={"min_wal_size": "2MB", "max_wal_size": "32MB",
                                             "restart_after_crash": "off"})
        cluster.start()
        try:
            yield cluster, wal
        finally:
            cluster.stop()


def big_dump(pg_db: Database, folder: Path, rows: int | None = None) -> Path:
    """A directory-format dump, uncompressed, of `pg_db`, after adding a table of `rows` rows to it."""
    if rows is not None:
        conn = pg_db.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(big_table(rows))
        conn.close()
    dump = folder / "big.dir"
    env = {**os.environ, "PGHOST": pg_db.env["DB_HOST"], "PGPORT": pg_db.env["DB_PORT"], "PGUSER": "postgres"}
    subprocess.run(["pg_dump", "-Fd", "-Z0", "-f", str(dump), pg_db.name], env=env, check=True)
    return dump


def test_a_restore_whose_wal_would_not_fit_is_refused_naming_where_pg_wal_is(
        pg_db: Database, tmp_path: Path, small_wal_cluster: tuple[ThrowawayCluster, Path]):
    cluster, wal = small_wal_cluster
    dump = big_dump(pg_db, tmp_path, rows=200000)  # 26 MiB: as much WAL to write
    live = DbWorkspace(cluster.create_database("live"), tmp_path)
    live.sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
    state, databases = database_state(live.pg_db), live.databases()

    result = live.run("restore", str(dump), "--yes")
    assert result.returncode == 1
    assert "not enough free space for this restore, nothing was changed" in result.stderr
    assert f"{wal}: " in result.stderr  # where the pg_wal symlink leads, not the data directory
    assert "of WAL (as much as it writes, up to max_wal_size)" in result.stderr
    assert database_state(live.pg_db) == state
    assert live.databases() == databases


def fifo_dump(dump: Path) -> tuple[Path, bytes]:
    """Turn the biggest table data file of a directory-format dump into a fifo; it and its content."""
    big = max(dump.glob("[0-9]*.dat"), key=lambda path: path.stat().st_size)
    content = big.read_bytes()
    big.unlink()
    os.mkfifo(big)
    return big, content


def feed_after_filling(proc: subprocess.Popen, fifo: tuple[Path, bytes], full: Path) -> Path:
    """Once pg_restore reads the big table's data, fill the filesystem `full`, then give it the data."""
    writer = writer_once_read(fifo[0], proc)
    filler = fill(full)
    os.set_blocking(writer, True)
    try:
        os.write(writer, fifo[1])
    except BrokenPipeError:
        pass  # pg_restore gave up part-way: the point of the test
    finally:
        os.close(writer)
    return filler


@pytest.mark.parametrize("mode", [[], ["--in-place"]])
def test_a_disk_that_fills_mid_restore_is_named_and_the_half_built_database_dropped(
        dbw: DbWorkspace, small_tablespace: Path, mode: list[str]):
    dump = big_dump(dbw.pg_db, dbw.root, rows=50000)
    state, databases = database_state(dbw.pg_db), dbw.databases()
    contents = fifo_dump(dump)

    proc = subprocess.Popen(script_argv("database_rollback.py", "restore", str(dump), "--yes", *mode), cwd=dbw.root,
                            env={**os.environ, **dbw.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filler = feed_after_filling(proc, contents, small_tablespace)
    _, stderr = proc.communicate(timeout=120)
    filler.unlink()
    assert proc.returncode == 1
    assert "No space left on device" in stderr
    assert re.search(rf"\({small_tablespace}/tablespace \([0-9.]+ [KM]?i?B free\) is on a full filesystem\)", stderr)

    assert database_state(dbw.pg_db) == state
    assert dbw.databases() == databases  # the half-built database was dropped


def test_a_server_stopped_by_a_full_pg_wal_is_named_and_cleanup_drops_what_was_left(
        pg_db: Database, tmp_path: Path, small_wal_cluster: tuple[ThrowawayCluster, Path]):
    cluster, wal = small_wal_cluster
    dump = big_dump(pg_db, tmp_path, rows=200000)
    contents = fifo_dump(dump)
    live = DbWorkspace(cluster.create_database("live"), tmp_path)
    live.sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
    state, databases = database_state(live.pg_db), live.databases()

    proc = subprocess.Popen(script_argv("database_rollback.py", "restore", str(dump), "--yes"), cwd=tmp_path,
                            env={**os.environ, **live.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filler = feed_after_filling(proc, contents, wal)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1
    # The first cause comes first: pg_restore lost the server, whose pg_wal is full; not the clean-up's error.
    assert stderr.split("error: ", 1)[1].startswith("pg_restore into live__restore_")
    assert f"{wal} (0 B free) is on a full filesystem" in stderr
    assert "then the half-built database live__restore_" in stderr and "cleanup` drops it" in stderr

    filler.unlink()  # the operator frees the disk and starts the server: nothing was lost, cleanup tidies up
    cluster.restart()
    assert free_bytes(wal) > 0
    cleaned = live.run("--json", "cleanup", "30")
    assert cleaned.returncode == 0, cleaned.stderr
    assert [name.startswith("live__restore_") for name in json.loads(cleaned.stdout)["dropped_databases"]] == [True]
    assert database_state(live.pg_db) == state
    assert live.databases() == databases


def test_without_the_privileges_to_look_the_restore_says_it_could_not_check_and_goes_on(pg_cluster, tmp_path: Path):
    owner = "owner_" + secrets.token_hex(4)
    name = owner + "_db"
    admin = pg_cluster.connect("postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {owner} LOGIN CREATEDB")
        cur.execute(f"CREATE DATABASE {name} OWNER {owner}")
    try:
        live = DbWorkspace(Database(name, pg_cluster), tmp_path)
        live.env["DB_USER"] = owner  # the database's owner, not a superuser: the swap is allowed, the check not
        conn = pg_cluster.connect(name, user=owner)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'kept')")
        conn.close()
        state = database_state(live.pg_db)
        assert live.run("backup").returncode == 0

        result = live.run("restore", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert (f"warning: free space not checked: {owner} may not read the server's data_directory (a superuser "
                "or a member of pg_read_all_settings may)") in result.stderr
        assert database_state(live.pg_db) == state
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",))
            for (database,) in cur.fetchall():
                cur.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            cur.execute(f"DROP ROLE {owner}")
        admin.close()


def test_a_backup_folder_that_fills_up_is_named(dbw: DbWorkspace):
    with small_filesystem(32 * 1024, owner="root") as mountpoint:
        dbw.env["BACKUP_DIR"] = str(mountpoint / "backups")
        result = dbw.run("backup")
        assert result.returncode == 1
        assert "No space left on device" in result.stderr
        assert f"(the backup folder {mountpoint}/backups (BACKUP_DIR) is on a full filesystem)" in result.stderr
        assert dbw.backup_ids() == []
