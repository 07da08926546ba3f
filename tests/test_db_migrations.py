"""database.migrations, .migrate and .migration_rollback against the real throwaway cluster: migrate, plan and
run rollbacks, locks and drift."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg2
import pytest
from helpers import wait_until
from psycopg2 import sql

from common.errors import LockBusy, ToolkitError, UsageError
from common.settings import Settings
from database.migrate import MigrationFailed, migrate
from database.migration_rollback import MissingDownFile, RollbackFailed, plan_rollback, run_rollback
from database.migrations import applied, current_id, discover, find, status
from database.server import DbServer
from database.sessions import LOCK_KEY, blocking_report, terminate

# id -> (up SQL, down SQL); 006's down runs outside a transaction, the rest inside the rollback transaction.
MIGRATIONS: dict[str, tuple[str, str]] = {
    "001_customers": (
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');\n"
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, mood mood NOT NULL DEFAULT 'ok');",
        "DROP TABLE customers;\nDROP TYPE mood;",
    ),
    "002_orders": (
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers (id),\n"
        "                     total numeric(10, 2) NOT NULL);",
        "DROP TABLE orders;",
    ),
    "003_seed": (
        "INSERT INTO customers (name, mood) SELECT 'customer ' || i, (ARRAY['sad', 'ok', 'happy'])[1 + i % 3]::mood\n"
        "  FROM generate_series(1, 20) AS i;\n"
        "INSERT INTO orders (customer_id, total) SELECT 1 + i % 20, (i * 7) % 90 FROM generate_series(1, 100) AS i;",
        "DELETE FROM orders;\nDELETE FROM customers;",
    ),
    "004_orders_by_customer": (
        "CREATE INDEX orders_by_customer ON orders (customer_id);",
        "DROP INDEX orders_by_customer;",
    ),
    "005_big_orders_view": (
        "CREATE VIEW big_orders AS SELECT id, customer_id, total FROM orders WHERE total > 50;",
        "DROP VIEW big_orders;",
    ),
    "006_orders_by_total": (
        "CREATE INDEX orders_by_total ON orders (total);",
        "-- rollback: no-transaction\nDROP INDEX CONCURRENTLY orders_by_total;",
    ),
    "007_customer_total_function": (
        "CREATE FUNCTION customer_total(customer int) RETURNS numeric LANGUAGE sql STABLE\n"
        "  AS $$ SELECT coalesce(sum(total), 0) FROM orders WHERE customer_id = customer; $$;",
        "DROP FUNCTION customer_total(int);",
    ),
    "008_more_customers": (
        "INSERT INTO customers (name) SELECT 'extra ' || i FROM generate_series(1, 5) AS i;",
        "DELETE FROM customers WHERE name LIKE 'extra %';",
    ),
    "009_order_status": (
        "CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped');\n"
        "ALTER TABLE orders ADD COLUMN status order_status NOT NULL DEFAULT 'new';",
        "ALTER TABLE orders DROP COLUMN status;\nDROP TYPE order_status;",
    ),
    "010_order_audit": (
        "CREATE TABLE order_audit (order_id bigint, seen_at timestamptz DEFAULT now());\n"
        "CREATE FUNCTION log_order() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN INSERT INTO order_audit (order_id) VALUES (NEW.id); RETURN NEW; END $$;\n"
        "CREATE TRIGGER orders_audit AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION log_order();",
        "DROP TRIGGER orders_audit ON orders;\nDROP FUNCTION log_order();\nDROP TABLE order_audit;",
    ),
    "011_invoices": (
        "CREATE TABLE invoices (id serial PRIMARY KEY, order_id bigint REFERENCES orders (id), amount numeric);\n"
        "INSERT INTO invoices (order_id, amount) SELECT id, total * 1.2 FROM orders WHERE id % 3 = 0;",
        "DROP TABLE invoices;",
    ),
    "012_archive": (
        "CREATE TABLE archived_orders (LIKE orders INCLUDING DEFAULTS);\n"
        "INSERT INTO archived_orders SELECT * FROM orders WHERE id <= 10;\n"
        "CREATE VIEW archive_summary AS SELECT count(*) AS orders, sum(total) AS total FROM archived_orders;",
        "DROP VIEW archive_summary;\nDROP TABLE archived_orders;",
    ),
}
IDS = list(MIGRATIONS)


def write_migrations(folder: Path, migrations: dict[str, tuple[str, str]] = MIGRATIONS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for ident, (up, down) in migrations.items():
        (folder / f"{ident}.up.sql").write_text(up + "\n")
        if down is not None:
            (folder / f"{ident}.down.sql").write_text(down + "\n")
    return folder


def server_for(pg_db, lock_timeout: int = 10) -> DbServer:
    env = {**pg_db.env, "DB_LOCK_TIMEOUT": str(lock_timeout)}
    return DbServer.from_settings(Settings.load(None, environ=env))


def read_applied(server: DbServer):
    conn = server.connect()
    try:
        return applied(conn)
    finally:
        conn.close()


def snapshot(pg_db) -> dict:
    """The schema (columns, relations, indexes, views, functions, enums, triggers, constraints) and a digest
    of every table's rows, schema_migrations included; sequence positions are left out on purpose."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default "
                   "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        "relations": "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = 'public' ORDER BY 1",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
        "functions": "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p "
                     "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' ORDER BY 1",
        "enums": "SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_type t "
                 "JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY 1 ORDER BY 1",
        "triggers": "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                       "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
        "invalid_indexes": "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid",
    }
    conn = pg_db.connect()
    try:
        with conn.cursor() as cur:
            state = {}
            for key, query in queries.items():
                cur.execute(query)
                state[key] = cur.fetchall()
            cur.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1")
            for (table,) in cur.fetchall():
                cur.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                                    " FROM {} AS t").format(sql.Identifier(table)))
                state[f"rows:{table}"] = cur.fetchone()
    finally:
        conn.close()
    return state



