"""The databases a swap restore makes beside the live one, and how leftovers of killed runs are told apart.

`<name>__restore_<stamp>_<random>` is the database a restore builds; `<name>__before_<stamp>_<random>` the
live one it replaced, kept for an undo. The random part keeps two restores in the same second (a retry,
or two stores restoring one database) from colliding. A restore holds a session advisory lock keyed on
its scratch name, on its own connection to the maintenance database, from before the database is created
until it is switched in or dropped: the lock goes with the session however the run ends, so a
`__restore_` database whose lock is free is a leftover that nobody will finish, and one whose lock is
held is still being built.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from common.errors import ToolkitError
from database.server import MAINTENANCE_DB, DbServer
from database.subscriptions import drop_subscriptions, subscription_names

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are cut, and could then collide
RESTORING = "restore"
KEPT = "before"
UNDONE = "undone"  # the database an undo of a swap set aside (what the restore had put in), kept like `before`
KEPT_ROLES = frozenset({KEPT, UNDONE})  # whole databases kept for a way back: cleanup DAYS drops old ones
DRILLING = "drill"  # the drill's scratch database; its own restore builds `<drill name>__restore_...` first
CLAIMED = frozenset({RESTORING, DRILLING})  # built under a claim: unclaimed, it is a leftover
_STAMP = "%Y%m%d%H%M%S"
_RANDOM_BYTES = 3
# The random part is optional: names made before it existed are still recognised.
_SCRATCH = re.compile(r"(?P<prefix>.*)__(?P<role>restore|before|undone|drill)_(?P<stamp>\d{14})(?:_[0-9a-f]{6})?", re.S)


@dataclass(frozen=True)
class ScratchDatabase:
    """A `__restore_` (role RESTORING) or `__before_` (role KEPT) database of one live database."""

    name: str
    role: str
    made: datetime  # to the second, from the name
    # pg_database's oid: between two set aside within one second, the later has the larger one (a `__before_`
    # database is the live one renamed, and each live one was built after the one it replaced).
    oid: int = 0

    @property
    def age_order(self) -> tuple[datetime, int]:
        """Sorts scratch databases from the oldest to the newest."""
        return self.made, self.oid


def scratch_name(live: str, role: str, moment: datetime | None = None) -> str:
    """`<live>__<role>_<UTC stamp>_<6 hex digits>`, the live name cut so the whole fits 63 bytes."""
    stamp = (moment or datetime.now(UTC)).strftime(_STAMP)
    suffix = f"__{role}_{stamp}_{os.urandom(_RANDOM_BYTES).hex()}"
    return _cut(live, len(suffix)) + suffix


def scratch_names(live: str, moment: datetime | None = None) -> tuple[str, str]:
    """(the `__restore_` name to build in, the `__before_` name for the database it replaces)."""
    return scratch_name(live, RESTORING, moment), scratch_name(live, KEPT, moment)


def _cut(live: str, suffix_bytes: int) -> str:
    return live.encode()[: MAX_IDENTIFIER_BYTES - suffix_bytes].decode(errors="ignore")


def parse_scratch_name(live: str, name: str) -> ScratchDatabase | None:
    """The scratch database `name` is, if it is one of `live`'s; None for any other name."""
    match = _SCRATCH.fullmatch(name)
    if match is None:
        return None
    if match["prefix"] != _cut(live, len(name[len(match["prefix"]):].encode())):
        outer = parse_scratch_name(live, match["prefix"])  # a drill's own restore builds beside the drill's
        if outer is None or outer.role != DRILLING:
            return None
    made = datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=UTC)
    return ScratchDatabase(name, match["role"], made)


def scratch_databases(cur, live: str) -> list[ScratchDatabase]:
    """`live`'s scratch databases on the server of cursor `cur` (pg_database is the same from any database)."""
    cur.execute("SELECT datname, oid::bigint FROM pg_database ORDER BY datname")
    found = ((parse_scratch_name(live, name), oid) for name, oid in cur.fetchall())
    return [replace(scratch, oid=oid) for scratch, oid in found if scratch is not None]


