"""Rolling migrations back with their down files: the plan (what --dry-run shows), then its run, in one
transaction under the migration lock and lock_timeout, ending the blocking sessions if asked."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.components import DATABASE
from common.errors import ToolkitError, UsageError
from database.migrations import (
    DELETE_ROW,
    SET_DIRTY,
    Applied,
    Migration,
    applied,
    current_id,
    display_id,
    find,
    prepare_tracking_table,
    refuse_dirty,
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
    terminate,
    wait_until_gone,
)
from database.sql import ScriptError, execute_script, pg_error, read_sql, refuse_transaction_control

if TYPE_CHECKING:
    from psycopg2.extensions import connection

BEFORE_FIRST = -1  # the target version of a rollback of every migration (`rollback 0` or `--all`)
NO_MIGRATION = "no migration"  # how the state with nothing applied is shown


class MissingDownFile(ToolkitError):
    """A rollback would pass migrations that cannot be undone by a down file; `versions`/`ids` name them."""

    def __init__(self, message: str, missing: list[tuple[int, str]]):
        super().__init__(message)
        self.versions = [version for version, _ in missing]
        self.ids = [ident for _, ident in missing]


class RollbackFailed(ToolkitError):
    """A rollback failed; `rolled_back` lists the ids already undone (only before a no-transaction step)."""

    def __init__(self, message: str, rolled_back: list[str], blockers: list[dict]):
        super().__init__(message)
        self.rolled_back = rolled_back
        self.blockers = blockers


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
        for number, batch in enumerate(batches(self.steps), 1):
            how = "on its own, outside any transaction" if batch[0].no_transaction else "in one transaction"
            lines.append(f"\n-- part {number}, {how}")
            for step in batch:
                dirty = [SET_DIRTY % ("true", step.version) + ";"] if step.no_transaction else []
                lines += [f"-- {step.file.name}", *dirty, step.sql.strip(), DELETE_ROW % step.version + ";"]
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
        if not migration.down_no_transaction:
            refuse_transaction_control(migration.down, text)
        else:
            warnings.append(f"{migration.down.name} runs outside the rollback transaction: the steps listed "
                            "before it are committed first and stay rolled back if it fails")
        if migration.up_sha256 != row.sha256:
            warnings.append(f"{migration.up.name} changed since it was applied: its down file may not undo "
                            "what was applied")
        steps.append(RollbackStep(row.version, migration.id, migration.down, text, migration.down_no_transaction))
    if missing:
        names = ", ".join(ident for _, ident in missing)
        raise MissingDownFile(f"cannot roll back to {target_id or NO_MIGRATION}: no down file for "
                              f"{names}; nothing was changed", missing)
    return RollbackPlan(target_id, target_version, display_id(current_id(applied), migrations), steps, warnings)


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
    return wanted.version, display_id(by_version[wanted.version].id, migrations)


def run_rollback(server: DbServer, plan: RollbackPlan, lock_timeout: int, terminate_blockers: bool,
                 progress: Callable[[str], None] = lambda message: None) -> RollbackOutcome:
    """Run the plan under the migration lock: the down scripts and tracking-row deletes in one transaction
    with lock_timeout; on a lock timeout name the blockers (RollbackFailed) or, with terminate_blockers, end
    them and try once more.

    A no-transaction step splits the transaction in plan order: the steps before it are committed, it runs
    on its own in autocommit (its row marked dirty, its statements one by one, then its row deleted), and the
    rest run in a new transaction. So if it fails, the steps before it stay rolled back (the plan's warnings
    say so) and its row stays, marked dirty.
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
            prepare_tracking_table(conn, lock_timeout)
            _refuse_stale_plan(conn, plan, server.name)
            with BlockerWatch(server, conn.get_backend_pid()) as watch:
                for batch in batches(plan.steps):
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


def batches(steps: list[RollbackStep]) -> list[list[RollbackStep]]:
    """The steps in the parts they run in."""
    # Consecutive transactional steps share one transaction; each no-transaction step is a batch of its own.
    parts: list[list[RollbackStep]] = []
    for step in steps:
        if step.no_transaction or not parts or parts[-1][0].no_transaction:
            parts.append([step])
        else:
            parts[-1].append(step)
    return parts


def _run_batch(conn: connection, batch: list[RollbackStep], lock_timeout: int,
               progress: Callable[[str], None]) -> None:
    if batch[0].no_transaction:
        step = batch[0]
        progress(f"rolling back {step.id} (outside a transaction)")
        with autocommit(conn), conn.cursor() as cur:
            set_lock_timeout(cur, lock_timeout, local=False)  # the connection is ours alone
            cur.execute(SET_DIRTY, (True, step.version))
            execute_script(cur, step.file, step.sql)
            cur.execute(DELETE_ROW, (step.version,))
        return
    with conn.cursor() as cur:
        set_lock_timeout(cur, lock_timeout, local=True)
        for step in batch:
            progress(f"rolling back {step.id}")
            execute_script(cur, step.file, step.sql)
            cur.execute(DELETE_ROW, (step.version,))
    conn.commit()


def _refuse_stale_plan(conn: connection, plan: RollbackPlan, dbname: str) -> None:
    # Someone may have migrated between the plan (or --dry-run) and now; only the lock makes this check hold.
    rows = applied(conn)
    conn.commit()
    refuse_dirty(rows, [], dbname)
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
    dirty = ""
    if isinstance(failure, ScriptError) and batch[0].no_transaction:
        done = failure.statements_done
        dirty = (f"{batch[0].id} runs outside a transaction: "
                 f"{f'its {done} statement(s) before the failing one stay done; ' if done else ''}it is marked "
                 f"dirty: finish or undo it by hand, then `{DATABASE.script} force VERSION`; ")
        state = state.replace("nothing changed", "nothing else changed")
    if failure.pgcode != LOCK_NOT_AVAILABLE:
        return RollbackFailed(f"rollback to {outcome.target_id} failed: {where}; "
                              f"{dirty or 'it was rolled back, '}{state}", outcome.rolled_back, blockers)
    hint = ("they were ended and it was still blocked; retry later" if terminate_blockers
            else "retry when they finish, or end them with --terminate-blockers")
    return RollbackFailed(f"rollback to {outcome.target_id} gave up: {where}"
                          f"{blocked_by(blockers, lock_timeout)}; {dirty}{state}; {hint}", outcome.rolled_back,
                          blockers)


def _end_sessions(conn: connection, blockers: list[dict], wait_seconds: int, outcome: RollbackOutcome,
                  batch: list[RollbackStep]) -> list[dict]:
    try:
        for blocker in blockers:
            terminate(conn, blocker["pid"])
    except ToolkitError as exc:
        state = "nothing changed" if not outcome.rolled_back else f"now at {batch[0].id}"
        raise RollbackFailed(f"{exc}; {state}", outcome.rolled_back, blockers) from None
    # Wait for the ended backends to exit, so that the retry does not queue behind one still shutting down.
    wait_until_gone(conn, [blocker["pid"] for blocker in blockers], wait_seconds + 5)
    return blockers
