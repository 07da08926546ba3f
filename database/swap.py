"""The swap restore: the dump restored into a new database beside the live one, which is then switched in by
renames. What it needs (privileges, the live database's properties and subscriptions) is checked before
anything is built; a failure drops what was built and names its first cause."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ToolkitError
from common.progress import Progress, no_progress
from database.dumps import PgTools, restore_into, with_full_disk_named
from database.properties import (
    DEFAULT_TABLESPACE,
    DatabaseProperties,
    copy_database_properties,
    create_database_like,
    read_properties,
)
from database.scratch import claimed, drop_database, scratch_names
from database.server import APPLICATION_NAME, MAINTENANCE_DB, DbServer
from database.space import SpaceCheck
from database.sql import pg_error
from database.subscriptions import (
    Subscription,
    prepare_handover,
    read_subscriptions,
    refuse_unmovable,
    release_slots,
    set_enabled,
)

SESSION_END_TIMEOUT_SECONDS = 10
RECOVERY_WAIT_SECONDS = 60  # a server restarting after a crash: how long to wait to drop what was built
_STARTING = ("starting up", "in recovery mode", "not yet accepting connections")


@dataclass
class SwapPlan:
    """What the swap carries over from the live database (None: there is none, the name is new)."""

    live: DatabaseProperties | None
    subscriptions: list[Subscription]
    owner: str | None = None  # with no live database: the owner to give the new one (the dump's), else DB_USER


@dataclass
class SwapOutcome:
    """How the switch went: the name the replaced database is kept under (None if there was none), how long
    the live name was out of service, the sessions ended, the subscriptions handed over, and warnings."""

    before: str | None
    outage: float = 0.0
    sessions_ended: int = 0
    transactions_ended: int = 0
    subscriptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_swap(server: DbServer) -> SwapPlan:
    """Read and check what a swap of DB_NAME needs, before anything is built: refused (nothing changed) if
    a property or a subscription could not be carried over, or DB_USER lacks a privilege the switch needs."""
    live = read_properties(server, server.name)
    if live is not None:
        live.refuse_unknown()
    check_privileges(server, live)
    if live is None:
        return SwapPlan(None, [])
    subscriptions = read_subscriptions(server, server.name)
    refuse_unmovable(server, server.name, subscriptions)
    return SwapPlan(live, subscriptions)


def check_privileges(server: DbServer, live: DatabaseProperties | None) -> None:
    """Refuse now, not after pg_restore, if DB_USER could not create the new database or switch it in."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        superuser, createdb = cur.fetchone()
        if superuser:
            return
        if not createdb:
            raise ToolkitError(f"{server.user} may not create databases (no CREATEDB), and a swap restore builds the "
                               "new database beside the live one: nothing was changed; grant it CREATEDB, or "
                               "restore --in-place")
        if live is None:
            return
        cur.execute("SELECT pg_has_role(current_user, %s, 'MEMBER'), has_tablespace_privilege(%s, 'CREATE')",
                    (live.owner, live.tablespace))
        member, tablespace = cur.fetchone()
        if not member:
            raise ToolkitError(f"{server.user} may not switch databases: renaming {live.name} and creating its "
                               f"successor for its owner {live.owner} take a member of {live.owner} or a superuser: "
                               f"nothing was changed; restore as {live.owner}, or --in-place")
        if not tablespace and live.tablespace != DEFAULT_TABLESPACE:
            raise ToolkitError(f"{server.user} may not create databases in tablespace {live.tablespace}, where "
                               f"{live.name} is: nothing was changed; GRANT CREATE ON TABLESPACE "
                               f"{live.tablespace} to it, or restore --in-place")
        # A superuser's session takes a superuser to end; any other, a member of its role or pg_signal_backend.
        cur.execute("SELECT string_agg(DISTINCT a.usename, ', ') FROM pg_stat_activity a"
                    " JOIN pg_roles r ON r.oid = a.usesysid WHERE a.datname = %s AND a.pid <> pg_backend_pid()"
                    " AND (r.rolsuper OR NOT (pg_has_role(current_user, r.oid, 'MEMBER')"
                    "                         OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')))",
                    (live.name,))
        others = cur.fetchone()[0]
        if others:
            raise ToolkitError(f"{server.user} could not end the sessions of {others} on {live.name} at the switch "
                               "(that takes a member of their role or of pg_signal_backend, and a superuser for a "
                               "superuser's): nothing was changed")


