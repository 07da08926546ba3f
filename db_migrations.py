"""Schema migrations for database_rollback.py: golang-migrate's file layout, the tracking table
public.schema_migrations, forward migrations (one transaction each) and rollbacks (one transaction for all)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import LockBusy, ToolkitError, UsageError
from db_server import DbServer

if TYPE_CHECKING:
    from psycopg2.extensions import connection

NO_TRANSACTION_MARK = "-- rollback: no-transaction"
# migrate and rollback take the same advisory lock; advisory locks are per database, so other databases are free.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"database_rollback.migrate").digest()[:8], "big", signed=True)
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of an expired lock_timeout
_POLL_SECONDS = 0.05
_QUERY_CHARS = 200
_MAX_VERSION = 2**63 - 1  # the tracking table stores versions as bigint

_FILE_NAME = re.compile(r"(?P<digits>\d+)_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<direction>up|down)\.sql")
_REF = re.compile(r"(?P<digits>\d+)(?:_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*))?")
_TRANSACTION_CONTROL = re.compile(r"(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT)\b(?!\s+(TO|PREPARED)\b)",
                                  re.I)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")

_CREATE_TRACKING_TABLE = """
CREATE TABLE IF NOT EXISTS public.schema_migrations (
    version bigint PRIMARY KEY,
    name text NOT NULL,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms integer
)"""
_TRACKING_COLUMNS = {"version", "name", "sha256", "applied_at", "duration_ms"}
_DELETE_TRACKING_ROW = "DELETE FROM public.schema_migrations WHERE version = %s"


class MissingDownFile(ToolkitError):
    """A rollback would pass migrations that cannot be undone by a down file; `versions`/`ids` name them."""

    def __init__(self, message: str, missing: list[tuple[int, str]]):
        super().__init__(message)
        self.versions = [version for version, _ in missing]
        self.ids = [ident for _, ident in missing]


class MigrationFailed(ToolkitError):
    """A migration failed and was rolled back; `applied` lists the ids applied before it in this run."""

    def __init__(self, message: str, applied: list[str], blockers: list[dict]):
        super().__init__(message)
        self.applied = applied
        self.blockers = blockers


class RollbackFailed(ToolkitError):
    """A rollback failed; `rolled_back` lists the ids already undone (only before a no-transaction step)."""

    def __init__(self, message: str, rolled_back: list[str], blockers: list[dict]):
        super().__init__(message)
        self.rolled_back = rolled_back
        self.blockers = blockers


@dataclass(frozen=True)
class Migration:
    """One migration's files: `<version>_<name>.up.sql` and, if it can be undone, its `.down.sql`."""

    version: int
    name: str
    id: str
    up: Path
    down: Path | None
    up_sha256: str
    no_transaction: bool  # the down file runs on its own, outside the rollback transaction


@dataclass(frozen=True)
class Applied:
    """One row of public.schema_migrations."""

    version: int
    name: str
    sha256: str
    applied_at: datetime
    duration_ms: int | None

    @property
    def id(self) -> str:
        # The table stores the version as a number, so the id is rebuilt with the usual three-digit padding.
        return f"{self.version:03d}_{self.name}"


@dataclass(frozen=True)
class RollbackStep:
    """One migration to undo, with the down SQL as read when the plan was made (what --dry-run showed)."""

    version: int
    id: str
    file: Path
    sql: str
    no_transaction: bool


