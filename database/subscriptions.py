"""Logical replication subscriptions across a swap restore, and when a database that has some is dropped.

A subscription lives in one database and streams from a replication slot on its publisher. A swap restore
hands the live database's subscriptions over to the restored one: each is created there, disabled, on the
same slot (connect, no new slot, no copy: its tables start as ready, since the data is the restored
database's own), then at the switch the live one is disabled, and after it the replaced database's copy
lets go of the slot and the restored one is enabled. The slot keeps every change meanwhile, so nothing
the publisher sends is lost or applied twice. The dump's own subscriptions are never restored
(pg_restore --no-subscriptions): they name a slot the live database is using.

A database with a subscription cannot be dropped; before dropping one, its subscriptions let go of their
slot and are dropped, which leaves the slot on the publisher (another subscription may be using it).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ToolkitError
from database.server import MAINTENANCE_DB, DbServer

# Columns of pg_subscription carried over as CREATE SUBSCRIPTION options (column -> option).
_OPTIONS = {"subbinary": "binary", "substream": "streaming", "subtwophasestate": "two_phase",
            "subdisableonerr": "disable_on_error", "subsynccommit": "synchronous_commit", "suborigin": "origin",
            "subpasswordrequired": "password_required", "subrunasowner": "run_as_owner", "subfailover": "failover"}
# Carried over otherwise (the connection, publications, slot, owner, an operator's SKIP, enabled at the
# switch), or the server's own (identity).
_CARRIED = frozenset({"subconninfo", "subpublications", "subslotname", "subowner", "subskiplsn", "subenabled"})
_SERVER_KEPT = frozenset({"oid", "subdbid", "subname"})
_STREAMING = {True: "on", False: "off", "t": "on", "f": "off", "p": "parallel"}
_NO_LSN = "0/0"


@dataclass
class Subscription:
    """A subscription of the live database as pg_subscription has it, with its owner's name and comment."""

    name: str
    row: dict
    owner: str
    comment: str | None

    @property
    def enabled(self) -> bool:
        return bool(self.row["subenabled"])


def subscription_names(cur, dbname: str) -> list[tuple[str, bool, str | None]]:
    """(name, enabled, slot name) of each subscription of `dbname` (columns any role may read)."""
    cur.execute("SELECT subname, subenabled, subslotname FROM pg_subscription"
                " WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = %s) ORDER BY subname", (dbname,))
    return cur.fetchall()


def read_subscriptions(server: DbServer, dbname: str) -> list[Subscription]:
    """The subscriptions of `dbname`, whole (their connection string takes a superuser to read)."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        if not subscription_names(cur, dbname):
            return []
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not cur.fetchone()[0]:
            raise ToolkitError(f"database {dbname} has logical replication subscriptions: handing them over to "
                               "the restored database takes a superuser (DB_USER); nothing was changed")
        cur.execute("SELECT s.*, pg_get_userbyid(s.subowner) AS toolkit_owner,"
                    " shobj_description(s.oid, 'pg_subscription') AS toolkit_comment FROM pg_subscription s"
                    " WHERE s.subdbid = (SELECT oid FROM pg_database WHERE datname = %s) ORDER BY s.subname",
                    (dbname,))
        columns = [column.name for column in cur.description]
        rows = [dict(zip(columns, found, strict=True)) for found in cur.fetchall()]
    return [Subscription(row["subname"], row, row.pop("toolkit_owner"), row.pop("toolkit_comment")) for row in rows]


def refuse_unmovable(server: DbServer, dbname: str, subscriptions: list[Subscription]) -> None:
    """Stop before anything is built if the swap could not hand `dbname`'s replication over whole."""
    for subscription in subscriptions:
        unknown = sorted(set(subscription.row) - set(_OPTIONS) - _CARRIED - _SERVER_KEPT)
        if unknown:
            raise ToolkitError(f"subscription {subscription.name} of {dbname} has settings this toolkit cannot "
                               f"carry over (pg_subscription columns {', '.join(unknown)}): nothing was changed")
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT string_agg(slot_name, ', ' ORDER BY slot_name) FROM pg_replication_slots"
                    " WHERE database = %s", (dbname,))
        slots = cur.fetchone()[0]
    if slots:
        raise ToolkitError(f"database {dbname} publishes through logical replication slots ({slots}), which "
                           "cannot move to another database: a swap would leave them on the replaced one; "
                           "nothing was changed: restore --in-place, or drop the slots and make them again after")
    if not subscriptions:
        return  # pg_subscription_rel is per database: only then is the live database connected to
    with server.session(dbname, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT s.subname, string_agg(r.srrelid::regclass::text, ', ' ORDER BY 1)"
                    " FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid"
                    " WHERE r.srsubstate <> 'r' GROUP BY s.subname ORDER BY 1")
        for name, tables in cur.fetchall():
            raise ToolkitError(f"subscription {name} of {dbname} is still copying tables ({tables}): nothing was "
                               "changed; restore when pg_subscription_rel shows them all ready ('r')")


