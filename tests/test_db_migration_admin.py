"""Migrations real schemas need, through database_rollback.py run as a real process against the throwaway
cluster: no-transaction up files and their dirty mark, force, baseline, repair, --sql scripts run by psql,
and out-of-order files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import database_state, run_script, wait_until

NO_TX = "-- rollback: no-transaction\n"

# id -> (up, down). 003 builds its index concurrently and vacuums: neither may run in a transaction block.
# 004's last statement has no semicolon, which the toolkit runs as it is and the --sql script must terminate.
FILES: dict[str, tuple[str, str | None]] = {
    "001_customers": ("CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);\n"
                      "INSERT INTO customers (name) SELECT 'customer ' || i FROM generate_series(1, 50) AS i;",
                      "DROP TABLE customers;"),
    "002_orders": ("CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,\n"
                   "                     total numeric(10, 2) NOT NULL);\n"
                   "INSERT INTO orders (customer_id, total) SELECT 1 + i % 50, i FROM generate_series(1, 300) AS i;",
                   "DROP TABLE orders;"),
    "003_orders_by_customer": (NO_TX + "CREATE INDEX CONCURRENTLY orders_by_customer ON orders (customer_id);\n"
                               "VACUUM (ANALYZE) orders;",
                               NO_TX + "DROP INDEX CONCURRENTLY orders_by_customer;"),
    "004_mood": ("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');\n"
                 "ALTER TABLE customers ADD COLUMN mood mood NOT NULL DEFAULT 'ok'  -- no semicolon",
                 "ALTER TABLE customers DROP COLUMN mood;\nDROP TYPE mood;"),
}


class Workspace:
    """The database script's settings for one database, a migrations folder and a store in a temporary folder."""

    def __init__(self, database, root: Path):
        self.db = database
        self.root = root
        self.migrations = root / "migrations"
        self.migrations.mkdir(parents=True, exist_ok=True)
        self.env = {**database.env, "BACKUP_DIR": str(root / "backups"), "MIGRATIONS_DIR": str(self.migrations)}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return run_script("database_rollback.py", *args, env=self.env, cwd=self.root)

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return result

    def write(self, files: dict[str, tuple[str, str | None]]) -> None:
        for ident, (up, down) in files.items():
            (self.migrations / f"{ident}.up.sql").write_text(up + "\n")
            if down is not None:
                (self.migrations / f"{ident}.down.sql").write_text(down + "\n")

    def sql(self, statement: str) -> list:
        return self.db.cluster.query(self.db.name, statement)

    def tracking(self) -> list[tuple]:
        """The tracking rows without their timing columns."""
        return self.sql("SELECT version, name, sha256, dirty FROM schema_migrations ORDER BY version")

    def psql(self, script: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "PGHOST": self.env["DB_HOST"], "PGPORT": self.env["DB_PORT"],
               "PGUSER": self.env["DB_USER"], "PGDATABASE": self.db.name}
        return subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script)], env=env,
                              capture_output=True, text=True)

    def state(self) -> dict:
        """The schema as pg_dump prints it, every row but the tracking table's, and the tracking rows."""
        state = database_state(self.db)
        del state["rows"]["schema_migrations"]  # applied_at and duration_ms differ between any two runs
        return {**state, "tracking": self.tracking()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row(ws: Workspace, ident: str, dirty: bool = False) -> tuple:
    version, name = ident.split("_", 1)
    return (int(version), name, sha(ws.migrations / f"{ident}.up.sql"), dirty)



@pytest.fixture
def ws(pg_db, tmp_path: Path) -> Workspace:
    return Workspace(pg_db, tmp_path / "a")


@pytest.fixture
def other(pg_db, pg_cluster, tmp_path: Path) -> Iterator[Workspace]:
    """A second database in the same cluster, with its own workspace."""
    name = pg_db.name[:55] + "_other"
    yield Workspace(pg_cluster.create_database(name), tmp_path / "b")
    pg_cluster.drop_database(name)


# -- no-transaction up files --------------------------------------------------------------------------


def test_a_no_transaction_up_builds_its_index_concurrently_and_its_down_drops_it(ws: Workspace):
    ws.write(FILES)
    result = ws.ok("migrate", "--no-backup")
    assert "applying 003_orders_by_customer (outside a transaction)" in result.stderr
    assert result.stdout.splitlines() == [f"applied {ident}" for ident in FILES]
    assert ws.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_by_customer'::regclass") == [(True,)]
    assert ws.tracking() == [row(ws, ident) for ident in FILES]
    assert "DIRTY" not in ws.ok("status").stdout

    ws.ok("rollback", "002", "--yes", "--no-backup")
    assert ws.sql("SELECT count(*) FROM pg_class WHERE relname = 'orders_by_customer'") == [(0,)]
    assert ws.tracking() == [row(ws, "001_customers"), row(ws, "002_orders")]
    ws.ok("migrate", "003", "--no-backup")
    assert ws.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_by_customer'::regclass") == [(True,)]


TAGS = (NO_TX + "CREATE TABLE tags (id int);\nINSERT INTO tags VALUES (1), (1);\n"
        "CREATE UNIQUE INDEX CONCURRENTLY tags_id ON tags (id);",
        NO_TX + "DROP INDEX CONCURRENTLY tags_id;\nDROP TABLE tags;")


def fail_tags(ws: Workspace) -> None:
    """001 applied, then 002_tags fails at its third statement; 003 stays pending."""
    ws.write({"001_customers": FILES["001_customers"], "002_tags": TAGS,
              "003_later": ("CREATE TABLE later (x int);", "DROP TABLE later;")})
    result = ws.run("migrate", "--no-backup")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("database_rollback.py: error: 002_tags.up.sql, line 4: could not create unique index")
    assert "its 2 statement(s) before the failing one stay done; it is marked dirty" in error
    assert "`database_rollback.py force VERSION`" in error and "applied before it: 001_customers" in error
    assert ws.tracking() == [row(ws, "001_customers"), row(ws, "002_tags", dirty=True)]
    assert ws.sql("SELECT count(*) FROM pg_class WHERE relname = 'later'") == [(0,)]


def test_a_failing_no_transaction_up_leaves_a_dirty_mark_that_blocks_until_force(ws: Workspace):
    fail_tags(ws)
    status = ws.ok("status")
    assert "  applied  002_tags  (" in status.stdout and "DIRTY" in status.stdout
    assert json.loads(ws.ok("--json", "status").stdout)["dirty"] == ["002_tags"]
    before = ws.state()
    refusal = ("database_rollback.py: error: " + ws.db.name + " is dirty at 002_tags: it ran outside a transaction "
               "and did not finish; finish or undo it by hand, then record the version the schema is at with "
               "`database_rollback.py force VERSION`\n")
    for args in (["migrate", "--no-backup"], ["migrate", "--sql"], ["rollback", "001", "--yes", "--no-backup"],
                 ["rollback", "0", "--dry-run"]):
        result = ws.run(*args)
        assert (result.returncode, result.stderr) == (1, refusal), args
    verify = ws.run("verify")
    assert verify.returncode == 3
    assert "problem: migration 002_tags is marked dirty" in verify.stdout
    assert "problem: index tags_id is invalid (left by a failed CREATE INDEX CONCURRENTLY?)" in verify.stdout

    no_terminal = ws.run("force", "001")
    assert no_terminal.returncode == 2 and "--yes" in no_terminal.stderr
    plan = ws.ok("force", "001", "--dry-run")
    assert plan.stdout == f"would remove the row of 002_tags (sha256 {row(ws, '002_tags')[2]}, dirty)\n"
    assert ws.state() == before

    # The operator undoes what ran, and fixes the file; force records 001, then migrate runs 002 again.
    ws.sql("DROP INDEX tags_id; DROP TABLE tags")
    ws.write({"002_tags": (TAGS[0].replace("(1), (1)", "(1), (2)"), TAGS[1])})
    forced = ws.ok("--json", "force", "001", "--yes")
    assert json.loads(forced.stdout) | {"ok": True} == {
        "ok": True, "command": "force", "current": "001_customers", "removed": ["002_tags"], "recorded": None,
        "changed": True}
    assert ws.tracking() == [row(ws, "001_customers")]
    assert ws.ok("migrate", "--no-backup").stdout == "applied 002_tags\napplied 003_later\n"
    assert ws.tracking() == [row(ws, "001_customers"), row(ws, "002_tags"), row(ws, "003_later")]
    assert ws.run("verify").returncode == 0


def test_force_to_the_dirty_version_after_finishing_it_by_hand(ws: Workspace):
    fail_tags(ws)
    ws.sql("DROP INDEX tags_id; DELETE FROM tags; INSERT INTO tags VALUES (1)")
    ws.sql("CREATE UNIQUE INDEX tags_id ON tags (id)")
    result = ws.ok("force", "002_tags", "--yes")
    assert result.stdout == f"cleared the dirty mark of 002_tags\n{ws.db.name} is now at 002_tags\n"
    assert ws.tracking() == [row(ws, "001_customers"), row(ws, "002_tags")]
    assert ws.ok("force", "2", "--yes").stdout == f"{ws.db.name} is at 002_tags, nothing dirty: nothing to do\n"
    assert ws.ok("migrate", "--no-backup").stdout == "applied 003_later\n"


def test_a_failing_no_transaction_down_leaves_a_dirty_mark(ws: Workspace):
    ws.write(FILES)
    ws.ok("migrate", "--no-backup")
    (ws.migrations / "003_orders_by_customer.down.sql").write_text(
        NO_TX + "DROP INDEX CONCURRENTLY orders_by_customer;\nDROP TABLE no_such_table;\n")
    result = ws.run("rollback", "002", "--yes", "--no-backup")
    assert result.returncode == 1
    assert ("003_orders_by_customer.down.sql, line 3: table \"no_such_table\" does not exist; 003_orders_by_customer "
            "runs outside a transaction: its 1 statement(s) before the failing one stay done; it is marked dirty"
            ) in result.stderr
    assert "004_mood stay rolled back" in result.stderr
    assert ws.tracking() == [*[row(ws, ident) for ident in list(FILES)[:2]], row(ws, "003_orders_by_customer", True)]
    assert "dirty at 003_orders_by_customer" in ws.run("rollback", "002", "--yes", "--no-backup").stderr
    ws.ok("force", "002", "--yes")
    assert ws.tracking() == [row(ws, ident) for ident in list(FILES)[:2]]
    assert ws.ok("force", "0", "--dry-run").stdout.splitlines() == [
        f"would remove the row of {ident} (sha256 {row(ws, ident)[2]})" for ident in ("002_orders", "001_customers")]


def test_a_tracking_table_made_before_dirty_marks_is_read_and_upgraded(ws: Workspace):
    ws.write(FILES)
    ws.sql(FILES["001_customers"][0])
    ws.sql("CREATE TABLE public.schema_migrations (version bigint PRIMARY KEY, name text NOT NULL, sha256 text "
           "NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), duration_ms integer)")
    ws.sql(f"INSERT INTO schema_migrations VALUES (1, 'customers', '{row(ws, '001_customers')[2]}', now(), 5)")
    status = json.loads(ws.ok("--json", "status").stdout)
    assert (status["current"], status["dirty"]) == ("001_customers", [])
    assert ws.ok("migrate", "--no-backup").stdout.splitlines()[0] == "applied 002_orders"
    assert ws.tracking() == [row(ws, ident) for ident in FILES]


# -- baseline, repair ---------------------------------------------------------------------------------


def test_baseline_adopts_a_database_made_by_psql_then_migrate_applies_only_the_files_above(ws: Workspace,
                                                                                            other: Workspace):
    ws.write(FILES)
    schema = ws.root / "schema.sql"
    schema.write_text("".join(FILES[ident][0] + "\n" for ident in list(FILES)[:3]))
    made = ws.psql(schema)
    assert made.returncode == 0, made.stderr

    plan = ws.ok("baseline", "003", "--dry-run")
    assert plan.stdout.splitlines() == [f"would record {ident} as applied (sha256 {row(ws, ident)[2]}) without "
                                        "running it" for ident in list(FILES)[:3]]
    assert ws.sql("SELECT to_regclass('public.schema_migrations')") == [(None,)]
    assert ws.run("baseline", "003").returncode == 2  # no terminal, no --yes
    result = ws.ok("baseline", "003_orders_by_customer", "--yes")
    assert result.stdout.splitlines()[-1] == f"{ws.db.name} is now at 003_orders_by_customer"
    assert ws.tracking() == [row(ws, ident) for ident in list(FILES)[:3]]
    again = ws.run("baseline", "002", "--yes")
    assert again.returncode == 2 and "already records migrations (at 003_orders_by_customer)" in again.stderr

    assert json.loads(ws.ok("--json", "migrate", "--no-backup").stdout)["applied"] == ["004_mood"]
    other.write(FILES)
    other.ok("migrate", "--no-backup")
    assert ws.state() == other.state()


def test_repair_re_records_the_checksum_of_an_edited_applied_file(ws: Workspace):
    ws.write(FILES)
    ws.ok("migrate", "--no-backup")
    up = ws.migrations / "002_orders.up.sql"
    old = sha(up)
    up.write_text(up.read_text().replace("total numeric", "total  numeric") + "-- reformatted\n")
    new = sha(up)
    ws.write({"005_notes": ("CREATE TABLE notes (body text);", "DROP TABLE notes;")})
    refused = ws.run("migrate", "--no-backup")
    assert refused.returncode == 1 and "002_orders.up.sql changed since it was applied" in refused.stderr
    assert "database_rollback.py repair" in refused.stderr

    assert ws.ok("repair", "--dry-run").stdout == f"would re-record 002_orders.up.sql: sha256 {old} -> {new}\n"
    assert ws.run("repair").returncode == 2
    assert row(ws, "002_orders") not in ws.tracking()
    result = ws.ok("--json", "repair", "--yes")
    assert json.loads(result.stdout)["repaired"] == [{"file": "002_orders.up.sql", "old_sha256": old,
                                                      "new_sha256": new}]
    assert ws.tracking() == [row(ws, ident) for ident in FILES]
    assert json.loads(ws.ok("--json", "status").stdout)["drift"] == []
    assert "nothing to repair" in ws.ok("repair", "--yes").stdout
    assert ws.ok("migrate", "--no-backup").stdout == "applied 005_notes\n"


# -- --sql --------------------------------------------------------------------------------------------


def test_sql_scripts_run_by_psql_do_what_migrate_and_rollback_do(ws: Workspace, other: Workspace):
    for side in (ws, other):
        side.write(FILES)
        side.ok("migrate", "001", "--no-backup")
    before = ws.state()
    script = ws.ok("migrate", "--sql").stdout
    assert ws.state() == before  # printing it changed nothing
    assert json.loads(ws.ok("--json", "migrate", "--sql").stdout)["sql"] == script
    for needed in ("CREATE TABLE IF NOT EXISTS public.schema_migrations", "BEGIN;", "COMMIT;",
                   f"INSERT INTO public.schema_migrations (version, name, sha256, duration_ms, dirty) VALUES "
                   f"(3, 'orders_by_customer', '{row(ws, '003_orders_by_customer')[2]}', NULL, true);",
                   "UPDATE public.schema_migrations SET dirty = false WHERE version = 3;"):
        assert needed in script
    # The no-transaction part sits between two transactions, not inside one.
    no_tx = script.index("CREATE INDEX CONCURRENTLY")
    assert script.rindex("COMMIT;", 0, no_tx) > script.rindex("BEGIN;", 0, no_tx)
    path = ws.root / "migrate.sql"
    path.write_text(script)
    ran = ws.psql(path)
    assert ran.returncode == 0, ran.stderr
    other.ok("migrate", "--no-backup")
    assert ws.state() == other.state()
    assert ws.tracking() == [row(ws, ident) for ident in FILES]

    # Made for another state, it stops before changing anything.
    after = ws.state()
    stale = ws.psql(path)
    assert stale.returncode == 3 and "not those this script was made for" in stale.stderr
    assert ws.state() == after

    script = ws.ok("rollback", "001", "--sql").stdout
    assert "DROP INDEX CONCURRENTLY orders_by_customer;" in script
    assert "DELETE FROM public.schema_migrations WHERE version = 4;" in script
    assert ws.state() == after
    path.write_text(script)
    ran = ws.psql(path)
    assert ran.returncode == 0, ran.stderr
    other.ok("rollback", "001", "--yes", "--no-backup")
    assert ws.state() == other.state()
    assert ws.tracking() == [row(ws, "001_customers")]
    assert ws.ok("migrate", "--sql", "001").stdout == f"-- nothing to apply: {ws.db.name} is at 001_customers\n"


# -- out of order -------------------------------------------------------------------------------------


def test_out_of_order_files_need_the_flag_and_are_warned_of(ws: Workspace):
    files = {ident: FILES[ident] for ident in ("001_customers", "002_orders", "004_mood")}
    ws.write(files)
    ws.ok("migrate", "--no-backup")
    ws.write({"003_orders_by_customer": FILES["003_orders_by_customer"]})
    before = ws.state()
    for args in (["migrate", "--no-backup"], ["migrate", "--dry-run"], ["migrate", "--sql"]):
        refused = ws.run(*args)
        assert refused.returncode == 2, args
        assert refused.stderr == ("database_rollback.py: error: 003_orders_by_customer not applied but older than "
                                  "the current version 004_mood: renumber them above it, or apply them anyway with "
                                  "--allow-out-of-order\n")
    assert ws.state() == before
    assert "pending  003_orders_by_customer  older than the current version" in ws.ok("status").stdout

    result = ws.ok("--json", "migrate", "--no-backup", "--allow-out-of-order")
    assert "warning: 003_orders_by_customer is older than the current version 004_mood" in result.stderr
    report = json.loads(result.stdout)
    assert (report["applied"], report["current"]) == (["003_orders_by_customer"], "004_mood")
    assert ws.tracking() == [row(ws, ident) for ident in FILES]
    assert ws.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_by_customer'::regclass") == [(True,)]


# -- verify and indexes being built -------------------------------------------------------------------


def test_verify_notes_an_index_being_built_concurrently_but_reports_none(ws: Workspace):
    ws.sql("CREATE TABLE items (x int); INSERT INTO items VALUES (1)")
    writer = ws.db.connect()
    with writer.cursor() as cur:
        cur.execute("INSERT INTO items VALUES (2)")  # an open writing transaction: the build waits for it
    builder = ws.db.connect()
    builder.autocommit = True
    build = threading.Thread(target=lambda: builder.cursor().execute("CREATE INDEX CONCURRENTLY items_x ON items (x)"))
    build.start()
    try:
        wait_until(lambda: ws.sql("SELECT count(*) FROM pg_stat_progress_create_index p JOIN pg_class c "
                                  "ON c.oid = p.index_relid WHERE c.relname = 'items_x'")[0][0])
        result = ws.run("verify")
        assert result.returncode == 0, result.stdout
        assert "index items_x is being built now" in result.stdout and "problem" not in result.stdout
    finally:
        writer.commit()
        build.join(30)
        writer.close()
        builder.close()
    assert ws.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_x'::regclass") == [(True,)]
