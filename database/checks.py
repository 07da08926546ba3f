"""`database_rollback.py verify`: what it checks on the live server (version, migrations, indexes, sessions,
and the databases restores left beside the live one), and a backup's checksums and table of contents."""

from __future__ import annotations

from pathlib import Path

from backup_store.manifest import check_backup
from backup_store.store import resolve_component
from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from common.text import count
from database import migrations
from database.context import DbContext
from database.dumps import dump_entries, dump_path, quote_identifier
from database.marks import MarkInfo, mark_problems
from database.pgbackrest import PgBackRest
from database.scratch import CLAIMED, KEPT_ROLES, being_built, scratch_databases
from database.server import APPLICATION_NAME, MAINTENANCE_DB, DbServer
from database.sessions import migration_lock_holders

LONG_TRANSACTION_SECONDS = 300


def verify_command(ctx: Context) -> Result:
    """verify [BACKUP]: server, migrations, indexes, sessions, and a backup's checksums and table of contents."""
    db = DbContext.from_settings(ctx.settings)
    problems, notes = database_problems(db.server, db.migrations_dir)
    backup = (resolve_component(db.store, ctx.args.backup) if ctx.args.backup
              else db.store.latest(match=db.is_own))
    if backup is None:
        notes.append(f"no backups in {db.store.root} yet")
    elif (mark := MarkInfo.load(backup)) is not None:
        marked = mark_problems(PgBackRest.from_settings(ctx.settings), mark)
        if not marked:
            notes.append(f"mark {backup.id}: restorable (pgBackRest backup {mark.pgbackrest_backup}, WAL archived)")
        problems += [f"mark {backup.id}: {p}" for p in marked]
    else:
        backup_problems = check_backup(backup)
        if not backup_problems:
            try:
                entries = len(dump_entries(db.server, db.tools, dump_path(backup)))
                notes.append(f"backup {backup.id}: checksums hold, {entries} entries in its table of contents")
            except ToolkitError as exc:
                backup_problems.append(str(exc))
        problems += [f"backup {backup.id}: {p}" for p in backup_problems]
    lines = [f"verify {db.server.name}: " + (count(len(problems), "problem") if problems else "OK")]
    lines += [f"  problem: {p}" for p in problems] + [f"  {n}" for n in notes]
    return Result({"problems": problems, "notes": notes, "backup": backup.id if backup else None}, lines,
                  exit_code=3 if problems else 0, report=True)