def restore_into_fresh_database(server: DbServer, tools: PgTools, plan: SwapPlan, dump: Path, jobs: int,
                                expected_size: int | None, space: SpaceCheck,
                                progress: Progress = no_progress) -> SwapOutcome:
    """Restore into a new `<name>__restore_...` database, give it the live one's properties and
    subscriptions, then swap names. The scratch name is claimed before the database exists and until it is
    switched in or dropped, so that cleanup never drops it under a running restore. Any failure before the
    switch drops it again, and the error names the first cause (with `space`, which filesystem is full)."""
    restored, before = scratch_names(server.name)
    with claimed(server, restored) as claim:
        create_database_like(server, restored, plan.live)
        try:
            if plan.live is None and plan.owner is not None:
                give_owner(server, restored, plan.owner)
            with progress(f"restoring into {restored}", lambda: database_size(server, restored), expected_size):
                try:
                    restore_into(server, tools, dump, restored, jobs, single_transaction=jobs <= 1)
                except ToolkitError as exc:
                    raise with_full_disk_named(exc, space.full_now() or "the server's disk") from None
            if plan.live is not None:
                carry_over(server, plan, restored)
            claim.check()  # unclaimed, a cleanup may have dropped or be dropping it: never switch that in
            return switch(server, restored, before, plan)
        except BaseException as first:
            drop_built(server, restored, first, space)
            raise


def give_owner(server: DbServer, name: str, owner: str) -> None:
    """ALTER DATABASE ... OWNER TO: before pg_restore, so what the dump leaves to the database's owner
    (the public schema, on PostgreSQL 15 and later) is the dump's owner's, as on the server it came from."""
    import psycopg2
    from psycopg2 import sql

    try:
        with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(owner)))
    except psycopg2.Error as exc:
        raise ToolkitError(f"could not give {name} to its owner in the dump, {owner} ({pg_error(exc)}): "
                           "nothing was switched in") from None


