"""Schema migrations for database_rollback.py: golang-migrate's file layout, the tracking table
public.schema_migrations (with its dirty marks), and the status of one against the other. Applying them is
in database.migrate, undoing them in database.migration_rollback, their SQL as a script in
database.migration_sql, baseline, force and repair in database.migration_admin."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from common.components import DATABASE
from common.errors import ToolkitError, UsageError
from database.server import DbServer
from database.sessions import set_lock_timeout
from database.sql import read_sql, sha256

if TYPE_CHECKING:
    from psycopg2.extensions import connection

NO_TRANSACTION_MARK = "-- rollback: no-transaction"
MAX_VERSION = 2**63 - 1  # the tracking table stores versions as bigint

_FILE_NAME = re.compile(r"(?P<digits>\d+)_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<direction>up|down)\.sql")
_REF = re.compile(r"(?P<digits>\d+)(?:_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*))?")

CREATE_TRACKING_TABLE = """
CREATE TABLE IF NOT EXISTS public.schema_migrations (
    version bigint PRIMARY KEY,
    name text NOT NULL,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms integer,
    dirty boolean NOT NULL DEFAULT false
)"""
# Tables made before dirty marks existed get the column the first time a migrator holds the lock.
ADD_DIRTY_COLUMN = "ALTER TABLE public.schema_migrations ADD COLUMN IF NOT EXISTS dirty boolean NOT NULL DEFAULT false"
# The statements that keep the tracking rows: run with parameters, and written into --sql scripts with `%`.
INSERT_ROW = ("INSERT INTO public.schema_migrations (version, name, sha256, duration_ms, dirty) "
              "VALUES (%s, %s, %s, %s, %s)")
MARK_CLEAN = "UPDATE public.schema_migrations SET dirty = false, duration_ms = %s WHERE version = %s"
SET_DIRTY = "UPDATE public.schema_migrations SET dirty = %s WHERE version = %s"
DELETE_ROW = "DELETE FROM public.schema_migrations WHERE version = %s"
_TRACKING_COLUMNS = {"version", "name", "sha256", "applied_at", "duration_ms"}  # dirty may be missing: see above


@dataclass(frozen=True)
class Migration:
    """One migration's files: `<version>_<name>.up.sql` and, if it can be undone, its `.down.sql`."""

    version: int
    name: str
    id: str
    up: Path
    down: Path | None
    up_sha256: str
    up_no_transaction: bool  # the up file runs on its own, outside any transaction, marked dirty until done
    down_no_transaction: bool  # the down file runs on its own, outside the rollback transaction


@dataclass(frozen=True)
class Applied:
    """One row of public.schema_migrations."""

    version: int
    name: str
    sha256: str
    applied_at: datetime
    duration_ms: int | None
    dirty: bool = False  # a no-transaction file of this version failed part-way (or is running now)

    @property
    def id(self) -> str:
        # The table stores the version as a number, so the id is rebuilt with the usual three-digit padding.
        return f"{self.version:03d}_{self.name}"


# -- files ------------------------------------------------------------------------------------------


