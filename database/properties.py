"""What a database is besides its content: the properties pg_dump leaves out unless it recreates the database
(--create), which a swap restore must give the database it builds beside the live one.

Every column of pg_database is either carried over, or named below as one the server keeps for itself; a
column this module does not know (a newer PostgreSQL) stops a swap restore before anything is built, so
that nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ToolkitError
from database.server import MAINTENANCE_DB, DbServer

# Given to CREATE DATABASE: the new database is born with them.
_AT_CREATE = frozenset({"datdba", "encoding", "datlocprovider", "datcollate", "datctype", "daticulocale",
                        "datlocale", "daticurules", "dattablespace"})
# Set on the restored database before the switch.
_AFTER_RESTORE = frozenset({"datistemplate", "datconnlimit", "datacl"})
# The server's own: identity, the swap's doing (datallowconn), or derived from what the dump restores.
_SERVER_KEPT = frozenset({
    "oid", "datname",
    "datallowconn",  # the swap refuses, then allows, connections; the restored database must take them
    "datfrozenxid", "datminmxid", "datlastsysoid",  # transaction-id bookkeeping of the database's own rows
    "datcollversion",  # recorded by CREATE DATABASE from the collation library itself
    "dathasloginevt",  # set by the login event triggers the dump restores
})
DEFAULT_TABLESPACE = "pg_default"  # template0's, so a database made from it without TABLESPACE is there
_LOCALE_PROVIDERS = {"c": "libc", "i": "icu", "b": "builtin"}
# Settings whose value is a list: written back as SQL list text, the way SHOW prints them.
_LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"}
_DATABASE_PRIVILEGES = {"CREATE", "CONNECT", "TEMPORARY"}


@dataclass
class DatabaseProperties:
    """A database's pg_database row by column name, with its owner's, encoding's and tablespace's names,
    its comment and its security labels."""

    name: str
    row: dict
    owner: str
    encoding: str
    tablespace: str
    comment: str | None
    labels: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, cur, name: str) -> DatabaseProperties | None:
        """The properties of database `name`, or None if there is no such database."""
        cur.execute("SELECT d.*, pg_get_userbyid(d.datdba) AS toolkit_owner,"
                    " pg_encoding_to_char(d.encoding) AS toolkit_encoding, t.spcname AS toolkit_tablespace,"
                    " shobj_description(d.oid, 'pg_database') AS toolkit_comment"
                    " FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s",
                    (name,))
        found = cur.fetchone()
        if found is None:
            return None
        row = dict(zip([column.name for column in cur.description], found, strict=True))
        cur.execute("SELECT provider, label FROM pg_shseclabel"
                    " WHERE objoid = %s AND classoid = 'pg_database'::regclass ORDER BY provider", (row["oid"],))
        labels = cur.fetchall()
        return cls(name, row, row.pop("toolkit_owner"), row.pop("toolkit_encoding"), row.pop("toolkit_tablespace"),
                   row.pop("toolkit_comment"), labels)

    def unknown_columns(self) -> list[str]:
        """The pg_database columns this toolkit does not know how to carry over (a newer server's)."""
        return sorted(set(self.row) - _AT_CREATE - _AFTER_RESTORE - _SERVER_KEPT)

    def refuse_unknown(self) -> None:
        """Stop before anything is built if the database has a property a swap would not carry over."""
        unknown = self.unknown_columns()
        if unknown:
            raise ToolkitError(f"database {self.name} has properties this toolkit cannot carry over to a new "
                               f"database (pg_database columns {', '.join(unknown)}): nothing was changed; "
                               "restore --in-place, which keeps the database itself")


def read_properties(server: DbServer, name: str) -> DatabaseProperties | None:
    """The properties of database `name` on the server, or None if there is no such database."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        return DatabaseProperties.read(cur, name)


def create_database_like(server: DbServer, name: str, like: DatabaseProperties | None) -> None:
    """Create an empty database with `like`'s owner, encoding, locale and tablespace (or the defaults)."""
    from psycopg2 import sql

    query = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    if like is not None:
        row = like.row
        query += sql.SQL(" OWNER {} ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Identifier(like.owner), sql.Literal(like.encoding), sql.Literal(row["datcollate"]),
            sql.Literal(row["datctype"]))
        if like.tablespace != DEFAULT_TABLESPACE:  # named, it takes CREATE on it, which pg_default is not granted
            query += sql.SQL(" TABLESPACE {}").format(sql.Identifier(like.tablespace))
        query += _locale_clause(row)
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query)