def prepare_handover(server: DbServer, live: str, restored: str, subscriptions: list[Subscription]) -> None:
    """Create `live`'s subscriptions in `restored`, disabled, on the same slots, their tables ready.

    Refused if a publication now holds tables the live subscription has not taken in (a REFRESH it has not
    had): they would start as ready without their data."""
    from psycopg2 import sql

    with server.session(restored, autocommit=True) as conn, conn.cursor() as cur:
        for subscription in subscriptions:
            name = sql.Identifier(subscription.name)
            cur.execute(_create_statement(subscription))
            cur.execute(sql.SQL("ALTER SUBSCRIPTION {} OWNER TO {}").format(name, sql.Identifier(subscription.owner)))
            if subscription.comment is not None:
                cur.execute(sql.SQL("COMMENT ON SUBSCRIPTION {} IS {}").format(name, sql.Literal(subscription.comment)))
            if str(subscription.row.get("subskiplsn") or _NO_LSN) != _NO_LSN:
                cur.execute(sql.SQL("ALTER SUBSCRIPTION {} SKIP (lsn = {})").format(
                    name, sql.Literal(str(subscription.row["subskiplsn"]))))
            extra = _tables(cur, subscription.name) - _tables_in(server, live, subscription.name)
            if extra:
                raise ToolkitError(
                    f"the publications of subscription {subscription.name} of {live} now hold tables it has not "
                    f"taken in ({', '.join(sorted(extra))}), which would start without their data: run ALTER "
                    f"SUBSCRIPTION {subscription.name} REFRESH PUBLICATION in {live} first; nothing was switched in")


def _create_statement(subscription: Subscription):
    from psycopg2 import sql

    row = subscription.row
    options = [sql.SQL("connect = true, enabled = false, create_slot = false, copy_data = false")]
    slot = row["subslotname"]
    options.append(sql.SQL("slot_name = {}").format(sql.Literal(slot) if slot is not None else sql.SQL("NONE")))
    for column, option in _OPTIONS.items():
        if column not in row:
            continue
        value = row[column]
        if column == "substream":
            value = _STREAMING[value]
        elif column == "subtwophasestate":
            value = value != "d"
        options.append(sql.SQL("{} = {}").format(sql.SQL(option), sql.Literal(value)))
    return sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH ({})").format(
        sql.Identifier(subscription.name), sql.Literal(row["subconninfo"]),
        sql.SQL(", ").join(map(sql.Identifier, row["subpublications"])), sql.SQL(", ").join(options))


def _tables(cur, subscription: str) -> set[str]:
    cur.execute("SELECT r.srrelid::regclass::text FROM pg_subscription_rel r JOIN pg_subscription s"
                " ON s.oid = r.srsubid WHERE s.subname = %s AND s.subdbid ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())", (subscription,))
    return {name for (name,) in cur.fetchall()}