def session_alive(pg_db, pid: int) -> bool:
    conn = pg_db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return cur.fetchone()[0] == 1
    finally:
        conn.close()


def hold_access_share(pg_db, table: str):
    """A session reading `table` in an open transaction (it keeps an ACCESS SHARE lock): (connection, pid)."""
    blocker = pg_db.connect(application_name="report-job")
    with blocker.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*), pg_backend_pid() FROM {}").format(sql.Identifier(table)))
        return blocker, cur.fetchone()[1]


@pytest.fixture
def migrated(pg_db, tmp_path):
    """All twelve migrations applied: (server, migrations folder)."""
    folder = write_migrations(tmp_path / "migrations")
    server = server_for(pg_db)
    assert migrate(server, discover(folder)) == IDS
    return server, folder


# -- discovery and references -----------------------------------------------------------------------


def test_discover_sorts_versions_as_numbers_and_reads_the_no_transaction_mark(tmp_path):
    folder = write_migrations(tmp_path, {"10_ten": ("SELECT 10;", "SELECT 10;"), "9_nine": ("SELECT 9;", None),
                                         "011_eleven": ("SELECT 11;", "-- rollback: no-transaction\nSELECT 1;")})
    (tmp_path / "README.md").write_text("not a migration")
    migrations = discover(folder)
    assert [(m.version, m.id) for m in migrations] == [(9, "9_nine"), (10, "10_ten"), (11, "011_eleven")]
    assert migrations[0].down is None and not migrations[1].down_no_transaction and migrations[2].down_no_transaction
    assert not any(m.up_no_transaction for m in migrations)
    assert len(migrations[0].up_sha256) == 64
    for ref in ("9", "009", "9_nine"):
        assert find(migrations, [], ref).id == "9_nine"
    assert find(migrations, [], "11").id == "011_eleven"


