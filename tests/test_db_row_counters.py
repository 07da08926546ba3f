"""Every database backup records PostgreSQL's row counters; a dump restore first says, per table, how many
rows were written since the backup (what the restore throws away), or that the figure is unknown."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import database_state, run_script
from test_database_rollback import DbWorkspace

from database.row_counters import COUNTERS_FILE, RowCounters, TableCounters, writes_since

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers(id), total numeric(10,2));
CREATE TABLE untouched (id int PRIMARY KEY);
INSERT INTO customers (name) SELECT 'customer ' || i FROM generate_series(1, 50) i;
INSERT INTO orders (customer_id, total) SELECT 1 + i % 50, i FROM generate_series(1, 400) i;
INSERT INTO untouched SELECT generate_series(1, 10);
"""

# Committed, then flushed to the server's counters before the statement returns (PostgreSQL 15+ flushes a
# session's counters when it goes idle, at most once a second, unless told to now).
WRITES_SINCE_BACKUP = """
INSERT INTO customers (name) SELECT 'late ' || i FROM generate_series(1, 7) i;
UPDATE orders SET total = total + 1 WHERE id <= 30;
DELETE FROM orders WHERE id > 390;
CREATE TABLE signups (id int);
INSERT INTO signups SELECT generate_series(1, 4);
SELECT pg_stat_force_next_flush();
"""


@pytest.fixture
def dbw(pg_db, tmp_path: Path) -> DbWorkspace:
    workspace = DbWorkspace(pg_db, tmp_path)
    workspace.sql(SCHEMA + "SELECT pg_stat_force_next_flush();")
    return workspace


def backed_up(dbw: DbWorkspace) -> str:
    done = dbw.run("backup", "--label", "before-release")
    assert done.returncode == 0, done.stderr
    return dbw.backup_ids()[0]


def test_a_backup_keeps_every_tables_counters_in_a_checksummed_file(dbw: DbWorkspace):
    backup_id = backed_up(dbw)
    manifest = json.loads((dbw.store / backup_id / "manifest.json").read_text())
    assert COUNTERS_FILE in {entry["path"] for entry in manifest["entries"] if entry.get("sha256")}
    recorded = RowCounters.load((dbw.store / backup_id / COUNTERS_FILE).read_bytes())
    by_name = {table.name: table for table in recorded.tables}
    assert (by_name["public.customers"].inserted, by_name["public.orders"].live_rows) == (50, 400)
    assert dbw.run("verify", backup_id).returncode == 0


def test_the_restore_report_names_each_table_written_since_the_backup_largest_first(dbw: DbWorkspace):
    backed_up(dbw)
    dbw.sql(WRITES_SINCE_BACKUP)
    planned = dbw.run("--json", "restore", "latest", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)["writes_since_backup"]
    assert report["known"] and report["total"] == 7 + 30 + 10 + 4 and not report["lower_bound"]
    assert [(t["name"], t["inserted"], t["updated"], t["deleted"]) for t in report["tables"]] == [
        ("public.orders", 0, 30, 10), ("public.customers", 7, 0, 0), ("public.signups", 4, 0, 0)]
    assert report["unchanged_tables"] == 1  # untouched
    assert report["tables"][2]["note"] == "created since the backup"


def test_without_a_terminal_and_without_yes_the_report_is_shown_and_nothing_changes(dbw: DbWorkspace):
    backed_up(dbw)
    dbw.sql(WRITES_SINCE_BACKUP)
    before = database_state(dbw.pg_db)
    refused = dbw.run("restore", "latest")
    assert refused.returncode == 2
    assert ("writes to " + dbw.pg_db.name + " since the backup, lost by a dump restore: 51 rows in 3 tables"
            in refused.stderr)
    assert "  public.orders: 0 inserted, 30 updated, 10 deleted" in refused.stderr
    assert refused.stderr.index("public.orders") < refused.stderr.index("needs confirmation")
    assert database_state(dbw.pg_db) == before


