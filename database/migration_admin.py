"""The `baseline`, `force` and `repair` commands: public.schema_migrations set without running migrations, to
adopt a database made without the toolkit, to record the version a failed no-transaction migration left, and
to re-record the checksums of applied files edited since. Each asks first and holds the migration lock."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from database.context import DbContext
from database.migrations import (
    INSERT_ROW,
    Applied,
    Migration,
    applied,
    current_id,
    discover,
    display_id,
    find,
    prepare_tracking_table,
    read_applied,
)
from database.server import DbServer
from database.sessions import migration_lock

if TYPE_CHECKING:
    from psycopg2.extensions import connection

NONE_APPLIED = -1  # the version `force 0` sets when no migration is numbered 0: nothing applied
_DONE = {"remove": "removed", "record": "recorded", "clear": "cleared", "re-record": "re-recorded"}


def baseline_command(ctx: Context) -> Result:
    """baseline VERSION: record VERSION and every migration below it as applied, without running them."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    target = find(migrations, [], ctx.args.version)
    _refuse_recorded(read_applied(db.server), migrations, db.server.name)
    todo = [m for m in migrations if m.version <= target.version]
    actions = [("record", f"{m.id} as applied (sha256 {m.up_sha256}) without running it") for m in todo]
    if ctx.dry_run:
        return _planned(actions, {"baseline": [m.id for m in todo]})
    ctx.confirm(f"Record {len(todo)} migration(s), up to {target.id}, as applied to {db.server.name} without "
                "running them?")
    with _locked(db.server) as conn:
        _refuse_recorded(applied(conn), migrations, db.server.name)
        with conn.cursor() as cur:
            for migration in todo:
                cur.execute(INSERT_ROW, (migration.version, migration.name, migration.up_sha256, None, False))
        conn.commit()
    return _done(actions, {"baseline": [m.id for m in todo], "current": target.id},
                 f"{db.server.name} is now at {target.id}")


def force_command(ctx: Context) -> Result:
    """force VERSION: VERSION's row recorded and clean, the rows above it removed, no dirty mark left."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    rows = read_applied(db.server)
    target = _force_target(migrations, rows, ctx.args.version)
    version = target.version if target else NONE_APPLIED
    label = display_id(target.id, migrations) if target else "no migration"
    above = [row for row in reversed(rows) if row.version > version]
    record = target if isinstance(target, Migration) and target.version not in {r.version for r in rows} else None
    actions = [("remove", f"the row of {display_id(row.id, migrations)} (sha256 {row.sha256}"
                          f"{', dirty' if row.dirty else ''})") for row in above]
    actions += [("record", f"{record.id} as applied (sha256 {record.up_sha256}) without running it")] if record else []
    actions += [("clear", f"the dirty mark of {display_id(row.id, migrations)}")
                for row in rows if row.dirty and row.version <= version]
    data = {"current": label if target else None, "removed": [display_id(r.id, migrations) for r in above],
            "recorded": record.id if record else None}
    if not actions:
        return Result({**data, "changed": False}, [f"{db.server.name} is at {label}, nothing dirty: nothing to do"])
    if ctx.dry_run:
        return _planned(actions, data)
    ctx.confirm(f"Set the recorded version of {db.server.name} to {label} (the tracking table only; the schema is "
                "left as it is)?")
    with _locked(db.server) as conn:
        _refuse_changed(applied(conn), rows)
        with conn.cursor() as cur:
            cur.execute("DELETE FROM public.schema_migrations WHERE version > %s", (version,))
            if record:
                cur.execute(INSERT_ROW, (record.version, record.name, record.up_sha256, None, False))
            cur.execute("UPDATE public.schema_migrations SET dirty = false WHERE dirty")
        conn.commit()
    return _done(actions, {**data, "changed": True}, f"{db.server.name} is now at {label}")


def repair_command(ctx: Context) -> Result:
    """repair: re-record the checksums of applied up files whose text changed since."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    rows = read_applied(db.server)
    files = {(m.version, m.name): m for m in migrations}
    changed = [(row, files[row.version, row.name]) for row in rows
               if (row.version, row.name) in files and files[row.version, row.name].up_sha256 != row.sha256]
    notes = [f"no file for {row.id}: its row is left as it is" for row in rows if (row.version, row.name) not in files]
    actions = [("re-record", f"{m.up.name}: sha256 {row.sha256} -> {m.up_sha256}") for row, m in changed]
    data = {"repaired": [{"file": m.up.name, "old_sha256": row.sha256, "new_sha256": m.up_sha256}
                         for row, m in changed]}
    if not actions:
        return Result(data, ["nothing to repair: every applied file matches its recorded checksum", *notes])
    if ctx.dry_run:
        return _planned(actions, data)
    ctx.confirm(f"Record the text of {len(changed)} changed file(s) as what was applied to {db.server.name}? "
                "The schema keeps what the old text did")
    with _locked(db.server) as conn, conn.cursor() as cur:
        for row, migration in changed:
            cur.execute("UPDATE public.schema_migrations SET sha256 = %s WHERE version = %s AND sha256 = %s",
                        (migration.up_sha256, row.version, row.sha256))
            if cur.rowcount != 1:
                raise ToolkitError(f"the row of {row.id} changed since it was read: run repair again")
        conn.commit()
    return _done(actions, data, *notes)


@contextmanager
def _locked(server: DbServer) -> Iterator[connection]:
    """A connection holding the migration lock, with the tracking table ready; rolled back unless committed."""
    conn = server.connect()
    try:
        with migration_lock(conn, server.name):
            prepare_tracking_table(conn, server.lock_timeout)
            yield conn
    finally:
        conn.close()


def _force_target(migrations: list[Migration], rows: list[Applied], ref: str) -> Migration | Applied | None:
    """The migration `force` sets the version to; None for `0` (nothing applied) unless one is numbered 0."""
    if re.fullmatch(r"0+", ref.strip()) and all(item.version != 0 for item in [*migrations, *rows]):
        return None
    return find(migrations, rows, ref)


def _refuse_recorded(rows: list[Applied], migrations: list[Migration], dbname: str) -> None:
    if rows:
        raise UsageError(f"{dbname} already records migrations (at {display_id(current_id(rows), migrations)}): "
                         "baseline is for a database that records none; `status` shows them")


def _refuse_changed(now: list[Applied], planned: list[Applied]) -> None:
    # Another migrate may have run between the question and the lock: what was confirmed would be wrong.
    if [(r.version, r.sha256, r.dirty) for r in now] != [(r.version, r.sha256, r.dirty) for r in planned]:
        raise ToolkitError("the applied migrations changed since they were read: nothing was changed; run it again")


def _planned(actions: list[tuple[str, str]], data: dict) -> Result:
    return Result({"dry_run": True, **data}, [f"would {verb} {what}" for verb, what in actions], report=True)


def _done(actions: list[tuple[str, str]], data: dict, *more: str) -> Result:
    return Result(data, [f"{_DONE[verb]} {what}" for verb, what in actions] + list(more))