@pytest.mark.parametrize("names, named", [
    (["001-initial.up.sql"], "001-initial.up.sql"),
    (["initial.up.sql"], "initial.up.sql"),
    (["001_initial.sql"], "001_initial.sql"),
    (["001_a.up.sql", "1_b.up.sql"], "1_b.up.sql"),
    (["002_orders.down.sql"], "002_orders.down.sql"),
    (["002_orders.up.sql", "002_order.down.sql"], "002_order.down.sql"),
])
def test_malformed_duplicated_or_orphaned_files_are_usage_errors_naming_the_file(tmp_path, names, named):
    for name in names:
        (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(UsageError, match=named.replace(".", r"\.")):
        discover(tmp_path)


def test_a_missing_folder_names_migrations_dir(tmp_path):
    with pytest.raises(UsageError, match="MIGRATIONS_DIR"):
        discover(tmp_path / "nowhere")


def test_malformed_and_unknown_references_are_usage_errors(tmp_path):
    migrations = discover(write_migrations(tmp_path, MIGRATIONS))
    for ref in ("x1", "003-seed", "", "3_"):
        with pytest.raises(UsageError, match="not a migration id or version"):
            find(migrations, [], ref)
    for ref in ("003_nope", "99"):
        with pytest.raises(UsageError, match="known: 001_customers, 002_orders, 003_seed") as caught:
            find(migrations, [], ref)
        assert caught.value.exit_code == 2


# -- migrate ----------------------------------------------------------------------------------------


def test_migrate_all_records_every_migration_and_builds_the_schema(pg_db, migrated):
    server, folder = migrated
    migrations = discover(folder)
    rows = read_applied(server)
    assert [(r.version, r.name, r.sha256) for r in rows] == [(m.version, m.name, m.up_sha256) for m in migrations]
    assert all(r.duration_ms is not None and r.applied_at is not None for r in rows)
    assert current_id(rows) == "012_archive"
    state = snapshot(pg_db)
    assert ("big_orders", "v") in state["relations"] and ("archive_summary", "v") in state["relations"]
    assert {name for name, _ in state["indexes"]} >= {"orders_by_customer", "orders_by_total"}
    assert {name for name, _ in state["functions"]} == {"customer_total", "log_order"}
    assert state["enums"] == [("mood", ["sad", "ok", "happy"]), ("order_status", ["new", "paid", "shipped"])]
    assert [name for name, _ in state["triggers"]] == ["orders_audit"]
    assert state["rows:customers"][0] == 25 and state["rows:invoices"][0] == 33
    assert migrate(server, migrations) == []  # nothing pending: a no-op
    report = status(migrations, rows)
    assert (report["current"], report["pending"], report["drift"]) == ("012_archive", [], [])
    assert [entry["id"] for entry in report["applied"]] == IDS


def test_migrate_to_a_target_and_refuses_to_go_backwards(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path))
    assert read_applied(server) == []  # reading does not create the tracking table
    assert migrate(server, migrations, "003") == IDS[:3]
    assert migrate(server, migrations, "3") == []
    with pytest.raises(UsageError, match="rollback 002_orders"):
        migrate(server, migrations, "002_orders")
    assert status(migrations, read_applied(server))["pending"] == IDS[3:]


def test_a_failing_migration_is_rolled_back_and_earlier_ones_stay(pg_db, tmp_path):
    server = server_for(pg_db)
    folder = write_migrations(tmp_path, {
        "001_first": ("CREATE TABLE first (id int);", "DROP TABLE first;"),
        "002_broken": ("CREATE TABLE half (id int);\nCREATE TABLE broken (id int,);", "DROP TABLE broken;"),
        "003_third": ("CREATE TABLE third (id int);", "DROP TABLE third;"),
    })
    with pytest.raises(MigrationFailed, match=r"002_broken\.up\.sql, line 2: syntax error") as caught:
        migrate(server, discover(folder))
    assert caught.value.exit_code == 1 and caught.value.applied == ["001_first"]
    assert current_id(read_applied(server)) == "001_first"
    tables = [name for name, kind in snapshot(pg_db)["relations"] if kind == "r"]
    assert "first" in tables and "half" not in tables and "third" not in tables


def test_scripts_are_split_like_psql_and_errors_name_their_line(pg_db, tmp_path):
    tricky = (
        "/* a /* nested */ comment; */\n"
        "CREATE TABLE notes (body text);  -- a comment; with a semicolon\n"
        "INSERT INTO notes VALUES ('it''s; fine'), (E'esc\\'; aped'), ($tag$dollar; quoted$tag$);\n"
        "CREATE FUNCTION note_kind(n int) RETURNS text LANGUAGE sql\n"
        "BEGIN ATOMIC\n"
        "  SELECT CASE WHEN n > 1 THEN 'many' ELSE 'one' END;\n"
        "END;\n"
        "DO $$ BEGIN INSERT INTO notes VALUES ('from a DO block;'); END $$;\n"
    )
    server = server_for(pg_db)
    folder = write_migrations(tmp_path, {"001_tricky": (tricky, "DROP FUNCTION note_kind(int);\nDROP TABLE notes;"),
                                         "002_broken": ("SELECT 1;\n\nDROP TABLE no_such_table;", "SELECT 1;")})
    with pytest.raises(MigrationFailed, match=r"002_broken\.up\.sql, line 3: table \"no_such_table\" does not exist"):
        migrate(server, discover(folder))
    conn = pg_db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT array_agg(body ORDER BY body), note_kind(2) FROM notes")
        assert cur.fetchone() == (["dollar; quoted", "esc'; aped", "from a DO block;", "it's; fine"], "many")
    conn.close()


