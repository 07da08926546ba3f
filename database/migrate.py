"""Applying pending migrations: each in its own transaction with its row in public.schema_migrations,
under the migration lock and lock_timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from common.errors import ToolkitError, UsageError
from database.migrations import (
    CREATE_TRACKING_TABLE,
    MAX_VERSION,
    Applied,
    Migration,
    applied,
    current_id,
    find,
    status,
)
from database.server import DbServer
from database.sessions import LOCK_NOT_AVAILABLE, BlockerWatch, abandon, blocked_by, migration_lock, set_lock_timeout
from database.sql import ScriptError, execute_script, pg_error, read_sql, refuse_transaction_control

if TYPE_CHECKING:
    from psycopg2.extensions import connection


class MigrationFailed(ToolkitError):
    """A migration failed and was rolled back; `applied` lists the ids applied before it in this run."""

    def __init__(self, message: str, applied: list[str], blockers: list[dict]):
        super().__init__(message)
        self.applied = applied
        self.blockers = blockers


def migrate(server: DbServer, migrations: list[Migration], target: str | None = None,
            progress: Callable[[str], None] = lambda message: None) -> list[str]:
    """Apply pending migrations up to `target` (default all), each in its own transaction with its tracking
    row and under lock_timeout = server.lock_timeout; returns the ids applied. Changed applied files, or a
    BEGIN/COMMIT in a pending file, are refused before anything runs."""
    conn = server.connect()
    done: list[str] = []
    try:
        with migration_lock(conn, server.name):
            with conn.cursor() as cur:
                cur.execute(CREATE_TRACKING_TABLE)
            conn.commit()
            rows = applied(conn)
            conn.commit()
            drift = [d["detail"] for d in status(migrations, rows)["drift"] if d["problem"] == "changed"]
            if drift:
                raise ToolkitError(f"{'; '.join(drift)}: put the applied files back as they were and add a new "
                                   "migration for the change")
            todo = _pending(migrations, rows, target)
            texts = {m.version: read_sql(m.up) for m in todo}
            for migration in todo:
                refuse_transaction_control(migration.up, texts[migration.version])
            with BlockerWatch(server, conn.get_backend_pid()) as watch:
                for migration in todo:
                    progress(f"applying {migration.id}")
                    watch.clear()
                    _apply_one(conn, migration, texts[migration.version], server.lock_timeout, watch, done)
                    done.append(migration.id)
    finally:
        conn.close()
    return done


def _apply_one(conn: connection, migration: Migration, text: str, lock_timeout: int, watch: BlockerWatch,
               done: list[str]) -> None:
    import psycopg2

    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            set_lock_timeout(cur, lock_timeout, local=True)
            execute_script(cur, migration.up, text)
            cur.execute("INSERT INTO public.schema_migrations (version, name, sha256, duration_ms) "
                        "VALUES (%s, %s, %s, %s)", (migration.version, migration.name, migration.up_sha256,
                                                    round((time.monotonic() - started) * 1000)))
        conn.commit()
    except (ScriptError, psycopg2.Error) as failure:
        abandon(conn)
        timed_out = failure.pgcode == LOCK_NOT_AVAILABLE
        blockers = watch.blockers() if timed_out else []
        where = (failure.describe() if isinstance(failure, ScriptError)
                 else f"{migration.up.name}: {pg_error(failure)}")
        earlier = f"; applied before it: {', '.join(done)}" if done else ""
        raise MigrationFailed(f"{where}{blocked_by(blockers, lock_timeout) if timed_out else ''}; "
                              f"{migration.id} was rolled back and is not applied{earlier}", list(done), blockers
                              ) from None


def _pending(migrations: list[Migration], rows: list[Applied], target: str | None) -> list[Migration]:
    done = {row.version for row in rows}
    current = max(done, default=None)
    limit = MAX_VERSION
    if target is not None:
        wanted = find(migrations, rows, target)
        if current is not None and wanted.version < current:
            raise UsageError(f"{wanted.id} is older than the current version {current_id(rows)}: "
                             f"to go back, use `rollback {wanted.id}`")
        limit = wanted.version
    # Applying an older file after newer ones would make the version order lie about what rollback undoes.
    late = [m.id for m in migrations if m.version not in done and current is not None and m.version < current]
    if late:
        raise UsageError(f"{', '.join(late)} not applied but older than the current version {current_id(rows)}: "
                         "renumber them above it")
    return [m for m in migrations if m.version not in done and m.version <= limit]