def _locale_clause(row: dict):
    from psycopg2 import sql

    provider = _LOCALE_PROVIDERS.get(row.get("datlocprovider") or "c")
    if provider is None:
        raise ToolkitError(f"unknown locale provider {row['datlocprovider']!r}: nothing was changed; "
                           "restore --in-place, which keeps the database itself")
    if provider == "libc":
        return sql.SQL("")
    clause = sql.SQL(" LOCALE_PROVIDER {}").format(sql.SQL(provider))
    locale = row.get("datlocale") or row.get("daticulocale")
    if locale:
        keyword = "ICU_LOCALE" if provider == "icu" else "BUILTIN_LOCALE"
        clause += sql.SQL(" {} {}").format(sql.SQL(keyword), sql.Literal(locale))
    if row.get("daticurules"):
        clause += sql.SQL(" ICU_RULES {}").format(sql.Literal(row["daticurules"]))
    return clause


def copy_database_properties(server: DbServer, source: DatabaseProperties, target: str) -> None:
    """Give `target` what `source` has besides its content: grants, ALTER DATABASE / ALTER ROLE IN DATABASE
    settings, connection limit, template flag, comment and security labels.

    Set after the restore, not at CREATE DATABASE: a connection limit would hold back pg_restore --jobs.
    """
    from psycopg2 import sql

    db = sql.Identifier(target)
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        _copy_grants(cur, source.name, db)
        _copy_settings(cur, source.row["oid"], db)
        cur.execute(sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {} IS_TEMPLATE {}").format(
            db, sql.Literal(source.row["datconnlimit"]), sql.Literal(source.row["datistemplate"])))
        if source.comment is not None:
            cur.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(source.comment)))
        for provider, label in source.labels:
            cur.execute(sql.SQL("SECURITY LABEL FOR {} ON DATABASE {} IS {}").format(
                sql.Identifier(provider), db, sql.Literal(label)))


def _copy_grants(cur, source: str, db) -> None:
    from psycopg2 import sql

    cur.execute("SELECT datacl IS NULL FROM pg_database WHERE datname = %s", (source,))
    if cur.fetchone()[0]:
        return  # the default privileges, which the new database has too
    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
    cur.execute("SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,"
                " a.privilege_type, a.is_grantable"
                " FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s", (source,))
    for grantee, privilege, grantable in cur.fetchall():
        if privilege not in _DATABASE_PRIVILEGES:
            continue
        who = sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)
        option = sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL("")
        cur.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(sql.SQL(privilege), db, who, option))


def _copy_settings(cur, source_oid: int, db) -> None:
    from psycopg2 import sql

    cur.execute("SELECT CASE WHEN setrole = 0 THEN NULL ELSE pg_get_userbyid(setrole) END,"
                " unnest(setconfig) FROM pg_db_role_setting WHERE setdatabase = %s", (source_oid,))
    for role, item in cur.fetchall():
        name, value = item.split("=", 1)
        value_sql = sql.SQL(value) if name in _LIST_SETTINGS else sql.Literal(value)
        target_sql = (sql.SQL("DATABASE {}").format(db) if role is None
                      else sql.SQL("ROLE {} IN DATABASE {}").format(sql.Identifier(role), db))
        cur.execute(sql.SQL("ALTER {} SET {} = {}").format(target_sql, sql.Identifier(name), value_sql))
