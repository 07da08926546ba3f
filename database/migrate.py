"""Applying pending migrations under the migration lock and lock_timeout: each in its own transaction with
its row in public.schema_migrations, or, marked `-- rollback: no-transaction`, on its own outside any
transaction, its row marked dirty until it has run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from common.components import DATABASE
from common.errors import ToolkitError, UsageError
from database.migrations import (
    INSERT_ROW,
    MARK_CLEAN,
    MAX_VERSION,
    Applied,
    Migration,
    applied,
    current_id,
    find,
    prepare_tracking_table,
    refuse_dirty,
    status,
)
from database.server import DbServer
from database.sessions import (
    LOCK_NOT_AVAILABLE,
    BlockerWatch,
    abandon,
    autocommit,
    blocked_by,
    migration_lock,
    set_lock_timeout,
)
from database.sql import ScriptError, execute_script, pg_error, read_sql, refuse_transaction_control

if TYPE_CHECKING:
    from psycopg2.extensions import connection



class MigrationFailed(ToolkitError):
    """A migration failed; `applied` lists the ids applied before it in this run."""

    def __init__(self, message: str, applied: list[str], blockers: list[dict]):
        super().__init__(message)
        self.applied = applied
        self.blockers = blockers


def migrate(server: DbServer, migrations: list[Migration], target: str | None = None,
            progress: Callable[[str], None] = lambda message: None, allow_out_of_order: bool = False) -> list[str]:
    """Apply pending migrations up to `target` (default all) under lock_timeout = server.lock_timeout; returns
    the ids applied. A dirty mark, changed applied files, a pending file older than the newest applied one
    (unless allow_out_of_order) or a BEGIN/COMMIT in a transactional file are refused before anything runs."""
    conn = server.connect()
    done: list[str] = []
    try:
        with migration_lock(conn, server.name):
            prepare_tracking_table(conn, server.lock_timeout)
            rows = applied(conn)
            conn.commit()
            refuse_dirty(rows, migrations, server.name)
            refuse_drift(migrations, rows)
            todo = pending(migrations, rows, target, allow_out_of_order)
            texts = {m.version: read_sql(m.up) for m in todo}
            for migration in todo:
                if not migration.up_no_transaction:
                    refuse_transaction_control(migration.up, texts[migration.version])
            with BlockerWatch(server, conn.get_backend_pid()) as watch:
                for migration in todo:
                    watch.clear()
                    if migration.up_no_transaction:
                        progress(f"applying {migration.id} (outside a transaction)")
                        _apply_alone(conn, migration, texts[migration.version], server.lock_timeout, watch, done)
                    else:
                        progress(f"applying {migration.id}")
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
            cur.execute(INSERT_ROW, (migration.version, migration.name, migration.up_sha256,
                                     round((time.monotonic() - started) * 1000), False))
        conn.commit()
    except (ScriptError, psycopg2.Error) as failure:
        abandon(conn)
        raise _failed(failure, migration, lock_timeout, watch, done,
                      f"{migration.id} was rolled back and is not applied") from None


def _apply_alone(conn: connection, migration: Migration, text: str, lock_timeout: int, watch: BlockerWatch,
                 done: list[str]) -> None:
    """Run a no-transaction up file statement by statement in autocommit; its row is committed dirty first,
    so that a failure (or a kill) part-way leaves a mark every later migrate and rollback stops at."""
    import psycopg2

    try:
        with conn.cursor() as cur:
            cur.execute(INSERT_ROW, (migration.version, migration.name, migration.up_sha256, None, True))
        conn.commit()
    except psycopg2.Error as failure:
        abandon(conn)
        raise _failed(failure, migration, lock_timeout, watch, done, f"{migration.id} did not start") from None
    started = time.monotonic()
    try:
        with autocommit(conn), conn.cursor() as cur:
            set_lock_timeout(cur, lock_timeout, local=False)  # the connection is ours alone
            execute_script(cur, migration.up, text)
            cur.execute(MARK_CLEAN, (round((time.monotonic() - started) * 1000), migration.version))
    except (ScriptError, psycopg2.Error) as failure:
        ran = failure.statements_done if isinstance(failure, ScriptError) else None
        state = f"its {ran} statement(s) before the failing one stay done; " if ran else ""
        raise _failed(failure, migration, lock_timeout, watch, done,
                      f"{migration.id} ran outside a transaction: {state}it is marked dirty; finish or undo it by "
                      f"hand, then `{DATABASE.script} force VERSION` records the version the schema is at") from None


def _failed(failure: Exception, migration: Migration, lock_timeout: int, watch: BlockerWatch, done: list[str],
            state: str) -> MigrationFailed:
    timed_out = failure.pgcode == LOCK_NOT_AVAILABLE
    blockers = watch.blockers() if timed_out else []
    where = failure.describe() if isinstance(failure, ScriptError) else f"{migration.up.name}: {pg_error(failure)}"
    earlier = f"; applied before it: {', '.join(done)}" if done else ""
    return MigrationFailed(f"{where}{blocked_by(blockers, lock_timeout) if timed_out else ''}; {state}{earlier}",
                           list(done), blockers)


def refuse_drift(migrations: list[Migration], rows: list[Applied]) -> None:
    """A ToolkitError if an applied up file changed since it was applied."""
    drift = [d["detail"] for d in status(migrations, rows)["drift"] if d["problem"] == "changed"]
    if drift:
        raise ToolkitError(f"{'; '.join(drift)}: put the applied files back as they were and add a new migration "
                           f"for the change (or, if the change is only cosmetic, `{DATABASE.script} repair`)")


def pending(migrations: list[Migration], rows: list[Applied], target: str | None,
            allow_out_of_order: bool = False) -> list[Migration]:
    """The migrations `migrate [target]` applies, in version order; a UsageError for an applied target below
    the current version, or for pending files below it unless allow_out_of_order."""
    done = {row.version for row in rows}
    current = max(done, default=None)
    limit = MAX_VERSION
    if target is not None:
        wanted = find(migrations, rows, target)
        if current is not None and wanted.version < current and wanted.version in done:
            raise UsageError(f"{wanted.id} is older than the current version {current_id(rows)}: "
                             f"to go back, use `rollback {wanted.id}`")
        limit = wanted.version
    # Applying an older file after newer ones makes the version order lie about what rollback undoes.
    late = [m.id for m in out_of_order(migrations, rows) if m.version <= limit]
    if late and not allow_out_of_order:
        raise UsageError(f"{', '.join(late)} not applied but older than the current version {current_id(rows)}: "
                         "renumber them above it, or apply them anyway with --allow-out-of-order")
    return [m for m in migrations if m.version not in done and m.version <= limit]


def out_of_order(migrations: list[Migration], rows: list[Applied]) -> list[Migration]:
    """Pending migrations older than the newest applied one."""
    done = {row.version for row in rows}
    current = max(done, default=None)
    return [m for m in migrations if m.version not in done and current is not None and m.version < current]