def discover(folder: Path) -> list[Migration]:
    """The migrations in `folder`, sorted by version; a malformed, duplicated or orphaned file is a UsageError."""
    if not folder.is_dir():
        raise UsageError(f"MIGRATIONS_DIR {folder} is not a folder: point MIGRATIONS_DIR at the folder of "
                         "<version>_<name>.up.sql and .down.sql files")
    found: dict[tuple[int, str], tuple[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        # Only .sql files are migrations, so a README or .gitkeep may sit beside them.
        if path.name.startswith(".") or path.suffix != ".sql" or not path.is_file():
            continue
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise UsageError(f"{path}: not a migration file name; expected <version>_<name>.up.sql or "
                             "<version>_<name>.down.sql, e.g. 001_initial_schema.up.sql")
        version = int(match["digits"])
        if version > MAX_VERSION:
            raise UsageError(f"{path}: version {version} does not fit the tracking table's bigint")
        key = (version, match["direction"])
        if key in found:
            raise UsageError(f"{path} and {found[key][1].name} have the same version {version}: "
                             "give each migration its own number")
        found[key] = (f"{match['digits']}_{match['name']}", path)
    for (version, direction), (ident, path) in found.items():
        if direction == "down" and found.get((version, "up"), ("",))[0] != ident:
            raise UsageError(f"{path}: there is no up file {ident}.up.sql for this down file")
    migrations = []
    for (version, direction), (ident, path) in sorted(found.items()):
        if direction == "up":
            down = found.get((version, "down"), (None, None))[1]
            migrations.append(Migration(
                version=version, name=ident.partition("_")[2], id=ident, up=path, down=down,
                up_sha256=sha256(path), up_no_transaction=_no_transaction(path),
                down_no_transaction=down is not None and _no_transaction(down),
            ))
    return migrations


def _no_transaction(path: Path) -> bool:
    """Whether a migration file's first line is the `-- rollback: no-transaction` mark."""
    first_line = read_sql(path).partition("\n")[0]
    return " ".join(first_line.split()).lower() == NO_TRANSACTION_MARK


# -- the tracking table -----------------------------------------------------------------------------


def applied(conn: connection) -> list[Applied]:
    """Rows of public.schema_migrations by version; empty if the table does not exist (it is not created)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        columns = _tracking_columns(cur)
        missing = _TRACKING_COLUMNS - columns
        if missing:
            # golang-migrate and other tools use the same table name with other columns.
            raise ToolkitError(f"public.schema_migrations exists but lacks {', '.join(sorted(missing))}: it was "
                               "made by another migration tool; rename it before using this one")
        dirty = "dirty" if "dirty" in columns else "false"
        cur.execute(f"SELECT version, name, sha256, applied_at, duration_ms, {dirty} FROM public.schema_migrations "
                    "ORDER BY version")
        return [Applied(*row) for row in cur.fetchall()]


def _tracking_columns(cur) -> set[str]:
    cur.execute("SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = 'schema_migrations'")
    return {row[0] for row in cur.fetchall()}


def prepare_tracking_table(conn: connection, lock_timeout: int) -> None:
    """Create public.schema_migrations, or add the dirty column to one made before it; call under the lock."""
    with conn.cursor() as cur:
        cur.execute(CREATE_TRACKING_TABLE)
        # ALTER TABLE takes an exclusive lock even when the column is there: only when it is missing, and
        # under lock_timeout, so that a pg_dump reading the table never makes every migrator queue.
        if "dirty" not in _tracking_columns(cur):
            set_lock_timeout(cur, lock_timeout, local=True)
            cur.execute(ADD_DIRTY_COLUMN)
    conn.commit()


def refuse_dirty(rows: list[Applied], migrations: list[Migration], dbname: str) -> None:
    """A ToolkitError naming the dirty version if a no-transaction migration failed part-way."""
    dirty = [row for row in rows if row.dirty]
    if dirty:
        ident = display_id(dirty[0].id, migrations)
        raise ToolkitError(f"{dbname} is dirty at {ident}: it ran outside a transaction and did not finish; "
                           f"finish or undo it by hand, then record the version the schema is at with "
                           f"`{DATABASE.script} force VERSION`")


def current_id(applied: list[Applied]) -> str | None:
    """The newest applied migration's id, or None when nothing is applied."""
    return max(applied, key=lambda row: row.version).id if applied else None


def find(migrations: list[Migration], applied: list[Applied], ref: str) -> Migration | Applied:
    """The migration `ref` names: an id (`001_initial_schema`) or a version (`1`, `001`); files win over rows."""
    match = _REF.fullmatch(ref.strip())
    if match is None:
        raise UsageError(f"{ref!r} is not a migration id or version: expected e.g. 001_initial_schema or 1")
    version, name = int(match["digits"]), match["name"]
    for candidate in [*migrations, *applied]:
        if candidate.version == version and name in (None, candidate.name):
            return candidate
    known = sorted({m.version: m.id for m in [*applied, *migrations]}.items())
    raise UsageError(f"no migration {ref!r}; known: {', '.join(i for _, i in known) or 'none'}")


def status(migrations: list[Migration], applied: list[Applied]) -> dict:
    """Applied and pending migrations, and drift: applied up files changed since, or missing."""
    files = {(m.version, m.name): m for m in migrations}
    done = {row.version for row in applied}
    current = max(done, default=None)
    drift = []
    for row in applied:
        migration = files.get((row.version, row.name))
        if migration is None:
            drift.append({"id": row.id, "problem": "missing", "detail": f"no {row.id}.up.sql in MIGRATIONS_DIR"})
        elif migration.up_sha256 != row.sha256:
            drift.append({"id": migration.id, "problem": "changed",
                          "detail": f"{migration.up.name} changed since it was applied"})
    return {
        "current": display_id(current_id(applied), migrations),
        "applied": [{"id": display_id(row.id, migrations), "applied_at": row.applied_at.isoformat(),
                     "duration_ms": row.duration_ms, "dirty": row.dirty} for row in applied],
        "dirty": [display_id(row.id, migrations) for row in applied if row.dirty],
        "pending": [m.id for m in migrations if m.version not in done],
        # Pending but older than the current version: migrate refuses these (see database.migrate).
        "out_of_order": [m.id for m in migrations if m.version not in done and current is not None
                         and m.version < current],
        "drift": drift,
    }


def display_id(ident: str | None, migrations: list[Migration]) -> str | None:
    """How the id of an applied row is shown: as its file names it (`1_x` rather than the rebuilt `001_x`)."""
    by_rebuilt_id = {f"{m.version:03d}_{m.name}": m.id for m in migrations}
    return by_rebuilt_id.get(ident, ident) if ident else None


def read_applied(server: DbServer) -> list[Applied]:
    """The rows of DB_NAME's public.schema_migrations (empty before the first migrate)."""
    with server.session() as conn:
        return applied(conn)


def read_current(server: DbServer) -> str | None:
    """The id of DB_NAME's newest applied migration, or None (no tracking table yet)."""
    return current_id(read_applied(server))