def claim_key(name: str) -> int:
    """The advisory lock key (a signed bigint) a restore holds while it builds database `name`."""
    return int.from_bytes(hashlib.sha256(b"database_rollback.scratch:" + name.encode()).digest()[:8], "big",
                          signed=True)


def being_built(cur, names: list[str]) -> set[str]:
    """Which of `names` a running restore has claimed (their advisory lock is held in MAINTENANCE_DB)."""
    if not names:
        return set()
    cur.execute("SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND objsubid = 1"
                " AND database = (SELECT oid FROM pg_database WHERE datname = %s)", (MAINTENANCE_DB,))
    held = {key for (key,) in cur.fetchall()}  # bigint shifts wrap: the key comes back signed, as claim_key's
    # A database a client is connected to is in use whatever its claim says (pg_restore writing into it).
    # Only clients: autovacuum visits a freshly loaded leftover on its own, and must not make it look alive.
    cur.execute("SELECT DISTINCT datname FROM pg_stat_activity WHERE datname = ANY(%s)"
                " AND backend_type = 'client backend'", (names,))
    in_use = {name for (name,) in cur.fetchall()}
    return {name for name in names if claim_key(name) in held or name in in_use}


class Claim:
    """A scratch name claimed by this run: its advisory lock, held on a session of its own."""

    def __init__(self, conn, name: str):
        self._conn, self.name = conn, name

    def check(self) -> None:
        """Raise unless the claim still holds: its session may have been ended while it sat idle."""
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                            " AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = %s",
                            (claim_key(self.name),))
                held = cur.fetchone()[0] == 1
        except Exception as exc:  # psycopg2's errors: the session is gone
            raise ToolkitError(f"the claim on {self.name} was lost ({str(exc).strip() or type(exc).__name__}): "
                               "a cleanup could have dropped it") from None
        if not held:
            raise ToolkitError(f"the claim on {self.name} was lost: a cleanup could have dropped it")


@contextmanager
def claimed(server: DbServer, name: str) -> Iterator[Claim]:
    """Hold `name`'s advisory lock on a connection of its own for the block: take it before creating the
    database, leave the block only once the database is switched in or dropped.

    The session sits idle for as long as pg_restore runs, so nothing may end it for that: no
    idle_session_timeout (set for it alone), and TCP keepalives for the network between."""
    conn = server.connect(MAINTENANCE_DB, autocommit=True, keepalive=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config(name, '0', false) FROM pg_settings"
                        " WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout')")
            cur.execute("SELECT pg_try_advisory_lock(%s)", (claim_key(name),))
            if not cur.fetchone()[0]:
                raise ToolkitError(f"another run has claimed the database name {name}: try again")
        yield Claim(conn, name)
    finally:
        conn.close()  # a session-level advisory lock ends with the session


def drop_database(server: DbServer, name: str) -> list[str]:
    """Drop a scratch or kept database, ending any session on it; what became of its subscriptions' slots."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        return _drop(server, cur, name)


def drop_if_unclaimed(server: DbServer, name: str) -> list[str] | None:
    """Drop `name` unless a running restore holds its claim: None if it was not dropped, else what became of
    its subscriptions' slots. Holding the claim while dropping keeps a second cleanup, or anything else that
    checks the claim, from racing this one."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (claim_key(name),))
        if not cur.fetchone()[0]:
            return None
        return _drop(server, cur, name)


def _drop(server: DbServer, cur, name: str) -> list[str]:
    """DROP DATABASE, after what would stop it: a template flag, refused connections (needed to drop its
    subscriptions), and subscriptions, which a database being dropped may not have."""
    from psycopg2 import sql

    db = sql.Identifier(name)
    cur.execute("SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s", (name,))
    found = cur.fetchone()
    if found is None:
        return []
    template, allows_connections = found
    if template:
        cur.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(db))
    notes = []
    if subscription_names(cur, name):
        if not allows_connections:
            cur.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(db))
        notes = drop_subscriptions(server, name)
    cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))
    return notes