def database_problems(server: DbServer, migrations_dir: Path) -> tuple[list[str], list[str]]:
    """(problems, notes): problems fail verify (exit 3); notes are reported, including warnings."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        conn = server.connect(autocommit=True)
    except ToolkitError:
        closed = _refuses_connections(server)
        if closed is None:
            raise
        with server.session(MAINTENANCE_DB, autocommit=True) as maintenance, maintenance.cursor() as cur:
            return [closed, *scratch_report(cur, server.name, notes)], notes
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            notes.append(f"server: {cur.fetchone()[0]}")
            problems += scratch_report(cur, server.name, notes)
            problems += _invalid_indexes(cur, notes)
            cur.execute("SELECT pid, usename, application_name, now() - xact_start FROM pg_stat_activity"
                        " WHERE datname = current_database() AND xact_start < now() - make_interval(secs => %s)"
                        " AND pid <> pg_backend_pid() ORDER BY xact_start", (LONG_TRANSACTION_SECONDS,))
            notes += [f"warning: session {pid} ({user}, {app or '-'}) has had a transaction open for {age}"
                      for pid, user, app, age in cur.fetchall()]
            cur.execute("SELECT pid, usename, pg_blocking_pids(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'")
            notes += [f"warning: session {pid} ({user}) waits for a lock held by {blockers}"
                      for pid, user, blockers in cur.fetchall()]
        rows = migrations.applied(conn)
        with conn.cursor() as cur:
            migrating = bool(migration_lock_holders(cur))
    finally:
        conn.close()
    for row in rows:
        if row.dirty and migrating:
            notes.append(f"migration {row.id} is being applied or rolled back outside a transaction now")
        elif row.dirty:
            problems.append(f"migration {row.id} is marked dirty: it ran outside a transaction and did not finish; "
                            f"finish or undo it by hand, then `{APPLICATION_NAME} force VERSION`")
    if rows or migrations_dir.is_dir():
        try:
            state = migrations.status(migrations.discover(migrations_dir), rows)
        except UsageError as exc:
            problems.append(str(exc))
        else:
            notes.append(f"migration: {state['current'] or 'none applied'}, {len(state['pending'])} pending")
            problems += [f"migration {d['id']}: {d['detail']}" for d in state["drift"]]
    return problems, notes


def _invalid_indexes(cur, notes: list[str]) -> list[str]:
    """Problems: invalid indexes, as a failed or killed CREATE INDEX CONCURRENTLY (or REINDEX CONCURRENTLY)
    leaves them. Notes (appended to `notes`): those a CREATE INDEX CONCURRENTLY is building now."""
    cur.execute("SELECT i.indexrelid::regclass::text, EXISTS (SELECT FROM pg_stat_progress_create_index p"
                " WHERE p.index_relid = i.indexrelid) FROM pg_index i WHERE NOT i.indisvalid ORDER BY 1")
    found = cur.fetchall()
    notes += [f"index {name} is being built now (CREATE INDEX CONCURRENTLY)" for name, building in found if building]
    return [f"index {name} is invalid (left by a failed CREATE INDEX CONCURRENTLY?): drop it and build it again"
            for name, building in found if not building]


def scratch_report(cur, live: str, notes: list[str]) -> list[str]:
    """Problems: `__restore_` and `__drill_` databases left by runs that did not finish. Notes (appended to
    `notes`): those a run going on now is building, and the `__before_` databases kept for an undo."""
    scratch = scratch_databases(cur, live)
    restoring = [s.name for s in scratch if s.role in CLAIMED]
    building = being_built(cur, restoring)
    notes += [f"database {name} is being built by a restore or drill running now" for name in sorted(building)]
    kept = [s.name for s in scratch if s.role in KEPT_ROLES]
    if kept:
        notes.append(f"kept by earlier restores for an undo (cleanup DAYS drops old ones): {', '.join(kept)}")
    problems = [f"database {name} was left by a restore or drill that did not finish: `{APPLICATION_NAME} cleanup` "
                "drops it"
                for name in restoring if name not in building]
    return problems + _streaming_aside(cur, live, kept)


def _streaming_aside(cur, live: str, kept: list[str]) -> list[str]:
    """Problems: enabled subscriptions in databases set aside, which take what the live database should get
    (a swap made before subscriptions were handed over left them so)."""
    if not kept:
        return []
    cur.execute("SELECT d.datname, s.subname, s.subslotname FROM pg_subscription s JOIN pg_database d"
                " ON d.oid = s.subdbid WHERE s.subenabled AND d.datname = ANY(%s) ORDER BY 1, 2", (kept,))
    return [f"subscription {subscription} of {name}, a database set aside, is enabled: it takes the changes of slot "
            f"{slot} that {live} should get; in {name}: ALTER SUBSCRIPTION {subscription} DISABLE, then SET "
            f"(slot_name = NONE); in {live}, make the subscription again on slot {slot} (create_slot = false, "
            "copy_data = false)"
            for name, subscription, slot in cur.fetchall()]


def _refuses_connections(server: DbServer) -> str | None:
    """The problem to report if DB_NAME exists but does not accept connections, else None."""
    try:
        with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (server.name,))
            row = cur.fetchone()
    except ToolkitError:
        return None
    if row is None or row[0]:
        return None
    return (f"database {server.name} does not accept connections (a restore stopped while it switched databases "
            f"leaves it so): to open it, run as a superuser: ALTER DATABASE {quote_identifier(server.name)} "
            "WITH ALLOW_CONNECTIONS true")
