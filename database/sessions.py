"""Sessions and locks: who blocks whom, ending sessions, watching a connection's blockers while it waits,
the advisory lock that migrate and rollback share, and lock_timeout."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from common.errors import LockBusy, ToolkitError, UsageError
from database.server import DbServer
from database.sql import pg_error

if TYPE_CHECKING:
    from psycopg2.extensions import connection

# migrate and rollback take the same advisory lock; advisory locks are per database, so other databases are free.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"database_rollback.migrate").digest()[:8], "big", signed=True)
POLL_SECONDS = 0.05
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of an expired lock_timeout
_QUERY_CHARS = 200


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
        abandon(conn)
        raise ToolkitError(f"could not end session {pid}: {pg_error(exc)} (it takes a superuser, the "
                           "session's own role, or pg_signal_backend)") from None
    return ended


def wait_until_gone(conn: connection, pids: list[int], seconds: float) -> None:
    """Wait up to `seconds` until none of `pids` is a session any more (pg_terminate_backend only signals)."""
    deadline = time.monotonic() + seconds
    while pids and time.monotonic() < deadline:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            left = cur.fetchone()[0]
        conn.rollback()  # pg_stat_activity is read once per transaction
        if not left:
            break
        time.sleep(POLL_SECONDS)


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


def blocked_by(blockers: list[dict], lock_timeout: int) -> str:
    """The " after waiting N s for locks held by ..." part of a failure message, naming the blockers."""
    if not blockers:
        return f" after waiting {lock_timeout} s for locks (the holders finished before they could be named)"
    return f" after waiting {lock_timeout} s for locks held by " + "; ".join(map(_describe_session, blockers))


class BlockerWatch:
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

    def __enter__(self) -> BlockerWatch:
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
            self._stop.wait(POLL_SECONDS)

    def clear(self) -> None:
        with self._guard:
            self._latest = []

    def blockers(self) -> list[dict]:
        with self._guard:
            return list(self._latest)


@contextmanager
def migration_lock(conn: connection, dbname: str) -> Iterator[None]:
    """Hold the migration advisory lock on the connection's database; LockBusy, naming the holder, if taken."""
    import psycopg2

    # pg_try_advisory_lock, not pg_advisory_lock: a second migrator fails at once instead of queueing.
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
        taken = cur.fetchone()[0]
        if not taken:
            holders = _sessions(cur, migration_lock_holders(cur))
    conn.commit()  # a session-level advisory lock outlives the transaction that took it
    if not taken:
        who = "; ".join(map(_describe_session, holders)) or "a session that has just finished"
        raise LockBusy(f"another migrate or rollback is running on database {dbname}: {who}; try again when "
                       "it has finished")
    try:
        yield
    finally:
        if not conn.closed:
            abandon(conn)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
                if not conn.autocommit:
                    conn.commit()
            except psycopg2.Error:
                pass  # the lock goes with the session, which the caller closes


def migration_lock_holders(cur) -> list[int]:
    """The pids of the sessions holding the migration lock on the cursor's database (a migrate or rollback)."""
    cur.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1",
                ((LOCK_KEY >> 32) & 0xFFFFFFFF, LOCK_KEY & 0xFFFFFFFF))
    return [row[0] for row in cur.fetchall()]


@contextmanager
def autocommit(conn: connection) -> Iterator[None]:
    """The connection in autocommit for the block (each statement its own transaction, as CREATE INDEX
    CONCURRENTLY and VACUUM need), back in transaction mode after, with no transaction left open."""
    import psycopg2
    from psycopg2.extensions import TRANSACTION_STATUS_IDLE

    conn.autocommit = True
    try:
        yield
    finally:
        if not conn.closed:
            # A script's own BEGIN may have left a transaction open, which psycopg2 does not know of.
            if conn.info.transaction_status != TRANSACTION_STATUS_IDLE:
                try:
                    with conn.cursor() as cur:
                        cur.execute("ROLLBACK")
                except psycopg2.Error:
                    pass  # a broken connection has no transaction left
            if not conn.closed:
                conn.autocommit = False


def set_lock_timeout(cur, seconds: int, local: bool) -> None:
    """Set lock_timeout to `seconds`, for the transaction (local) or the session."""
    cur.execute("SELECT set_config('lock_timeout', %s, %s)", (f"{int(seconds)}s", local))


def abandon(conn: connection) -> None:
    """Roll back the connection's transaction, if it still has one and can."""
    import psycopg2

    if conn.closed:
        return
    try:
        conn.rollback()
    except psycopg2.Error:
        pass  # a broken connection has no transaction left to roll back
