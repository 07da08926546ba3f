"""database_rollback.py backup and restore against the real throwaway cluster, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    Terminal,
    database_state,
    process_state,
    run_script,
    script_argv,
    wait_for_child,
    wait_until_dead,
)

from common.progress import _INTERVAL_SECONDS as PROGRESS_INTERVAL

RICH_SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SEQUENCE invoice_numbers START 1000;
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, mood mood DEFAULT 'ok',
                        created timestamptz DEFAULT '2026-01-01');
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int REFERENCES customers(id), total numeric(10,2),
                     invoice int DEFAULT nextval('invoice_numbers'), audit text);
CREATE INDEX orders_customer ON orders (customer_id);
CREATE FUNCTION stamp_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.audit := 'seen ' || NEW.total; RETURN NEW; END $$;
CREATE TRIGGER orders_audit BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION stamp_audit();
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 100;
CREATE TABLE events (id int, at date NOT NULL, payload jsonb) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO customers (name, mood) SELECT 'customer ' || i, (ARRAY['sad','ok','happy'])[1 + i % 3]::mood
  FROM generate_series(1, 200) i;
INSERT INTO orders (customer_id, total) SELECT 1 + i % 200, (i * 7.3) % 500 FROM generate_series(1, 2000) i;
INSERT INTO events SELECT i, DATE '2025-06-01' + (i % 400), jsonb_build_object('n', i) FROM generate_series(1, 1000) i;
CREATE MATERIALIZED VIEW order_totals AS SELECT customer_id, sum(total) AS total FROM orders GROUP BY 1;
"""