def test_a_restore_with_yes_reports_what_it_replaced_and_a_later_one_cannot_compare(dbw: DbWorkspace):
    backup_id = backed_up(dbw)
    dbw.sql(WRITES_SINCE_BACKUP)
    done = dbw.run("restore", backup_id, "--yes")
    assert done.returncode == 0, done.stderr
    assert "51 rows in 3 tables" in done.stdout
    # The restored database is another database: its counters began with the restore itself.
    again = dbw.run("--json", "restore", backup_id, "--dry-run")
    report = json.loads(again.stdout)["writes_since_backup"]
    assert not report["known"] and "replaced since the backup" in report["reason"]


def test_after_a_statistics_reset_the_figure_is_unknown_not_guessed(dbw: DbWorkspace):
    backed_up(dbw)
    dbw.sql(WRITES_SINCE_BACKUP + "SELECT pg_stat_reset();")
    planned = dbw.run("restore", "latest", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "since the backup: unknown (the server's statistics were reset at " in planned.stdout


def test_a_dump_made_elsewhere_has_no_counters_to_compare(dbw: DbWorkspace, tmp_path: Path):
    dump = tmp_path / "elsewhere.dump"
    env = {**os.environ, "PGHOST": dbw.env["DB_HOST"], "PGPORT": dbw.env["DB_PORT"], "PGUSER": dbw.env["DB_USER"],
           "PGPASSWORD": dbw.env["DB_PASSWORD"]}
    subprocess.run(["pg_dump", "-Fc", "-f", str(dump), dbw.pg_db.name], env=env, check=True)
    planned = run_script("database_rollback.py", "--json", "restore", str(dump), "--dry-run", env=dbw.env,
                         cwd=dbw.root)
    report = json.loads(planned.stdout)["writes_since_backup"]
    assert not report["known"] and "recorded no row counters" in report["reason"]


def _table(relid: int, name: str, inserted: int, updated: int = 0, deleted: int = 0, live: int = 0) -> TableCounters:
    return TableCounters(relid, "public", name, inserted, updated, deleted, live)


def test_counters_that_went_down_or_a_dropped_table_are_unknown_and_the_total_a_lower_bound():
    then = RowCounters(1, None, "t0", [_table(10, "a", 100, live=100), _table(11, "b", 5, live=5),
                                       _table(12, "c", 9, live=9)])
    now = RowCounters(1, None, "t1", [_table(10, "a", 120, 3, 1, live=119), _table(11, "b", 2, live=2)])
    report = writes_since("app", then, now)
    assert [(t.name, t.inserted) for t in report.tables] == [("public.a", 20), ("public.b", None),
                                                            ("public.c", None)]
    assert report.total == 24 and report.partly_unknown
    assert report.lines()[0] == ("writes to app since the backup, lost by a dump restore: at least 24 rows in "
                                 "3 tables")
    assert report.tables[2].note == "dropped since the backup, then 9 rows"


def test_a_restart_or_counting_turned_off_makes_the_figure_unknown_and_a_time_zone_does_not():
    then = RowCounters(1, "2026-11-01T10:00:00+00:00", "t0", [_table(10, "a", 100)], True,
                       "2026-11-01T09:00:00+00:00")
    later = [_table(10, "a", 130)]
    # The same moments printed by a session in another time zone: nothing was reset, nothing restarted.
    same = RowCounters(1, "2026-11-01T11:00:00+01:00", "t1", later, True, "2026-11-01T10:00:00+01:00")
    assert writes_since("app", then, same).total == 30
    restarted = RowCounters(1, "2026-11-01T10:00:00+00:00", "t1", later, True, "2026-11-02T08:00:00+00:00")
    reason = writes_since("app", then, restarted).unknown_reason
    assert reason.startswith("the server was restarted at 2026-11-02T08:00:00+00:00, after the backup")
    not_counting = RowCounters(1, "2026-11-01T10:00:00+00:00", "t1", later, False, "2026-11-01T09:00:00+00:00")
    assert writes_since("app", then, not_counting).unknown_reason == (
        "track_counts is off on the server: PostgreSQL counts no rows")