def test_migrate_gives_up_on_a_lock_within_the_lock_timeout_naming_the_holder(pg_db, migrated):
    server, folder = migrated
    (folder / "013_rename.up.sql").write_text("ALTER TABLE archived_orders RENAME TO old_orders;\n")
    blocker, pid = hold_access_share(pg_db, "archived_orders")
    try:
        started = time.monotonic()
        with pytest.raises(MigrationFailed, match=rf"013_rename\.up\.sql, line 1: .*lock timeout.* pid {pid} "):
            migrate(server_for(pg_db, lock_timeout=1), discover(folder))
        assert time.monotonic() - started < 4
        assert current_id(read_applied(server)) == "012_archive"
    finally:
        blocker.close()


def test_a_changed_applied_file_is_reported_by_status_and_refused_by_migrate(pg_db, migrated, tmp_path):
    server, folder = migrated
    up = folder / "002_orders.up.sql"
    up.write_text(up.read_text() + "-- edited after it was applied\n")
    (folder / "013_new.up.sql").write_text("CREATE TABLE new_table (id int);\n")
    for direction in ("up", "down"):
        (folder / f"011_invoices.{direction}.sql").unlink()
    migrations = discover(folder)
    report = status(migrations, read_applied(server))
    assert report["drift"] == [
        {"id": "002_orders", "problem": "changed", "detail": "002_orders.up.sql changed since it was applied"},
        {"id": "011_invoices", "problem": "missing", "detail": "no 011_invoices.up.sql in MIGRATIONS_DIR"},
    ]
    assert report["pending"] == ["013_new"]
    before = snapshot(pg_db)
    with pytest.raises(ToolkitError, match=r"002_orders\.up\.sql changed since it was applied"):
        migrate(server, migrations)
    assert snapshot(pg_db) == before


def test_a_second_migrator_fails_at_once_naming_the_holder(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path))
    holder = pg_db.connect(application_name="other-migrator")
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s), pg_backend_pid()", (LOCK_KEY,))
            pid = cur.fetchone()[1]
        holder.commit()
        started = time.monotonic()
        with pytest.raises(LockBusy, match=rf"pid {pid} \(user postgres, application other-migrator"):
            migrate(server, migrations)
        assert time.monotonic() - started < 2
        assert read_applied(server) == []
    finally:
        holder.close()
    assert migrate(server, migrations, "001") == ["001_customers"]


# -- rollback ---------------------------------------------------------------------------------------


def test_rollback_by_id_and_by_version_restores_the_state_after_003(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path))
    migrate(server, migrations, "003_seed")
    after_003 = snapshot(pg_db)
    for ref in ("003_seed", "3"):
        migrate(server, migrations)
        plan = plan_rollback(migrations, read_applied(server), ref)
        assert [step.id for step in plan.steps] == IDS[:2:-1]
        assert (plan.current_id, plan.target_id) == ("012_archive", "003_seed")
        assert len(plan.warnings) == 1 and "006_orders_by_total.down.sql" in plan.warnings[0]
        rendered = plan.render()
        assert "DROP INDEX CONCURRENTLY orders_by_total" in rendered and "part 3, in one transaction" in rendered
        outcome = run_rollback(server, plan, lock_timeout=1, terminate_blockers=False)
        assert outcome.rolled_back == IDS[:2:-1] and outcome.terminated == []
        assert snapshot(pg_db) == after_003


def test_rolling_back_to_the_current_version_changes_nothing(pg_db, migrated):
    server, folder = migrated
    before = snapshot(pg_db)
    plan = plan_rollback(discover(folder), read_applied(server), "012")
    assert plan.steps == [] and "nothing to roll back" in plan.render()
    assert run_rollback(server, plan, lock_timeout=1, terminate_blockers=False).rolled_back == []
    assert snapshot(pg_db) == before


