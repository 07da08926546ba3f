"""rollback.py restore puts the database back with the down migrations, keeping every row written since the
point; the dump is restored only with --restore-data or when no migration leads back, after a report of the
rows it throws away."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import database_state, run_script
from point_system import System, take_point

UP_COUPONS = "CREATE TABLE coupons (code text PRIMARY KEY, percent int NOT NULL);\n"
DOWN_COUPONS = "DROP TABLE coupons;\n"
UP_DISCOUNT = "ALTER TABLE orders ADD COLUMN discount numeric NOT NULL DEFAULT 0;\n"
DOWN_DISCOUNT = "ALTER TABLE orders DROP COLUMN discount;\n"

WRITES_SINCE_POINT = """
INSERT INTO customers (name) SELECT 'signed up after the point ' || i FROM generate_series(1, 6) i;
UPDATE orders SET total = total * 2 WHERE id <= 25;
DELETE FROM orders WHERE id > 290;
SELECT pg_stat_force_next_flush();
"""


@pytest.fixture
def system(tmp_path: Path, pg_db) -> System:
    system = System(tmp_path, pg_db)
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_coupons.up.sql").write_text(UP_COUPONS)
    (migrations / "001_coupons.down.sql").write_text(DOWN_COUPONS)
    system.env["MIGRATIONS_DIR"] = str(migrations)
    assert db_script(system, "migrate").returncode == 0
    return system


def settled(system: System) -> System:
    """Wait until every other session on the database has ended: PostgreSQL adds a session's row counts to
    the counters when it ends (or goes idle a while), so only then do they include its writes."""
    others = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
              "AND pid <> pg_backend_pid()")
    deadline = time.monotonic() + 30
    while sql(system, others) != [(0,)]:
        assert time.monotonic() < deadline, "sessions still open after 30 s"
        time.sleep(0.01)
    return system


def db_script(system: System, *args: str):
    return run_script("database_rollback.py", *args, env=system.env, cwd=system.root)


def sql(system: System, statement: str) -> list:
    return system.pg_db.cluster.query(system.pg_db.name, statement)


def rows(system: System) -> dict:
    return {"customers": sql(system, "SELECT id, name FROM customers ORDER BY id"),
            "orders": sql(system, "SELECT id, customer_id, total FROM orders ORDER BY id")}


def release_with_a_migration(system: System) -> None:
    """What a deploy does after the point: the application writes, and a new migration is applied."""
    migrations = Path(system.env["MIGRATIONS_DIR"])
    (migrations / "002_discount.up.sql").write_text(UP_DISCOUNT)
    (migrations / "002_discount.down.sql").write_text(DOWN_DISCOUNT)
    sql(system, WRITES_SINCE_POINT)
    assert db_script(system, "migrate", "--no-backup").returncode == 0
    settled(system)


def test_restore_rolls_the_schema_back_and_keeps_every_row_written_since_the_point(system: System):
    take_point(settled(system))
    release_with_a_migration(system)
    written = rows(system)
    done = system.run("--json", "restore", "latest", "--yes")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["database_plan"]["action"] == "schema rollback"
    assert report["database_plan"]["undone"] == ["002_discount"]
    assert rows(system) == written  # the 6 sign-ups, the 25 updates and the 10 deletes are all still there
    columns = sql(system, "SELECT column_name FROM information_schema.columns WHERE table_name = 'orders'")
    assert {name for (name,) in columns} == {"id", "customer_id", "total"}
    assert sql(system, "SELECT version FROM public.schema_migrations") == [(1,)]
    # Its undo migrates up again, which keeps the rows too.
    assert [line for line in report["undo"] if "migrate 002_discount" in line]


def test_dry_run_says_which_way_the_database_goes_back_and_why(system: System):
    take_point(settled(system))
    release_with_a_migration(system)
    before = database_state(system.pg_db)
    planned = system.run("restore", "latest", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert ("database: roll the schema back from 002_discount to 001_coupons with the down migrations of "
            "002_discount; every row written since the point is kept" in planned.stdout)
    assert "would roll back" in planned.stdout or "roll back 1 migration" in planned.stdout
    forced = system.run("restore", "latest", "--dry-run", "--restore-data")
    assert "database: restore the dump of" in forced.stdout and "(--restore-data)" in forced.stdout
    assert "lost by a dump restore: 42 rows in 3 tables" in forced.stdout
    assert database_state(system.pg_db) == before


def test_restore_data_reports_the_rows_it_loses_before_anything_changes(system: System):
    take_point(settled(system))
    release_with_a_migration(system)
    before = database_state(system.pg_db)
    refused = system.run("restore", "latest", "--restore-data")  # no terminal, no --yes
    assert refused.returncode == 2
    assert "  public.orders: 0 inserted, 25 updated, 10 deleted" in refused.stderr
    assert "  public.customers: 6 inserted, 0 updated, 0 deleted" in refused.stderr
    assert database_state(system.pg_db) == before
    done = system.run("--json", "restore", "latest", "--restore-data", "--yes")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["database_plan"]["writes_since_backup"]["total"] == 42
    assert sql(system, "SELECT count(*) FROM customers") == [(50,)]  # the sign-ups since the point are gone


def test_without_a_down_file_the_dump_is_restored_after_the_report(system: System):
    take_point(settled(system))
    release_with_a_migration(system)
    (Path(system.env["MIGRATIONS_DIR"]) / "002_discount.down.sql").unlink()
    planned = system.run("--json", "restore", "latest", "--dry-run")
    plan = json.loads(planned.stdout)["database_plan"]
    assert plan["action"] == "dump restore" and "no down file for 002_discount" in plan["reason"]
    assert plan["writes_since_backup"]["total"] == 42


def test_a_database_left_dirty_by_a_half_run_migration_is_restored_from_its_dump(system: System):
    take_point(settled(system))
    release_with_a_migration(system)
    sql(system, "UPDATE public.schema_migrations SET dirty = true WHERE version = 2")
    planned = system.run("--json", "restore", "latest", "--dry-run")
    plan = json.loads(planned.stdout)["database_plan"]
    assert plan["action"] == "dump restore" and "is dirty at 002_discount" in plan["reason"]


def test_after_restore_data_changes_lists_the_rows_written_since_and_its_sql_brings_them_back(system: System):
    take_point(settled(system))
    release_with_a_migration(system)
    written = rows(system)
    done = system.run("--json", "restore", "latest", "--restore-data", "--yes")
    assert done.returncode == 0, done.stderr
    kept = json.loads(done.stdout)["steps"][-1]["restore"]["previous_database"]
    report = json.loads(db_script(system, "--json", "changes", kept).stdout)
    found = {table: {kind: sorted(int(row["id"] if kind != "differ" else row["key"]["id"]) for row in listed)
                     for kind, listed in report["rows"][table].items()}
             for table in ("public.customers", "public.orders")}
    assert found == {"public.customers": {"only_in_kept": list(range(51, 57)), "only_in_live": [], "differ": []},
                     "public.orders": {"only_in_kept": [], "only_in_live": list(range(291, 301)),
                                       "differ": list(range(1, 26))}}
    script = db_script(system, "changes", kept, "--sql").stdout
    # The DELETEs of the rows deleted since come commented out: the operator decides; here they are wanted.
    applied = subprocess.run(["psql", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-d", system.pg_db.name, "-f", "-"],
                             input=script.replace("\n-- DELETE FROM", "\nDELETE FROM"), capture_output=True,
                             text=True, env={**os.environ, **psql_env(system)})
    assert applied.returncode == 0, applied.stderr
    assert rows(system) == written  # every row written since the point is back, row for row


def psql_env(system: System) -> dict[str, str]:
    cluster = system.pg_db.cluster
    return {"PGHOST": cluster.host, "PGPORT": str(cluster.port), "PGUSER": cluster.user,
            "PGPASSWORD": cluster.password}


def test_a_tracking_table_of_another_tool_leaves_the_dump_as_the_way_back(system: System):
    take_point(settled(system))
    sql(system, "DROP TABLE public.schema_migrations; "
                "CREATE TABLE public.schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL)")
    planned = system.run("--json", "restore", "latest", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)["database_plan"]
    assert plan["action"] == "dump restore" and "made by another migration tool" in plan["reason"]