def _tables_in(server: DbServer, dbname: str, subscription: str) -> set[str]:
    with server.session(dbname, autocommit=True) as conn, conn.cursor() as cur:
        return _tables(cur, subscription)


def set_enabled(server: DbServer, dbname: str, names: list[str], enabled: bool) -> None:
    """ENABLE or DISABLE the subscriptions `names` of `dbname`."""
    from psycopg2 import sql

    if not names:
        return
    action = sql.SQL("ENABLE" if enabled else "DISABLE")
    with server.session(dbname, autocommit=True) as conn, conn.cursor() as cur:
        for name in names:
            cur.execute(sql.SQL("ALTER SUBSCRIPTION {} {}").format(sql.Identifier(name), action))


def release_slots(server: DbServer, dbname: str) -> None:
    """Make every subscription of `dbname` disabled and without a slot, so that dropping it (or the
    database) leaves the slot on the publisher to whichever subscription uses it now."""
    from psycopg2 import sql

    with server.session(dbname, autocommit=True) as conn, conn.cursor() as cur:
        for name, enabled, slot in subscription_names(cur, dbname):
            if enabled:
                cur.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(name)))
            if slot is not None:
                cur.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(sql.Identifier(name)))


def drop_subscriptions(server: DbServer, dbname: str) -> list[str]:
    """Drop the subscriptions of `dbname`, which is about to be dropped, leaving their slots on the
    publisher; what became of each slot, for the report."""
    from psycopg2 import sql

    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        found = subscription_names(cur, dbname)
    if not found:
        return []
    release_slots(server, dbname)
    with server.session(dbname, autocommit=True) as conn, conn.cursor() as cur:
        for name, _enabled, _slot in found:
            cur.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))
        notes = []
        for name, _enabled, slot in found:
            if slot is None:
                notes.append(f"dropped subscription {name} of {dbname} (it had no slot)")
                continue
            cur.execute("SELECT d.datname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
                        " WHERE s.subslotname = %s ORDER BY 1", (slot,))
            users = [user for (user,) in cur.fetchall()]
            if users:
                notes.append(f"dropped subscription {name} of {dbname}; its slot {slot} stays on the publisher "
                             f"for the subscription of {', '.join(users)}")
            else:
                notes.append(f"dropped subscription {name} of {dbname}; its slot {slot} stays on the publisher and "
                             "no subscription here uses it: if no other subscriber does, drop it there "
                             f"(SELECT pg_drop_replication_slot('{slot}')), or it holds WAL back")
    return notes


def refuse_in_place(server: DbServer, dbname: str) -> None:
    """Stop before anything changes if `dbname` has subscriptions: pg_restore --clean drops and re-creates
    their tables, which leaves the subscriptions skipping every change to them without a word."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        names = [name for name, _enabled, _slot in subscription_names(cur, dbname)]
    if names:
        raise ToolkitError(f"database {dbname} has logical replication subscriptions ({', '.join(names)}): an "
                           "in-place restore re-creates their tables, which they would then skip silently; nothing "
                           "was changed: restore without --in-place (the swap hands subscriptions over)")


def undo_statements(live: str, subscriptions: list[Subscription]) -> tuple[list[str], list[str]]:
    """The statements that hand the subscriptions back when a swap is undone by renames: (to run connected
    to `live` before the renames, to run connected to `live` after them)."""
    before, after = [], []
    for subscription in subscriptions:
        name = '"' + subscription.name.replace('"', '""') + '"'
        before += [f"ALTER SUBSCRIPTION {name} DISABLE", f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)"]
        slot = subscription.row["subslotname"]
        if slot is not None:
            after.append(f"ALTER SUBSCRIPTION {name} SET (slot_name = '{slot}')")
        if subscription.enabled:
            after.append(f"ALTER SUBSCRIPTION {name} ENABLE")
    return before, after