@pytest.mark.parametrize("ref", ["0", "000", None])
def test_rollback_to_0_or_all_undoes_every_migration(pg_db, migrated, ref):
    server, folder = migrated
    plan = plan_rollback(discover(folder), read_applied(server), ref)
    assert [step.id for step in plan.steps] == IDS[::-1]
    assert plan.target_id is None and "from 012_archive to no migration" in plan.render()
    outcome = run_rollback(server, plan, lock_timeout=1, terminate_blockers=False)
    assert outcome.rolled_back == IDS[::-1]
    assert read_applied(server) == []
    conn = pg_db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public' ORDER BY 1")
        assert [name for (name,) in cur.fetchall()] == ["schema_migrations", "schema_migrations_pkey"]
    conn.close()
    again = plan_rollback(discover(folder), read_applied(server), ref)
    assert again.steps == [] and again.render() == "already at no migration: nothing to roll back"


def test_rollback_0_names_a_migration_numbered_0_if_there_is_one(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path, {"000_base": ("CREATE TABLE base (x int);", "DROP TABLE base;"),
                                                      "001_more": ("CREATE TABLE more (x int);", "DROP TABLE more;")}))
    migrate(server, migrations)
    assert [step.id for step in plan_rollback(migrations, read_applied(server), "0").steps] == ["001_more"]
    assert [step.id for step in plan_rollback(migrations, read_applied(server), None).steps] == ["001_more",
                                                                                                  "000_base"]


def test_a_no_transaction_down_file_runs_on_its_own(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path))
    migrate(server, migrations, "006")
    plan = plan_rollback(migrations, read_applied(server), "005_big_orders_view")
    assert [(step.id, step.no_transaction) for step in plan.steps] == [("006_orders_by_total", True)]
    assert run_rollback(server, plan, lock_timeout=1, terminate_blockers=False).rolled_back == ["006_orders_by_total"]
    state = snapshot(pg_db)
    assert "orders_by_total" not in {name for name, _ in state["indexes"]} and state["invalid_indexes"] == []
    assert current_id(read_applied(server)) == "005_big_orders_view"


def test_a_down_file_failing_in_the_middle_leaves_schema_and_tracking_unchanged(pg_db, migrated):
    server, folder = migrated
    (folder / "010_order_audit.down.sql").write_text(
        "DROP TRIGGER orders_audit ON orders;\nDROP TABLE no_such_table;\nDROP TABLE order_audit;\n")
    before = snapshot(pg_db)
    plan = plan_rollback(discover(folder), read_applied(server), "007")
    assert [step.id for step in plan.steps] == IDS[11:6:-1]  # 012..008; 010 is the 3rd of 5
    with pytest.raises(RollbackFailed, match=r"010_order_audit\.down\.sql, line 2: table \"no_such_table\" does not"
                                             r" exist; it was rolled back, nothing changed") as caught:
        run_rollback(server, plan, lock_timeout=1, terminate_blockers=False)
    assert caught.value.exit_code == 1 and caught.value.rolled_back == []
    assert snapshot(pg_db) == before


def test_a_missing_down_file_is_refused_before_anything_changes(pg_db, migrated):
    server, folder = migrated
    (folder / "011_invoices.down.sql").unlink()
    before = snapshot(pg_db)
    with pytest.raises(MissingDownFile, match="no down file for 011_invoices") as caught:
        plan_rollback(discover(folder), read_applied(server), "003_seed")
    assert caught.value.exit_code == 1 and caught.value.versions == [11]
    assert snapshot(pg_db) == before


def test_a_down_file_with_its_own_commit_is_refused(pg_db, migrated):
    server, folder = migrated
    (folder / "012_archive.down.sql").write_text("BEGIN;\nDROP VIEW archive_summary;\nCOMMIT;\n")
    with pytest.raises(UsageError, match=r"012_archive\.down\.sql, line 1: BEGIN"):
        plan_rollback(discover(folder), read_applied(server), "011")


def test_rollback_refuses_unapplied_or_unknown_targets(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path))
    migrate(server, migrations, "003")
    with pytest.raises(UsageError, match="005_big_orders_view is not applied"):
        plan_rollback(migrations, read_applied(server), "5")
    with pytest.raises(UsageError, match="known:"):
        plan_rollback(migrations, read_applied(server), "042_nothing")