def database_size(server: DbServer, name: str) -> int:
    """pg_database_size of `name` (for restore progress), 0 if it cannot be read."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(%s)", (name,))
        return cur.fetchone()[0] or 0


def carry_over(server: DbServer, plan: SwapPlan, restored: str) -> None:
    """Give `restored` the live database's properties and, disabled, its subscriptions; a server error is one
    line saying which."""
    import psycopg2

    try:
        copy_database_properties(server, plan.live, restored)
    except psycopg2.Error as exc:
        raise ToolkitError(f"could not give {restored} the properties of {server.name} ({pg_error(exc)}): "
                           "nothing was switched in") from None
    try:
        prepare_handover(server, server.name, restored, plan.subscriptions)
    except psycopg2.Error as exc:
        raise ToolkitError(f"could not make the subscriptions of {server.name} in {restored} to hand them over "
                           f"({pg_error(exc)}): nothing was switched in") from None


def switch(server: DbServer, restored: str, before: str, plan: SwapPlan) -> SwapOutcome:
    """Pause the live database's subscriptions, swap names, then hand the subscriptions over: the replaced
    database's copies let go of their slots, and the restored database's take them up. A failed swap
    resumes the paused ones."""
    paused = [subscription.name for subscription in plan.subscriptions if subscription.enabled]
    set_enabled(server, server.name, paused, enabled=False)
    try:
        outcome = swap_in(server, restored, before)
    except BaseException as failure:
        try:
            set_enabled(server, server.name, paused, enabled=True)
        except Exception as exc:  # the swap's own failure stays the first cause
            raise ToolkitError(f"{failure}; and the subscriptions {', '.join(paused)} of {server.name} are still "
                               f"disabled ({str(exc).strip()}): ALTER SUBSCRIPTION ... ENABLE them") from failure
        raise
    if outcome.before is None:
        return outcome
    outcome.subscriptions = [subscription.name for subscription in plan.subscriptions]
    try:
        if plan.subscriptions:
            release_slots(server, before)
        set_enabled(server, server.name, paused, enabled=True)
    except Exception as exc:  # switched in already: what is left to do is the operator's, said plainly
        outcome.warnings.append(f"the subscriptions ({', '.join(paused) or 'none enabled'}) were not handed over "
                                f"whole ({str(exc).strip()}): in {before}, ALTER SUBSCRIPTION ... SET (slot_name = "
                                f"NONE) for each; then in {server.name}, ALTER SUBSCRIPTION ... ENABLE")
    return outcome


def swap_in(server: DbServer, restored: str, before: str) -> SwapOutcome:
    """Switch names: live -> `before`, `restored` -> live (or `restored` simply takes the name if there is no
    live database to replace: the outcome's `before` is None then).

    New connections to the live database are refused, its sessions ended, then both renames commit in one
    transaction. Whatever fails, the live database accepts connections again afterwards.
    """
    from psycopg2 import sql

    live = sql.Identifier(server.name)
    conn = server.connect(MAINTENANCE_DB, autocommit=True)
    started = time.monotonic()
    swapped = False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (server.name,))
            if cur.fetchone() is None:  # nothing to replace (e.g. --target-db with a new name)
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), live))
                swapped = True
                return SwapOutcome(None)
            cur.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(live))
            sessions, transactions = end_sessions(cur, server.name)
            conn.autocommit = False
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(live, sql.Identifier(before)))
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), live))
            conn.commit()
            swapped = True
            outage = time.monotonic() - started
            conn.autocommit = True
            cur.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(before)))
        return SwapOutcome(before, outage, sessions, transactions)
    finally:
        if not swapped and not conn.closed:
            conn.rollback()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(live))
        conn.close()


def end_sessions(cur, dbname: str) -> tuple[int, int]:
    """Terminate every session on `dbname` and wait until the server has really let them go; how many
    client sessions were ended, and how many of those had a transaction open (rolled back)."""
    deadline = time.monotonic() + SESSION_END_TIMEOUT_SECONDS
    ended: dict[int, bool] = {}  # pid -> had a transaction open when first ended
    while True:
        cur.execute("SELECT pid, backend_type = 'client backend', xact_start IS NOT NULL,"
                    " pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        found = cur.fetchall()
        if not found:
            return len(ended), sum(ended.values())
        for pid, client, in_transaction, signalled in found:
            if client and signalled:
                ended.setdefault(pid, in_transaction)
        if time.monotonic() > deadline:
            raise ToolkitError(f"sessions on {dbname} did not end within {SESSION_END_TIMEOUT_SECONDS} s")
        time.sleep(0.005)  # pg_terminate_backend only signals; the backend exits a moment later


def drop_built(server: DbServer, name: str, first: BaseException, space: SpaceCheck) -> None:
    """Drop the database a failed restore built. If the server is restarting (after a crash, e.g. a full
    pg_wal), wait for it a bounded time; if it still cannot be dropped, raise an error that names the
    first cause first, then any full filesystem, then what is left behind and how it goes."""
    try:
        wait_while_starting(server)
        drop_database(server, name)
    except Exception as exc:
        cause = str(first).strip() or type(first).__name__
        full = space.full_now()
        if full and full not in cause:
            cause += f"; {full} is on a full filesystem"
        error = ToolkitError(f"{cause}; then the half-built database {name} could not be dropped "
                             f"({str(exc).strip()}): once the server takes connections again, "
                             f"`{APPLICATION_NAME} cleanup` drops it")
        error.exit_code = getattr(first, "exit_code", error.exit_code)
        raise error from first


def wait_while_starting(server: DbServer, seconds: float = RECOVERY_WAIT_SECONDS) -> None:
    """Return once the server takes connections; while it says it is starting up or recovering, wait up to
    `seconds`; a server that is down or refuses otherwise raises at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            server.connect(MAINTENANCE_DB).close()
            return
        except ToolkitError as exc:
            if not any(state in str(exc) for state in _STARTING) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)
