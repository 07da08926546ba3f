"""Schema migrations for database_rollback.py: golang-migrate's file layout, the tracking table
public.schema_migrations, forward migrations (one transaction each) and rollbacks (one transaction for all)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ToolkitError, UsageError
from database.server import DbServer
from database.sessions import POLL_SECONDS, BlockerWatch, abandon, blocked_by, migration_lock, set_lock_timeout
from database.sessions import blocking_report as blocking_report  # re-exported: database_rollback.py calls it from here
from database.sessions import terminate as terminate  # re-exported, likewise
from database.sql import ScriptError, execute_script, pg_error, read_sql, refuse_transaction_control, sha256

if TYPE_CHECKING:
    from psycopg2.extensions import connection

NO_TRANSACTION_MARK = "-- rollback: no-transaction"
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of an expired lock_timeout
_MAX_VERSION = 2**63 - 1  # the tracking table stores versions as bigint
BEFORE_FIRST = -1  # the target version of a rollback of every migration (`rollback 0` or `--all`)
NO_MIGRATION = "no migration"  # how the state with nothing applied is shown

_FILE_NAME = re.compile(r"(?P<digits>\d+)_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<direction>up|down)\.sql")
_REF = re.compile(r"(?P<digits>\d+)(?:_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*))?")

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
    """Applied migrations above the target, newest first; an empty plan means already at the target.
    A target_id of None (version BEFORE_FIRST) means every applied migration is undone."""

    target_id: str | None
    target_version: int
    current_id: str | None
    steps: list[RollbackStep]
    warnings: list[str] = field(default_factory=list)

    @property
    def target_label(self) -> str:
        """The target for messages: its id, or "no migration"."""
        return self.target_id or NO_MIGRATION

    def render(self) -> str:
        """The plan and every statement it would run, for --dry-run."""
        if not self.steps:
            return f"already at {self.target_label}: nothing to roll back"
        lines = [f"roll back {len(self.steps)} migration(s), from {self.current_id} to {self.target_label}"]
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
            first_line = read_sql(down).partition("\n")[0] if down else ""
            migrations.append(Migration(
                version=version, name=ident.partition("_")[2], id=ident, up=path, down=down,
                up_sha256=sha256(path), no_transaction=" ".join(first_line.split()).lower() == NO_TRANSACTION_MARK,
            ))
    return migrations


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
        with migration_lock(conn, server.name):
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


def plan_rollback(migrations: list[Migration], applied: list[Applied], ref: str | None) -> RollbackPlan:
    """Every applied migration above `ref` (which must be applied), newest first; refuses, before anything
    changes, if one has no down file (MissingDownFile) or a down file controls its own transaction.

    `ref` None, or 0 when no migration has version 0, means every applied migration.
    """
    target_version, target_id = _rollback_target(migrations, applied, ref)
    files = {(m.version, m.name): m for m in migrations}
    steps, missing, warnings = [], [], []
    for row in sorted(applied, key=lambda r: r.version, reverse=True):
        if row.version <= target_version:
            break
        migration = files.get((row.version, row.name))
        if migration is None or migration.down is None:
            missing.append((row.version, migration.id if migration else row.id))
            continue
        text = read_sql(migration.down)
        if not migration.no_transaction:
            refuse_transaction_control(migration.down, text)
        else:
            warnings.append(f"{migration.down.name} runs outside the rollback transaction: the steps listed "
                            "before it are committed first and stay rolled back if it fails")
        if migration.up_sha256 != row.sha256:
            warnings.append(f"{migration.up.name} changed since it was applied: its down file may not undo "
                            "what was applied")
        steps.append(RollbackStep(row.version, migration.id, migration.down, text, migration.no_transaction))
    if missing:
        names = ", ".join(ident for _, ident in missing)
        raise MissingDownFile(f"cannot roll back to {target_id or NO_MIGRATION}: no down file for "
                              f"{names}; nothing was changed", missing)
    return RollbackPlan(target_id, target_version, _display_id(current_id(applied), migrations), steps, warnings)


def _rollback_target(migrations: list[Migration], applied: list[Applied], ref: str | None) -> tuple[int, str | None]:
    """(version, display id) of the migration a rollback goes back to; (BEFORE_FIRST, None) for all of them."""
    zero = ref is not None and re.fullmatch(r"0+", ref.strip()) is not None
    if ref is None or (zero and all(item.version != 0 for item in [*migrations, *applied])):
        return BEFORE_FIRST, None
    wanted = find(migrations, applied, ref)
    by_version = {row.version: row for row in applied}
    if wanted.version not in by_version:
        raise UsageError(f"{wanted.id} is not applied (current: {current_id(applied) or 'nothing applied'}): "
                         f"rollback goes back to an applied migration; `migrate {wanted.id}` applies it")
    return wanted.version, _display_id(by_version[wanted.version].id, migrations)


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
    outcome = RollbackOutcome(plan.target_label)
    if not plan.steps:
        return outcome
    conn = server.connect()
    try:
        with migration_lock(conn, server.name):
            _refuse_stale_plan(conn, plan)
            with BlockerWatch(server, conn.get_backend_pid()) as watch:
                for batch in _batches(plan.steps):
                    for attempt in (1, 2):
                        watch.clear()
                        try:
                            _run_batch(conn, batch, lock_timeout, progress)
                            break
                        except (ScriptError, psycopg2.Error) as failure:
                            abandon(conn)
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
                set_lock_timeout(cur, lock_timeout, local=False)  # the connection is ours alone
                execute_script(cur, step.file, step.sql)
                cur.execute(_DELETE_TRACKING_ROW, (step.version,))
        finally:
            if not conn.closed:
                conn.autocommit = False
        return
    with conn.cursor() as cur:
        set_lock_timeout(cur, lock_timeout, local=True)
        for step in batch:
            progress(f"rolling back {step.id}")
            execute_script(cur, step.file, step.sql)
            cur.execute(_DELETE_TRACKING_ROW, (step.version,))
    conn.commit()


def _refuse_stale_plan(conn: connection, plan: RollbackPlan) -> None:
    # Someone may have migrated between the plan (or --dry-run) and now; only the lock makes this check hold.
    rows = applied(conn)
    conn.commit()
    above = [row.version for row in sorted(rows, key=lambda r: r.version, reverse=True)
             if row.version > plan.target_version]
    target_gone = plan.target_version != BEFORE_FIRST and plan.target_version not in {row.version for row in rows}
    if target_gone or above != [s.version for s in plan.steps]:
        raise ToolkitError(f"the applied migrations changed since the plan was made (now at {current_id(rows)}): "
                           "run the rollback again")


def _rollback_failed(failure: Exception, batch: list[RollbackStep], blockers: list[dict],
                     outcome: RollbackOutcome, lock_timeout: int, terminate_blockers: bool) -> RollbackFailed:
    if isinstance(failure, ScriptError):
        where = failure.describe()
    else:
        where = f"committing the rollback of {', '.join(s.id for s in batch)}: {pg_error(failure)}"
    state = "nothing changed"
    if outcome.rolled_back:
        state = (f"{', '.join(outcome.rolled_back)} stay rolled back (committed before the no-transaction step); "
                 f"nothing else changed, now at {batch[0].id}")
    if isinstance(failure, ScriptError) and batch[0].no_transaction and failure.statements_done:
        state += (f"; {failure.path.name} runs outside a transaction, so its {failure.statements_done} "
                  "statement(s) before the failing one stay done")
    if failure.pgcode != LOCK_NOT_AVAILABLE:
        return RollbackFailed(f"rollback to {outcome.target_id} failed: {where}; it was rolled back, {state}",
                              outcome.rolled_back, blockers)
    hint = ("they were ended and it was still blocked; retry later" if terminate_blockers
            else "retry when they finish, or end them with --terminate-blockers")
    return RollbackFailed(f"rollback to {outcome.target_id} gave up: {where}"
                          f"{blocked_by(blockers, lock_timeout)}; {state}; {hint}", outcome.rolled_back, blockers)


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
        time.sleep(POLL_SECONDS)
    return blockers