@dataclass
class RollbackPlan:
    """Applied migrations above the target, newest first; an empty plan means already at the target."""

    target_id: str
    target_version: int
    current_id: str | None
    steps: list[RollbackStep]
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The plan and every statement it would run, for --dry-run."""
        if not self.steps:
            return f"already at {self.target_id}: nothing to roll back"
        lines = [f"roll back {len(self.steps)} migration(s), from {self.current_id} to {self.target_id}"]
        lines += [f"warning: {warning}" for warning in self.warnings]
        for number, batch in enumerate(_batches(self.steps), 1):
            how = "on its own, outside any transaction" if batch[0].no_transaction else "in one transaction"
            lines.append(f"\n-- part {number}, {how}")
            for step in batch:
                lines += [f"-- {step.file.name}", step.sql.strip(), _DELETE_TRACKING_ROW % step.version + ";"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The plan as JSON-ready data, SQL included."""
        return {
            "current": self.current_id,
            "target": self.target_id,
            "steps": [{"id": s.id, "file": s.file.name, "no_transaction": s.no_transaction, "sql": s.sql}
                      for s in self.steps],
            "warnings": self.warnings,
        }


@dataclass
class RollbackOutcome:
    """What run_rollback did: the ids undone, newest first, and the sessions it ended."""

    target_id: str
    rolled_back: list[str] = field(default_factory=list)
    terminated: list[dict] = field(default_factory=list)


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
        if version > _MAX_VERSION:
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
            first_line = _read_sql(down).partition("\n")[0] if down else ""
            migrations.append(Migration(
                version=version, name=ident.partition("_")[2], id=ident, up=path, down=down,
                up_sha256=_sha256(path), no_transaction=" ".join(first_line.split()).lower() == NO_TRANSACTION_MARK,
            ))
    return migrations