def test_a_lock_holder_makes_rollback_give_up_within_the_timeout_naming_it(pg_db, migrated):
    server, folder = migrated
    blocker, pid = hold_access_share(pg_db, "archived_orders")
    try:
        before = snapshot(pg_db)
        plan = plan_rollback(discover(folder), read_applied(server), "007")
        started = time.monotonic()
        with pytest.raises(RollbackFailed) as caught:
            run_rollback(server, plan, lock_timeout=1, terminate_blockers=False)
        elapsed = time.monotonic() - started
        message = str(caught.value)
        assert 0.9 < elapsed < 4, elapsed
        assert f"pid {pid} (user postgres, application report-job, idle in transaction since" in message
        assert "query: SELECT count(*), pg_backend_pid() FROM \"archived_orders\"" in message
        assert "nothing changed" in message and "--terminate-blockers" in message
        assert [b["pid"] for b in caught.value.blockers] == [pid]
        assert snapshot(pg_db) == before
        assert session_alive(pg_db, pid)
    finally:
        blocker.close()


def test_terminate_blockers_ends_the_holder_and_rolls_back(pg_db, migrated):
    server, folder = migrated
    blocker, pid = hold_access_share(pg_db, "archived_orders")
    try:
        plan = plan_rollback(discover(folder), read_applied(server), "007")
        outcome = run_rollback(server, plan, lock_timeout=1, terminate_blockers=True)
        assert outcome.rolled_back == IDS[11:6:-1]
        assert [session["pid"] for session in outcome.terminated] == [pid]
        assert current_id(read_applied(server)) == "007_customer_total_function"
        assert not session_alive(pg_db, pid)
        with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)), blocker.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        blocker.close()


def test_a_second_rollback_fails_at_once_while_a_migrator_holds_the_lock(pg_db, migrated):
    server, folder = migrated
    holder = pg_db.connect()
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s), pg_backend_pid()", (LOCK_KEY,))
            pid = cur.fetchone()[1]
        holder.commit()
        plan = plan_rollback(discover(folder), read_applied(server), "011")
        with pytest.raises(LockBusy, match=f"pid {pid}"):
            run_rollback(server, plan, lock_timeout=1, terminate_blockers=False)
    finally:
        holder.close()
    assert current_id(read_applied(server)) == "012_archive"


def test_a_plan_made_before_another_migrate_is_refused(pg_db, tmp_path):
    server = server_for(pg_db)
    migrations = discover(write_migrations(tmp_path))
    migrate(server, migrations, "004")
    plan = plan_rollback(migrations, read_applied(server), "002")
    migrate(server, migrations, "005")
    with pytest.raises(ToolkitError, match="changed since the plan was made"):
        run_rollback(server, plan, lock_timeout=1, terminate_blockers=False)
    assert current_id(read_applied(server)) == "005_big_orders_view"


# -- the locks command ------------------------------------------------------------------------------


def test_blocking_report_names_blocked_and_blocking_sessions_and_terminate_frees_them(pg_db, migrated):
    blocker, blocker_pid = hold_access_share(pg_db, "customers")
    waiter = pg_db.connect(application_name="ddl-job")
    with waiter.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        waiter_pid = cur.fetchone()[0]
    outcome: dict[str, object] = {}

    def take_exclusive_lock() -> None:
        try:
            with waiter.cursor() as cur:
                cur.execute("SET lock_timeout = '10s'; LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
            waiter.commit()
            outcome["locked"] = True
        except psycopg2.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=take_exclusive_lock)
    thread.start()
    observer = pg_db.connect()
    observer.autocommit = True
    try:
        report = wait_until(lambda: [s for s in blocking_report(observer, pg_db.name) if s["blocked_by"]])
        assert [(s["pid"], s["application"], s["blocked_by"]) for s in report] == [
            (waiter_pid, "ddl-job", [blocker_pid])]
        sessions = {s["pid"]: s for s in blocking_report(observer, pg_db.name)}
        assert sessions[blocker_pid]["blocking"] == [waiter_pid]
        assert sessions[blocker_pid]["state"] == "idle in transaction" and sessions[blocker_pid]["since"]
        assert terminate(observer, blocker_pid) is True
        thread.join(10)
        assert outcome == {"locked": True}
        assert terminate(observer, 999999) is False
    finally:
        thread.join(10)
        for conn in (observer, waiter, blocker):
            conn.close()
