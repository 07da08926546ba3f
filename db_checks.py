"""What `database_rollback.py verify` checks on the live server: version, migrations, indexes, sessions."""

from __future__ import annotations

from pathlib import Path

from common.errors import UsageError
from db_server import DbServer

LONG_TRANSACTION_SECONDS = 300


def database_problems(server: DbServer, migrations_dir: Path) -> tuple[list[str], list[str]]:
    """(problems, notes): problems fail verify (exit 3); notes are reported, including warnings."""
    import db_migrations

    problems: list[str] = []
    notes: list[str] = []
    conn = server.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            notes.append(f"server: {cur.fetchone()[0]}")
            cur.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1")
            problems += [f"index {name} is invalid (a failed CREATE INDEX CONCURRENTLY?): drop or rebuild it"
                         for (name,) in cur.fetchall()]
            cur.execute("SELECT pid, usename, application_name, now() - xact_start FROM pg_stat_activity"
                        " WHERE datname = current_database() AND xact_start < now() - make_interval(secs => %s)"
                        " AND pid <> pg_backend_pid() ORDER BY xact_start", (LONG_TRANSACTION_SECONDS,))
            notes += [f"warning: session {pid} ({user}, {app or '-'}) has had a transaction open for {age}"
                      for pid, user, app, age in cur.fetchall()]
            cur.execute("SELECT pid, usename, pg_blocking_pids(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'")
            notes += [f"warning: session {pid} ({user}) waits for a lock held by {blockers}"
                      for pid, user, blockers in cur.fetchall()]
        rows = db_migrations.applied(conn)
    finally:
        conn.close()
    if rows or migrations_dir.is_dir():
        try:
            state = db_migrations.status(db_migrations.discover(migrations_dir), rows)
        except UsageError as exc:
            problems.append(str(exc))
        else:
            notes.append(f"migration: {state['current'] or 'none applied'}, {len(state['pending'])} pending")
            problems += [f"migration {d['id']}: {d['detail']}" for d in state["drift"]]
    return problems, notes