def _read_sql(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _statements(text: str) -> list[tuple[int, str]]:
    """Top-level statements of a script as (offset of their first token, text), split the way psql does:
    semicolons in quotes, comments, dollar-quoted and BEGIN ATOMIC ... END bodies do not split."""
    statements: list[tuple[int, str]] = []
    first: int | None = None
    words: list[str] = []
    routine, depth, i = False, 0, 0
    while i < len(text):
        char = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if text.startswith("/*", i):  # block comments nest in PostgreSQL
            depth_of_comment, i = 1, i + 2
            while i < len(text) and depth_of_comment:
                depth_of_comment += text.startswith("/*", i) - text.startswith("*/", i)
                i += 2 if text.startswith(("/*", "*/"), i) else 1
            continue
        if char == ";" and depth == 0:
            if first is not None:
                statements.append((first, text[first:i]))
            first, words, routine, i = None, [], False, i + 1
            continue
        if first is None and not char.isspace():
            first = i
        after_word = i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_$")
        dollar = _DOLLAR_QUOTE.match(text, i) if char == "$" and not after_word else None
        word = _WORD.match(text, i) if not after_word else None
        if char in "'\"":
            escapes = char == "'" and i > 0 and text[i - 1] in "eE"  # E'...' strings take backslash escapes
            i += 1
            while i < len(text) and text[i] != char:
                i += 2 if escapes and text[i] == "\\" else 1
            i += 1  # a doubled quote closes one string and opens the next: same result
        elif dollar:
            close = text.find(dollar.group(), dollar.end())
            i = len(text) if close < 0 else close + len(dollar.group())
        elif word:
            # A SQL-standard routine body (BEGIN ATOMIC ... END, with CASE ... END inside) holds semicolons.
            keyword = word.group().upper()
            if len(words) < 4:
                words.append(keyword)
                routine = words[0] == "CREATE" and not {"FUNCTION", "PROCEDURE"}.isdisjoint(words)
            elif routine and keyword in ("BEGIN", "CASE"):
                depth += 1
            elif routine and keyword == "END" and depth:
                depth -= 1
            i = word.end()
        else:
            i += 1
    if first is not None:
        statements.append((first, text[first:]))
    return statements


def _execute_script(cur, path: Path, text: str) -> None:
    """Run a script one statement at a time, so that a failure names its line even when PostgreSQL gives
    no position, and so that DROP INDEX CONCURRENTLY is not inside an implicit multi-statement block."""
    import psycopg2

    for done, (offset, statement) in enumerate(_statements(text)):
        try:
            cur.execute(statement)
        except psycopg2.Error as exc:
            raise _ScriptError(path, text, offset, exc, done) from exc


class _ScriptError(Exception):
    def __init__(self, path: Path, text: str, offset: int, exc: Exception, statements_done: int):
        super().__init__(str(exc))
        self.path, self.exc, self.statements_done = path, exc, statements_done
        self.pgcode = getattr(exc, "pgcode", None)
        self.line = text.count("\n", 0, offset) + 1
        position = getattr(getattr(exc, "diag", None), "statement_position", None)
        if position and position.isdigit():  # the server pointed inside the statement: a more precise line
            self.line = text.count("\n", 0, offset + int(position) - 1) + 1

    def describe(self) -> str:
        return f"{self.path.name}, line {self.line}: {_pg_error(self.exc)}"


def _refuse_transaction_control(path: Path, text: str) -> None:
    for offset, statement in _statements(text):
        if _TRANSACTION_CONTROL.match(statement):
            line = text.count("\n", 0, offset) + 1
            raise UsageError(f"{path.name}, line {line}: {statement.split()[0].upper()} in a migration would end "
                             "the transaction the toolkit runs it in; remove BEGIN/COMMIT from the file")


# -- the tracking table -----------------------------------------------------------------------------


def applied(conn: connection) -> list[Applied]:
    """Rows of public.schema_migrations by version; empty if the table does not exist (it is not created)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = 'schema_migrations'")
        missing = _TRACKING_COLUMNS - {row[0] for row in cur.fetchall()}
        if missing:
            # golang-migrate and other tools use the same table name with other columns.
            raise ToolkitError(f"public.schema_migrations exists but lacks {', '.join(sorted(missing))}: it was "
                               "made by another migration tool; rename it before using this one")
        cur.execute("SELECT version, name, sha256, applied_at, duration_ms FROM public.schema_migrations "
                    "ORDER BY version")
        return [Applied(*row) for row in cur.fetchall()]


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
        "current": _display_id(current_id(applied), migrations),
        "applied": [{"id": _display_id(row.id, migrations), "applied_at": row.applied_at.isoformat(),
                     "duration_ms": row.duration_ms} for row in applied],
        "pending": [m.id for m in migrations if m.version not in done],
        # Pending but older than the current version: migrate refuses these (see _pending).
        "out_of_order": [m.id for m in migrations if m.version not in done and current is not None
                         and m.version < current],
        "drift": drift,
    }


def _display_id(ident: str | None, migrations: list[Migration]) -> str | None:
    by_rebuilt_id = {f"{m.version:03d}_{m.name}": m.id for m in migrations}
    return by_rebuilt_id.get(ident, ident) if ident else None


# -- migrate ----------------------------------------------------------------------------------------


def migrate(server: DbServer, migrations: list[Migration], target: str | None = None,
            progress: Callable[[str], None] = lambda message: None) -> list[str]:
    """Apply pending migrations up to `target` (default all), each in its own transaction with its tracking
    row and under lock_timeout = server.lock_timeout; returns the ids applied. Changed applied files, or a
    BEGIN/COMMIT in a pending file, are refused before anything runs."""
    conn = server.connect()
    done: list[str] = []
    try:
        with _migration_lock(conn, server.name):
            with conn.cursor() as cur:
                cur.execute(_CREATE_TRACKING_TABLE)
            conn.commit()
            rows = applied(conn)
            conn.commit()
            drift = [d["detail"] for d in status(migrations, rows)["drift"] if d["problem"] == "changed"]
            if drift:
                raise ToolkitError(f"{'; '.join(drift)}: put the applied files back as they were and add a new "
                                   "migration for the change")
            todo = _pending(migrations, rows, target)
            texts = {m.version: _read_sql(m.up) for m in todo}
            for migration in todo:
                _refuse_transaction_control(migration.up, texts[migration.version])
            with _BlockerWatch(server, conn.get_backend_pid()) as watch:
                for migration in todo:
                    progress(f"applying {migration.id}")
                    watch.clear()
                    _apply_one(conn, migration, texts[migration.version], server.lock_timeout, watch, done)
                    done.append(migration.id)
    finally:
        conn.close()
    return done


def _apply_one(conn: connection, migration: Migration, text: str, lock_timeout: int, watch: _BlockerWatch,
               done: list[str]) -> None:
    import psycopg2

    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            _set_lock_timeout(cur, lock_timeout, local=True)
            _execute_script(cur, migration.up, text)
            cur.execute("INSERT INTO public.schema_migrations (version, name, sha256, duration_ms) "
                        "VALUES (%s, %s, %s, %s)", (migration.version, migration.name, migration.up_sha256,
                                                    round((time.monotonic() - started) * 1000)))
        conn.commit()
    except (_ScriptError, psycopg2.Error) as failure:
        _abandon(conn)
        timed_out = failure.pgcode == LOCK_NOT_AVAILABLE
        blockers = watch.blockers() if timed_out else []
        where = (failure.describe() if isinstance(failure, _ScriptError)
                 else f"{migration.up.name}: {_pg_error(failure)}")
        earlier = f"; applied before it: {', '.join(done)}" if done else ""
        raise MigrationFailed(f"{where}{_blocked_by(blockers, lock_timeout) if timed_out else ''}; "
                              f"{migration.id} was rolled back and is not applied{earlier}", list(done), blockers
                              ) from None


def _pending(migrations: list[Migration], rows: list[Applied], target: str | None) -> list[Migration]:
    done = {row.version for row in rows}
    current = max(done, default=None)
    limit = _MAX_VERSION
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


# -- rollback ---------------------------------------------------------------------------------------


def plan_rollback(migrations: list[Migration], applied: list[Applied], ref: str) -> RollbackPlan:
    """Every applied migration above `ref` (which must be applied), newest first; refuses, before anything
    changes, if one has no down file (MissingDownFile) or a down file controls its own transaction."""
    wanted = find(migrations, applied, ref)
    by_version = {row.version: row for row in applied}
    if wanted.version not in by_version:
        raise UsageError(f"{wanted.id} is not applied (current: {current_id(applied) or 'nothing applied'}): "
                         f"rollback goes back to an applied migration; `migrate {wanted.id}` applies it")
    target = by_version[wanted.version]
    files = {(m.version, m.name): m for m in migrations}
    steps, missing, warnings = [], [], []
    for row in sorted(applied, key=lambda r: r.version, reverse=True):
        if row.version <= target.version:
            break
        migration = files.get((row.version, row.name))
        if migration is None or migration.down is None:
            missing.append((row.version, migration.id if migration else row.id))
            continue
        text = _read_sql(migration.down)
        if not migration.no_transaction:
            _refuse_transaction_control(migration.down, text)
        else:
            warnings.append(f"{migration.down.name} runs outside the rollback transaction: the steps listed "
                            "before it are committed first and stay rolled back if it fails")
        if migration.up_sha256 != row.sha256:
            warnings.append(f"{migration.up.name} changed since it was applied: its down file may not undo "
                            "what was applied")
        steps.append(RollbackStep(row.version, migration.id, migration.down, text, migration.no_transaction))
    if missing:
        names = ", ".join(ident for _, ident in missing)
        raise MissingDownFile(f"cannot roll back to {_display_id(target.id, migrations)}: no down file for "
                              f"{names}; nothing was changed", missing)
    return RollbackPlan(_display_id(target.id, migrations), target.version,
                        _display_id(current_id(applied), migrations), steps, warnings)


def run_rollback(server: DbServer, plan: RollbackPlan, lock_timeout: int, terminate_blockers: bool,
                 progress: Callable[[str], None] = lambda message: None) -> RollbackOutcome:
    """Run the plan under the migration lock: the down scripts and tracking-row deletes in one transaction
    with lock_timeout; on a lock timeout name the blockers (RollbackFailed) or, with terminate_blockers, end
    them and try once more.

    A no-transaction step splits the transaction in plan order: the steps before it are committed, it runs
    on its own in autocommit (statement by statement, then its tracking row), and the rest run in a new
    transaction. So if it fails, the steps before it stay rolled back; the plan's warnings say so.
    """
    import psycopg2

    if lock_timeout < 1:
        raise UsageError(f"the lock timeout must be at least 1 second, got {lock_timeout}")
    outcome = RollbackOutcome(plan.target_id)
    if not plan.steps:
        return outcome
    conn = server.connect()
    try:
        with _migration_lock(conn, server.name):
            _refuse_stale_plan(conn, plan)
            with _BlockerWatch(server, conn.get_backend_pid()) as watch:
                for batch in _batches(plan.steps):
                    for attempt in (1, 2):
                        watch.clear()
                        try:
                            _run_batch(conn, batch, lock_timeout, progress)
                            break
                        except (_ScriptError, psycopg2.Error) as failure:
                            _abandon(conn)
                            timed_out = failure.pgcode == LOCK_NOT_AVAILABLE
                            blockers = watch.blockers() if timed_out else []
                            if timed_out and terminate_blockers and attempt == 1:
                                outcome.terminated += _end_sessions(conn, blockers, lock_timeout, outcome, batch)
                                continue
                            raise _rollback_failed(failure, batch, blockers, outcome, lock_timeout,
                                                   terminate_blockers) from None
                    outcome.rolled_back += [step.id for step in batch]
    finally:
        conn.close()
    return outcome


def _batches(steps: list[RollbackStep]) -> list[list[RollbackStep]]:
    # Consecutive transactional steps share one transaction; each no-transaction step is a batch of its own.
    batches: list[list[RollbackStep]] = []
    for step in steps:
        if step.no_transaction or not batches or batches[-1][0].no_transaction:
            batches.append([step])
        else:
            batches[-1].append(step)
    return batches


def _run_batch(conn: connection, batch: list[RollbackStep], lock_timeout: int,
               progress: Callable[[str], None]) -> None:
    if batch[0].no_transaction:
        step = batch[0]
        progress(f"rolling back {step.id} (outside a transaction)")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                _set_lock_timeout(cur, lock_timeout, local=False)  # the connection is ours alone
                _execute_script(cur, step.file, step.sql)
                cur.execute(_DELETE_TRACKING_ROW, (step.version,))
        finally:
            if not conn.closed:
                conn.autocommit = False
        return
    with conn.cursor() as cur:
        _set_lock_timeout(cur, lock_timeout, local=True)
        for step in batch:
            progress(f"rolling back {step.id}")
            _execute_script(cur, step.file, step.sql)
            cur.execute(_DELETE_TRACKING_ROW, (step.version,))
    conn.commit()


def _refuse_stale_plan(conn: connection, plan: RollbackPlan) -> None:
    # Someone may have migrated between the plan (or --dry-run) and now; only the lock makes this check hold.
    rows = applied(conn)
    conn.commit()
    above = [row.version for row in sorted(rows, key=lambda r: r.version, reverse=True)
             if row.version > plan.target_version]
    if plan.target_version not in {row.version for row in rows} or above != [s.version for s in plan.steps]:
        raise ToolkitError(f"the applied migrations changed since the plan was made (now at {current_id(rows)}): "
                           "run the rollback again")


def _rollback_failed(failure: Exception, batch: list[RollbackStep], blockers: list[dict],
                     outcome: RollbackOutcome, lock_timeout: int, terminate_blockers: bool) -> RollbackFailed:
    if isinstance(failure, _ScriptError):
        where = failure.describe()
    else:
        where = f"committing the rollback of {', '.join(s.id for s in batch)}: {_pg_error(failure)}"
    state = "nothing changed"
    if outcome.rolled_back:
        state = (f"{', '.join(outcome.rolled_back)} stay rolled back (committed before the no-transaction step); "
                 f"nothing else changed, now at {batch[0].id}")
    if isinstance(failure, _ScriptError) and batch[0].no_transaction and failure.statements_done:
        state += (f"; {failure.path.name} runs outside a transaction, so its {failure.statements_done} "
                  "statement(s) before the failing one stay done")
    if failure.pgcode != LOCK_NOT_AVAILABLE:
        return RollbackFailed(f"rollback to {outcome.target_id} failed: {where}; it was rolled back, {state}",
                              outcome.rolled_back, blockers)
    hint = ("they were ended and it was still blocked; retry later" if terminate_blockers
            else "retry when they finish, or end them with --terminate-blockers")
    return RollbackFailed(f"rollback to {outcome.target_id} gave up: {where}"
                          f"{_blocked_by(blockers, lock_timeout)}; {state}; {hint}", outcome.rolled_back, blockers)


def _end_sessions(conn: connection, blockers: list[dict], wait_seconds: int, outcome: RollbackOutcome,
                  batch: list[RollbackStep]) -> list[dict]:
    try:
        for blocker in blockers:
            terminate(conn, blocker["pid"])
    except ToolkitError as exc:
        state = "nothing changed" if not outcome.rolled_back else f"now at {batch[0].id}"
        raise RollbackFailed(f"{exc}; {state}", outcome.rolled_back, blockers) from None
    # Wait for the ended backends to exit, so that the retry does not queue behind one still shutting down.
    pids = [blocker["pid"] for blocker in blockers]
    deadline = time.monotonic() + wait_seconds + 5
    while pids and time.monotonic() < deadline:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            left = cur.fetchone()[0]
        conn.rollback()  # pg_stat_activity is read once per transaction
        if not left:
            break
        time.sleep(_POLL_SECONDS)
    return blockers


# -- locks and sessions -----------------------------------------------------------------------------


def blocking_report(conn: connection, dbname: str) -> list[dict]:
    """Sessions on `dbname` waiting for a lock and the sessions they wait for, each with `blocked_by` and
    `blocking` pid lists. Pass an autocommit connection: pg_stat_activity is read once per transaction."""
    with conn.cursor() as cur:
        cur.execute("SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND cardinality(pg_blocking_pids(pid)) > 0", (dbname,))
        waits = dict(cur.fetchall())
        sessions = _sessions(cur, sorted(set(waits) | {pid for pids in waits.values() for pid in pids}))
    for session in sessions:
        session["blocked_by"] = waits.get(session["pid"], [])
        session["blocking"] = sorted(pid for pid, by in waits.items() if session["pid"] in by)
    return sessions


def terminate(conn: connection, pid: int) -> bool:
    """End session `pid` (pg_terminate_backend); False if there is no such session."""
    import psycopg2

    if pid == conn.get_backend_pid():
        raise UsageError(f"pid {pid} is this session itself")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            ended = bool(cur.fetchone()[0])
        if not conn.autocommit:
            conn.commit()
    except psycopg2.Error as exc:
        _abandon(conn)
        raise ToolkitError(f"could not end session {pid}: {_pg_error(exc)} (it takes a superuser, the "
                           "session's own role, or pg_signal_backend)") from None
    return ended


def _sessions(cur, pids: list[int]) -> list[dict]:
    if not pids:
        return []
    cur.execute("SELECT pid, usename, application_name, state, xact_start, state_change, query "
                "FROM pg_stat_activity WHERE pid = ANY(%s) ORDER BY pid", (list(pids),))
    sessions = []
    for pid, user, application, state, xact_start, state_change, query in cur.fetchall():
        since = xact_start or state_change
        sessions.append({
            "pid": pid, "user": user, "application": application or "", "state": state or "unknown",
            "since": since.isoformat(timespec="seconds") if since else None,
            "xact_start": xact_start.isoformat(timespec="seconds") if xact_start else None,
            "state_change": state_change.isoformat(timespec="seconds") if state_change else None,
            "query": " ".join((query or "").split())[:_QUERY_CHARS],
        })
    return sessions


def _describe_session(session: dict) -> str:
    since = f" since {session['since']}" if session["since"] else ""
    return (f"pid {session['pid']} (user {session['user']}, application {session['application'] or '-'}, "
            f"{session['state']}{since}, query: {session['query'] or '-'})")


def _blocked_by(blockers: list[dict], lock_timeout: int) -> str:
    if not blockers:
        return f" after waiting {lock_timeout} s for locks (the holders finished before they could be named)"
    return f" after waiting {lock_timeout} s for locks held by " + "; ".join(map(_describe_session, blockers))


class _BlockerWatch:
    """The sessions a work connection waits for, polled from a second connection while it waits.

    pg_blocking_pids() during the wait names exactly the sessions the lock manager makes it wait for,
    including waits on transaction ids and sessions queued ahead of it. Asking after the timeout who holds
    locks on the relations the SQL touches would need the SQL parsed (functions, cascades, types) and would
    miss or misname sessions that changed in the meantime.
    """

    def __init__(self, server: DbServer, pid: int):
        self._server, self._pid = server, pid
        self._latest: list[dict] = []
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn = None

    def __enter__(self) -> _BlockerWatch:
        try:
            # Autocommit: each poll is its own transaction, so pg_stat_activity is fresh each time.
            self._conn = self._server.connect(autocommit=True)
        except ToolkitError:
            return self  # naming blockers is a diagnosis aid: the work goes on without it
        self._thread = threading.Thread(target=self._poll, name="blocker-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            self._conn.close()

    def _poll(self) -> None:
        import psycopg2

        while not self._stop.is_set():
            try:
                with self._conn.cursor() as cur:
                    cur.execute("SELECT pg_blocking_pids(%s)", (self._pid,))
                    found = _sessions(cur, cur.fetchone()[0])
            except psycopg2.Error:
                return
            if found:  # keep the last sighting: once the wait times out there is nothing left to see
                with self._guard:
                    self._latest = found
            self._stop.wait(_POLL_SECONDS)

    def clear(self) -> None:
        with self._guard:
            self._latest = []

    def blockers(self) -> list[dict]:
        with self._guard:
            return list(self._latest)


@contextmanager
def _migration_lock(conn: connection, dbname: str) -> Iterator[None]:
    import psycopg2

    # pg_try_advisory_lock, not pg_advisory_lock: a second migrator fails at once instead of queueing.
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
        taken = cur.fetchone()[0]
        if not taken:
            cur.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                        "AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1",
                        ((LOCK_KEY >> 32) & 0xFFFFFFFF, LOCK_KEY & 0xFFFFFFFF))
            holders = _sessions(cur, [row[0] for row in cur.fetchall()])
    conn.commit()  # a session-level advisory lock outlives the transaction that took it
    if not taken:
        who = "; ".join(map(_describe_session, holders)) or "a session that has just finished"
        raise LockBusy(f"another migrate or rollback is running on database {dbname}: {who}; try again when "
                       "it has finished")
    try:
        yield
    finally:
        if not conn.closed:
            _abandon(conn)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
                if not conn.autocommit:
                    conn.commit()
            except psycopg2.Error:
                pass  # the lock goes with the session, which the caller closes


def _set_lock_timeout(cur, seconds: int, local: bool) -> None:
    cur.execute("SELECT set_config('lock_timeout', %s, %s)", (f"{int(seconds)}s", local))


def _abandon(conn: connection) -> None:
    import psycopg2

    if conn.closed:
        return
    try:
        conn.rollback()
    except psycopg2.Error:
        pass  # a broken connection has no transaction left to roll back


def _pg_error(exc: Exception) -> str:
    """The first line of a PostgreSQL error, with the PL/pgSQL line it happened at if any."""
    diag = getattr(exc, "diag", None)
    lines = str(exc).strip().splitlines()
    message = (diag.message_primary if diag is not None else None) or (lines[0] if lines else type(exc).__name__)
    context = diag.context if diag is not None else None
    if context:  # e.g. "PL/pgSQL function f() line 3 at RAISE"
        return f"{message} ({context.strip().splitlines()[-1]})"
    return message