class DbWorkspace:
    """The database script's settings for one test database, and a store in a temporary folder."""

    def __init__(self, pg_db, root: Path):
        self.pg_db = pg_db
        self.root = root
        self.store = root / "backups"
        self.env = {**pg_db.env, "BACKUP_DIR": str(self.store), "MIGRATIONS_DIR": str(root / "migrations")}

    def run(self, *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
        return run_script("database_rollback.py", *args, env=self.env, cwd=self.root, umask=umask)

    def sql(self, statement: str, dbname: str | None = None) -> list:
        return self.pg_db.cluster.query(dbname or self.pg_db.name, statement)

    def backup_ids(self) -> list[str]:
        listing = self.run("--json", "list")
        assert listing.returncode == 0, listing.stderr
        return [b["id"] for b in json.loads(listing.stdout)["backups"]]

    def databases(self) -> set[str]:
        return {name for (name,) in self.sql("SELECT datname FROM pg_database")}


@pytest.fixture
def dbw(pg_db, tmp_path: Path) -> DbWorkspace:
    workspace = DbWorkspace(pg_db, tmp_path)
    workspace.sql(RICH_SCHEMA)
    return workspace


def break_database(dbw: DbWorkspace) -> None:
    dbw.sql("DELETE FROM orders WHERE id % 2 = 0; DROP VIEW big_orders; ALTER TABLE customers ADD COLUMN x int;"
            "INSERT INTO events VALUES (1, '2026-05-05', '{}'); SELECT nextval('invoice_numbers')")


@pytest.mark.parametrize("mode", ["swap", "in-place"])
def test_round_trip_is_exact_in_both_modes(dbw: DbWorkspace, mode: str):
    before = database_state(dbw.pg_db)
    result = dbw.run("backup", "--label", "before")
    assert result.returncode == 0, result.stderr
    break_database(dbw)
    assert database_state(dbw.pg_db) != before

    args = ["restore", "latest", "--yes"] + (["--in-place"] if mode == "in-place" else [])
    result = dbw.run("--json", *args)
    assert result.returncode == 0, result.stderr
    assert database_state(dbw.pg_db) == before
    report = json.loads(result.stdout)
    if mode == "swap":
        kept = report["previous_database"]
        assert kept in dbw.databases()
        assert dbw.sql("SELECT count(*) FROM orders", dbname=kept) == [(1000,)]  # the broken one, for undo
    else:
        assert report["safety_backup"] in dbw.backup_ids()


def test_directory_format_with_jobs_round_trips(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    result = dbw.run("backup", "--format", "directory", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    break_database(dbw)
    result = dbw.run("restore", "latest", "--yes", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert database_state(dbw.pg_db) == before


def test_plain_pg_dump_file_made_elsewhere_restores_with_a_warning(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    dump = dbw.root / "manual.dump"
    env = {**os.environ, "PGHOST": dbw.env["DB_HOST"], "PGPORT": dbw.env["DB_PORT"], "PGUSER": dbw.env["DB_USER"]}
    subprocess.run(["pg_dump", "-Fc", "-f", str(dump), dbw.pg_db.name], env=env, check=True)
    break_database(dbw)
    result = dbw.run("restore", str(dump), "--yes")
    assert result.returncode == 0, result.stderr
    assert "no checksum" in result.stderr
    assert database_state(dbw.pg_db) == before


@pytest.mark.parametrize("name", ["manual.sql", "manual.dump", "manual"])
def test_plain_sql_dump_is_refused_with_exit_2_and_pointed_at_psql(dbw: DbWorkspace, name: str):
    dump = dbw.root / name
    env = {**os.environ, "PGHOST": dbw.env["DB_HOST"], "PGPORT": dbw.env["DB_PORT"], "PGUSER": dbw.env["DB_USER"]}
    subprocess.run(["pg_dump", "--format=plain", "-f", str(dump), dbw.pg_db.name], env=env, check=True)
    break_database(dbw)
    broken, databases = database_state(dbw.pg_db), dbw.databases()
    result = dbw.run("restore", str(dump), "--yes")
    assert result.returncode == 2, result.stderr
    assert "plain SQL dumps are not supported: use psql" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert database_state(dbw.pg_db) == broken and dbw.databases() == databases


def test_a_dump_file_inside_a_backup_is_that_backup_checksums_and_all(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    dump = dbw.store / dbw.backup_ids()[0] / "db.dump"
    break_database(dbw)
    result = dbw.run("restore", str(dump), "--yes")
    assert result.returncode == 0, result.stderr
    assert "no checksum" not in result.stderr
    assert database_state(dbw.pg_db) == before
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    result = dbw.run("restore", str(dump), "--yes")
    assert result.returncode == 1 and "damaged" in result.stderr


def test_damaged_backup_is_refused_and_database_unchanged(dbw: DbWorkspace):
    assert dbw.run("backup").returncode == 0
    dump = dbw.store / dbw.backup_ids()[0] / "db.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    break_database(dbw)
    broken = database_state(dbw.pg_db)
    databases = dbw.databases()

    result = dbw.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert "damaged" in result.stderr and "db.dump" in result.stderr
    assert database_state(dbw.pg_db) == broken
    assert dbw.databases() == databases


def test_live_sessions_are_ended_by_the_swap(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    break_database(dbw)
    idle = dbw.pg_db.connect()
    in_transaction = dbw.pg_db.connect()
    with in_transaction.cursor() as cur:
        cur.execute("SELECT count(*) FROM orders")  # holds a lock on orders, transaction left open

    result = dbw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outage_seconds"] < 1
    assert (report["sessions_ended"], report["transactions_ended"]) == (2, 1)  # the operator hears of both
    assert database_state(dbw.pg_db) == before
    for conn in (idle, in_transaction):
        import psycopg2

        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")  # the server ended this session
        conn.close()


def test_failed_restore_leaves_live_database_and_no_scratch_database(dbw: DbWorkspace):
    assert dbw.run("backup").returncode == 0
    dbw.sql("CREATE TABLE marker (x int)")
    state = database_state(dbw.pg_db)
    databases = dbw.databases()
    dbw.env["DB_USER"] = "no_such_role"  # every connection fails
    result = dbw.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert "no_such_role" in result.stderr
    assert database_state(dbw.pg_db) == state
    assert dbw.databases() == databases


def test_second_run_while_lock_is_held_exits_75(dbw: DbWorkspace):
    from backup_store.store import BackupStore

    with BackupStore(dbw.store, "db").lock("a migration in another terminal"):
        result = dbw.run("backup")
    assert result.returncode == 75
    assert "a migration in another terminal" in result.stderr
    assert dbw.backup_ids() == []


def _cmdlines() -> dict[int, tuple[str, bytes, bytes]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            found[int(entry)] = (cmdline.split(b"\0")[0].decode(errors="replace"), cmdline, environ)
    return found


def test_password_never_in_argv_or_environment_of_any_process(dbw: DbWorkspace):
    dbw.sql("CREATE TABLE filler AS SELECT i, md5(i::text) AS h FROM generate_series(1, 300000) i")
    dbw.env.update(DB_HOST="127.0.0.1", DB_PASSWORD=dbw.pg_db.cluster.password)
    secret = dbw.pg_db.cluster.password.encode()
    seen_tools = set()
    for args in (["backup"], ["restore", "latest", "--yes"]):
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"} | dbw.env
        proc = subprocess.Popen(script_argv("database_rollback.py", *args), env=env, cwd=dbw.root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while proc.poll() is None:
            for pid, (program, cmdline, environ) in _cmdlines().items():
                if pid == proc.pid:
                    continue  # the script itself holds the password in memory by design, not in argv
                assert secret not in cmdline, f"password in argv of {program}"
                if "pg_dump" in program or "pg_restore" in program:
                    seen_tools.add(Path(program).name)
                    assert secret not in environ, f"password in the environment of {program}"
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        assert secret not in out and secret not in err
    assert seen_tools & {"pg_dump"} and seen_tools & {"pg_restore"}
    assert secret not in (dbw.store / "audit.log").read_bytes()


def test_dumps_are_private_under_umask_022(dbw: DbWorkspace):
    assert dbw.run("backup", umask=0o022).returncode == 0
    assert dbw.run("backup", "--format", "directory", umask=0o022).returncode == 0
    for dirpath, _dirnames, filenames in os.walk(dbw.store):
        assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
        for name in filenames:
            assert (Path(dirpath) / name).stat().st_mode & 0o777 == 0o600, name


def test_sigterm_during_backup_leaves_no_pg_dump_and_no_backup(dbw: DbWorkspace):
    dbw.sql("CREATE TABLE filler AS SELECT i, md5(i::text) AS h FROM generate_series(1, 2000000) i")
    proc = subprocess.Popen(script_argv("database_rollback.py", "backup"), env={**os.environ, **dbw.env},
                            cwd=dbw.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    dump_pids: list[int] = []
    while not dump_pids:
        assert proc.poll() is None, "the backup ended before it could be interrupted"
        assert time.monotonic() < deadline
        dump_pids = [pid for pid, (program, _c, _e) in _cmdlines().items()
                     if program.endswith("pg_dump") and _parent(pid) == proc.pid]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"interrupted by SIGTERM" in err
    for pid in dump_pids:
        assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    assert dbw.backup_ids() == []


def test_sigkill_during_backup_leaves_no_pg_dump_and_no_password_file(dbw: DbWorkspace):
    dbw.sql("CREATE TABLE filler AS SELECT i FROM generate_series(1, 300000) i")
    tmp = dbw.root / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(script_argv("database_rollback.py", "backup"), cwd=dbw.root,
                            env={**os.environ, **dbw.env, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL)
    dump_pid = wait_for_child(proc, "pg_dump")
    os.kill(dump_pid, signal.SIGSTOP)  # held mid-dump, so the kill below lands while it runs
    proc.kill()
    proc.wait()
    try:
        assert wait_until_dead(dump_pid), "pg_dump outlived the killed backup"
    finally:
        if process_state(dump_pid) not in ("gone", "Z"):
            os.kill(dump_pid, signal.SIGKILL)
    assert list(tmp.iterdir()) == []  # no password file, nor anything else
    assert dbw.backup_ids() == []


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_cleanup_and_list(dbw: DbWorkspace):
    for label in ("a", "b", "c"):
        assert dbw.run("backup", "--label", label).returncode == 0
    ids = dbw.backup_ids()
    assert dbw.run("cleanup", "0", "--keep", "1").returncode == 0
    assert dbw.backup_ids() == ids[:1]
    result = dbw.run("list")
    assert result.stdout.splitlines()[1].endswith("c")


def test_cleanup_drops_only_old_kept_databases(dbw: DbWorkspace):
    assert dbw.run("backup").returncode == 0
    assert dbw.run("restore", "latest", "--yes").returncode == 0  # keeps a __before_ database from now
    recent = {name for name in dbw.databases() if "__before_" in name}
    old = dbw.pg_db.name[:40] + "__before_20200101000000"
    dbw.pg_db.cluster.create_database(old)
    result = dbw.run("--json", "cleanup", "30", "--dry-run")
    assert json.loads(result.stdout)["would_drop_databases"] == []  # --keep 3: both kept databases stay
    result = dbw.run("--json", "cleanup", "30", "--keep", "1", "--dry-run")
    assert json.loads(result.stdout)["would_drop_databases"] == [old]
    assert old in dbw.databases()
    assert dbw.run("cleanup", "30", "--keep", "1").returncode == 0
    assert old not in dbw.databases()
    assert recent and recent <= dbw.databases()


def test_progress_goes_to_a_terminal_stderr_only(dbw: DbWorkspace):
    """A backup run at a shell shows its dump's progress on the terminal (stderr), never on stdout; with --json it
    shows none. Another transaction holds a table's lock, so each pg_dump waits (as behind a long migration) until
    the test has seen what the terminals show, however small the database. What the line says, as the work
    goes, is test_common_progress's."""
    holder = dbw.pg_db.connect()
    holder.cursor().execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
    runs = {}
    try:
        for extra in ((), ("--json",)):
            terminal = Terminal()
            # Each in its own store (one lock each); pg_dump waits for the table longer than this test could need.
            env = {**os.environ, **dbw.env, "BACKUP_DIR": str(dbw.root / f"store{len(runs)}"), "DB_LOCK_TIMEOUT": "120"}
            proc = subprocess.Popen(script_argv("database_rollback.py", *extra, "backup"), env=env, cwd=dbw.root,
                                    stdout=subprocess.PIPE, stderr=terminal.follower)
            os.close(terminal.follower)
            runs[extra] = proc, terminal
        runs[()][1].wait_for(rb"\r\x1b\[Kdumping " + dbw.pg_db.name.encode() + rb": 0\.0 MiB, [0-9.]+ MiB/s, \d+ s")
        deadline = time.monotonic() + 60
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LOCK TABLE public.customers %' AND " \
                  "wait_event_type = 'Lock'"
        while dbw.sql(waiting) != [(2,)]:
            assert time.monotonic() < deadline, "the two dumps never both waited for the table"
            time.sleep(0.05)
        # Both dumps wait inside their progress display: two redraws more, and a --json run that drew would have.
        time.sleep(2 * PROGRESS_INTERVAL)
    finally:
        holder.rollback()
        holder.close()
    for extra, (proc, terminal) in runs.items():
        out, _ = proc.communicate(timeout=120)
        screen = terminal.screen()
        assert proc.returncode == 0, screen
        assert (b"dumping " + dbw.pg_db.name.encode() in screen) is (extra == ()), screen
        assert b"dumping" not in out and b"\r" not in out
    assert json.loads(out)["backup"]["id"]


@pytest.fixture
def migrated(pg_db, tmp_path: Path) -> DbWorkspace:
    """An empty database with the sample migrations applied up to 004."""
    import shutil

    from helpers import ROOT

    dbw = DbWorkspace(pg_db, tmp_path)
    shutil.copytree(ROOT / "examples" / "migrations", dbw.root / "migrations")
    result = dbw.run("migrate", "004", "--no-backup")
    assert result.returncode == 0, result.stderr
    return dbw


def test_migrate_then_rollback_through_the_cli(migrated: DbWorkspace):
    assert migrated.run("migrate").returncode == 0
    assert migrated.sql("SELECT count(*) FROM schema_migrations") == [(5,)]

    plan = migrated.run("--json", "rollback", "003_seed_customers", "--dry-run")
    assert plan.returncode == 0
    assert [s["id"] for s in json.loads(plan.stdout)["plan"]["steps"]] == [
        "005_split_customer_name", "004_orders_by_customer_index"]
    assert migrated.sql("SELECT count(*) FROM schema_migrations") == [(5,)]

    result = migrated.run("--json", "rollback", "003_seed_customers", "--yes")
    assert result.returncode == 0, result.stderr
    assert "outside the rollback transaction" in result.stderr  # the no-transaction step is warned of
    report = json.loads(result.stdout)
    assert report["current"] == "003_seed_customers" and report["safety_backup"] in migrated.backup_ids()
    assert migrated.sql("SELECT version FROM schema_migrations ORDER BY 1") == [(1,), (2,), (3,)]
    assert migrated.sql("SELECT name FROM customers WHERE id = 7") == [("customer 7",)]
    assert migrated.sql("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_by_customer'") == [(0,)]
    assert migrated.sql("SELECT count(*) FROM information_schema.columns WHERE column_name = 'first_name'") == [(0,)]

    again = migrated.run("rollback", "003", "--yes")
    assert again.returncode == 0 and "nothing to roll back" in again.stdout
    status = json.loads(migrated.run("--json", "status").stdout)
    assert status["pending"] == ["004_orders_by_customer_index", "005_split_customer_name"]


@pytest.mark.parametrize("how", [["0"], ["--all"]])
def test_rollback_0_and_all_roll_back_every_migration_through_the_cli(migrated: DbWorkspace, how: list[str]):
    result = migrated.run("--json", "rollback", *how, "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["current"] is None
    assert report["rolled_back"] == ["004_orders_by_customer_index", "003_seed_customers", "002_orders",
                                     "001_initial_schema"]
    assert migrated.sql("SELECT count(*) FROM schema_migrations") == [(0,)]
    assert migrated.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(1,)]
    assert "already at no migration" in migrated.run("rollback", *how, "--yes").stdout
    assert migrated.run("rollback", "1", "--all", "--yes").returncode == 2
    assert migrated.run("rollback", "--yes").returncode == 2


@pytest.mark.parametrize("ref", ["999_nope", "abc", "--output=x"])
def test_rollback_to_unknown_or_malformed_migration_is_exit_2(migrated: DbWorkspace, ref: str):
    before = database_state(migrated.pg_db)
    result = migrated.run("rollback", "--yes", "--", ref)
    assert result.returncode == 2, result.stderr
    assert database_state(migrated.pg_db) == before


def test_missing_down_file_is_refused_and_names_the_backup_to_restore(migrated: DbWorkspace):
    assert migrated.run("backup", "--label", "at 004").returncode == 0
    assert migrated.run("migrate").returncode == 0
    (migrated.root / "migrations" / "005_split_customer_name.down.sql").unlink()
    before = database_state(migrated.pg_db)
    result = migrated.run("rollback", "004", "--yes")
    assert result.returncode == 1
    assert "005_split_customer_name" in result.stderr
    named = result.stderr.rsplit("restore ", 1)[1].split()[0]
    manifest = json.loads((migrated.store / named / "manifest.json").read_text())
    assert manifest["migration_version"] == "004_orders_by_customer_index"
    assert database_state(migrated.pg_db) == before


def test_rollback_blocked_by_a_session_names_it_and_changes_nothing(migrated: DbWorkspace):
    assert migrated.run("migrate").returncode == 0
    blocker = migrated.pg_db.connect()
    with blocker.cursor() as cur:
        cur.execute("SELECT count(*) FROM customers")  # ACCESS SHARE on customers, transaction left open
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    before = database_state(migrated.pg_db)
    result = migrated.run("rollback", "004", "--yes", "--no-backup", "--lock-timeout", "1")
    assert result.returncode == 1
    assert str(pid) in result.stderr and "--terminate-blockers" in result.stderr
    assert database_state(migrated.pg_db) == before

    locks = migrated.run("--json", "locks")
    assert locks.returncode == 0
    result = migrated.run("rollback", "004", "--yes", "--no-backup", "--lock-timeout", "1", "--terminate-blockers")
    assert result.returncode == 0, result.stderr
    assert str(pid) in result.stdout
    blocker.close()


def test_verify_finds_changed_migration_and_damaged_backup(migrated: DbWorkspace):
    assert migrated.run("backup").returncode == 0
    result = migrated.run("verify")
    assert result.returncode == 0, result.stdout
    up = migrated.root / "migrations" / "002_orders.up.sql"
    up.write_text(up.read_text() + "-- edited after it was applied\n")
    dump = migrated.store / migrated.backup_ids()[0] / "db.dump"
    data = bytearray(dump.read_bytes())
    data[-5] ^= 0x01
    dump.write_bytes(bytes(data))
    result = migrated.run("--json", "verify")
    assert result.returncode == 3
    problems = json.loads(result.stdout)["problems"]
    assert any("002_orders.up.sql changed" in p for p in problems)
    assert any("db.dump" in p and "damaged" in p for p in problems)


def test_restore_into_another_database_leaves_the_live_one_alone(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    break_database(dbw)
    broken = database_state(dbw.pg_db)
    copy = dbw.pg_db.name[:40] + "_copy"
    databases = dbw.databases()
    result = dbw.run("restore", "latest", "--yes", "--target-db", copy)
    assert result.returncode == 0, result.stderr
    assert database_state(dbw.pg_db, dbname=copy) == before
    assert database_state(dbw.pg_db) == broken
    # A new database replaced nothing: the report must not claim a kept database or print an undo.
    assert dbw.databases() == databases | {copy}
    assert f"{copy} did not exist: it was created" in result.stdout
    assert "__before_" not in result.stdout and "to undo" not in result.stdout
    again = dbw.run("--json", "restore", "latest", "--yes", "--target-db", copy + "2")
    assert json.loads(again.stdout)["previous_database"] is None
    dbw.pg_db.cluster.drop_database(copy)
    dbw.pg_db.cluster.drop_database(copy + "2")


def test_verify_reports_an_invalid_index(dbw: DbWorkspace):
    dbw.sql("CREATE TABLE dupes (x int); INSERT INTO dupes VALUES (1), (1)")
    try:
        dbw.sql("CREATE UNIQUE INDEX CONCURRENTLY dupes_x ON dupes (x)")
    except Exception:  # noqa: BLE001 - the failed concurrent build is the point: it leaves an invalid index
        pass
    result = dbw.run("verify")
    assert result.returncode == 3
    assert "dupes_x is invalid" in result.stdout


def test_swap_restore_keeps_grants_and_database_settings(dbw: DbWorkspace):
    role = dbw.pg_db.name[:50] + "_app"
    live = dbw.pg_db.name
    dbw.sql(f'CREATE ROLE "{role}" LOGIN')
    try:
        dbw.sql(f'ALTER DATABASE "{live}" SET statement_timeout = \'5s\'; '
                f'ALTER DATABASE "{live}" SET search_path = "$user", public, extra; '
                f'ALTER ROLE "{role}" IN DATABASE "{live}" SET work_mem = \'8MB\'; '
                f'REVOKE ALL ON DATABASE "{live}" FROM PUBLIC; GRANT CONNECT ON DATABASE "{live}" TO "{role}"')
        query = ("SELECT d.datacl::text, (SELECT array_agg(coalesce(r.rolname, '-') || ':' || c ORDER BY 1, 2)"
                 " FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole, unnest(s.setconfig) c"
                 " WHERE s.setdatabase = d.oid) FROM pg_database d WHERE d.datname = %s")
        before = dbw.sql(query.replace("%s", f"'{live}'"))
        assert dbw.run("backup").returncode == 0
        result = dbw.run("restore", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert dbw.sql(query.replace("%s", f"'{live}'")) == before
    finally:
        dbw.sql(f'REASSIGN OWNED BY "{role}" TO postgres; DROP OWNED BY "{role}"')
        for name in dbw.databases():
            if name.startswith(live[:40] + "__before_"):
                dbw.pg_db.cluster.drop_database(name)
        dbw.sql(f'DROP ROLE "{role}"')


def test_latest_never_picks_another_databases_backup(dbw: DbWorkspace):
    before = database_state(dbw.pg_db)
    assert dbw.run("backup").returncode == 0
    other = dbw.pg_db.cluster.create_database(dbw.pg_db.name[:40] + "_other")
    try:
        result = run_script("database_rollback.py", "backup", env={**dbw.env, **other.env}, cwd=dbw.root)
        assert result.returncode == 0, result.stderr
        break_database(dbw)
        assert dbw.run("restore", "latest", "--yes").returncode == 0
        assert database_state(dbw.pg_db) == before
        other_backup = [b["id"] for b in json.loads(dbw.run("--json", "list").stdout)["backups"]
                        if json.loads((Path(b["path"]) / "manifest.json").read_text())["source"]["database"]
                        == other.name][0]
        refused = dbw.run("restore", other_backup, "--yes")
        assert refused.returncode == 2 and "--target-db" in refused.stderr
        assert database_state(dbw.pg_db) == before
    finally:
        dbw.pg_db.cluster.drop_database(other.name)


def test_locks_terminate_ends_the_named_session_only(dbw: DbWorkspace):
    victim, bystander = dbw.pg_db.connect(), dbw.pg_db.connect()
    with victim.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    assert dbw.run("locks", "--terminate", str(pid)).returncode == 2  # no terminal, no --yes: nothing done
    result = dbw.run("locks", "--terminate", str(pid), "--yes")
    assert result.returncode == 0, result.stderr
    import psycopg2

    with pytest.raises(psycopg2.OperationalError), victim.cursor() as cur:
        cur.execute("SELECT 1")
    with bystander.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    assert dbw.run("locks", "--terminate", "999999", "--yes").returncode == 2
    victim.close()
    bystander.close()


def test_without_db_password_the_operators_own_passfile_is_used(dbw: DbWorkspace):
    passfile = dbw.root / "pgpass"
    passfile.write_text(f"*:*:*:{dbw.env['DB_USER']}:{dbw.env['DB_PASSWORD']}\n")
    os.chmod(passfile, 0o600)
    # Over TCP, where the test cluster asks for a password (its unix socket trusts everyone).
    env = {**{key: value for key, value in dbw.env.items() if key != "DB_PASSWORD"}, "DB_HOST": "127.0.0.1"}
    result = run_script("database_rollback.py", "backup", env={**env, "PGPASSFILE": str(passfile)}, cwd=dbw.root)
    assert result.returncode == 0, result.stderr  # pg_dump and psycopg2 both read it
    restored = run_script("database_rollback.py", "restore", "latest", "--yes",
                          env={**env, "PGPASSFILE": str(passfile)}, cwd=dbw.root)
    assert restored.returncode == 0, restored.stderr


@pytest.mark.parametrize("option", ["--full", "--incremental"])
def test_a_pgbackrest_backup_option_with_the_dump_engine_is_refused_and_nothing_is_taken(dbw: DbWorkspace, option):
    result = dbw.run("backup", option)
    assert result.returncode == 2 and "DB_ENGINE=pgbackrest" in result.stderr
    assert not dbw.store.exists() or not [p for p in dbw.store.iterdir() if (p / "manifest.json").exists()]
