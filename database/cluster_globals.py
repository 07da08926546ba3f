"""Roles, their memberships and settings, and tablespaces: what a database needs of its cluster and pg_dump
leaves out. Every backup keeps them as `pg_dumpall --globals-only` wrote them (globals.sql, checksummed by the
manifest like the dump), and `restore --with-globals` creates, before the restore, what the server lacks.

How missing objects are created: by running pg_dumpall's own statements, chosen, never by statements
rebuilt from a parsed model. pg_dumpall writes each role as CREATE ROLE then ALTER ROLE ... WITH (its
attributes, its password hash when kept), each setting as ALTER ROLE ... SET, each membership as one GRANT,
each tablespace as CREATE TABLESPACE then its options and grants: one statement concerns one object. So
the file is split into statements as psql would (database.sql), each is told what it is about by its first
keywords and names (database.globals_script), and a restore runs those that concern a role, membership or
tablespace missing here, in the file's order. Whatever a statement says past its head (attributes a newer
server adds, a setting's value, quoting) is run as the server that wrote it meant it, and a statement of a
kind not recognised is never run. The only text changed is a membership's GRANTED BY when that grantor
exists neither here nor in the backup. Roles, settings and memberships are created in one transaction;
CREATE TABLESPACE cannot be in one, so tablespaces come after it, each on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from backup_store.manifest import Backup
from backup_store.staging import Staging
from common.errors import ToolkitError, UsageError
from common.files import PRIVATE_FILE
from database.backup_info import DbBackupInfo
from database.dumps import PgTools, with_full_disk_named
from database.globals_script import (
    MEMBERSHIP,
    PARAMETER_GRANT,
    ROLE,
    ROLE_FLAGS,
    ROLE_SETTING,
    SETUP,
    TABLESPACE,
    TABLESPACE_MORE,
    GlobalStatement,
    read_globals,
    shown,
)
from database.server import MAINTENANCE_DB, DbServer
from database.sql import pg_error

GLOBALS_FILE = "globals.sql"
_PERMISSION_DENIED = "permission denied"  # pg_dumpall's error when DB_USER may not read a catalog


def keep_globals(staging: Staging, server: DbServer, tools: PgTools, role_passwords: bool,
                 warn: Callable[[str], None]) -> None:
    """pg_dumpall --globals-only into the backup being built, and whether it holds them in its metadata.

    Without the privilege to read them (a non-superuser asking for passwords) the backup goes on without
    them, with a warning; any other failure fails the backup, as pg_dump's would."""
    path = staging.path / GLOBALS_FILE
    # Made 0600 before pg_dumpall writes into it: with passwords it holds their hashes.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    argv = [tools.path("pg_dumpall"), "--globals-only", "--quote-all-identifiers", "--encoding=UTF8",
            f"--file={path}", "--no-password"]
    if not role_passwords:
        argv.append("--no-role-passwords")  # reads pg_roles, which every role may, not pg_authid
    result = server.run_client(argv, "pg_dumpall --globals-only", check=False)
    if result.returncode != 0:
        path.unlink()
        first = (result.stderr.strip().splitlines() or ["no error message"])[0]
        if _PERMISSION_DENIED not in result.stderr:
            raise with_full_disk_named(ToolkitError(f"pg_dumpall --globals-only failed: {first}"),
                                       f"the backup folder {staging.path.parent} (BACKUP_DIR)")
        warn(f"the backup keeps no roles or tablespaces: {server.user} may not read them ({first})"
             f"{'; try without --with-role-passwords' if role_passwords else ''}")
        DbBackupInfo.set_in(staging.extra, has_globals=False, role_passwords=False)
        return
    staging.adopt(GLOBALS_FILE)
    DbBackupInfo.set_in(staging.extra, has_globals=True, role_passwords=role_passwords)


def globals_summary(backup: Backup) -> str:
    """One line saying what a backup keeps of its cluster's roles and tablespaces."""
    info = DbBackupInfo.load(backup)
    if not info.has_globals:
        return "roles and tablespaces: not kept" + (" (taken before they were)" if info.has_globals is None else "")
    if info.role_passwords:
        return f"roles and tablespaces: kept in {GLOBALS_FILE}, with the roles' password hashes (mode 0600)"
    return f"roles and tablespaces: kept in {GLOBALS_FILE}, without passwords"


def backup_globals(backup: Backup | None) -> list[GlobalStatement] | None:
    """The statements of a backup's globals file, or None for a backup without one (or a dump made elsewhere)."""
    if backup is None or not DbBackupInfo.load(backup).has_globals:
        return None
    # From the manifest, not the folder: a file that is a symlink would make us read anything.
    if not any(entry.path == GLOBALS_FILE and entry.type == "file" for entry in backup.entries):
        raise ToolkitError(f"backup {backup.id} says it keeps roles and tablespaces, but its manifest has no "
                           f"{GLOBALS_FILE}: the backup is damaged")
    try:
        return read_globals((backup.path / GLOBALS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolkitError(f"cannot read {GLOBALS_FILE} of backup {backup.id}: {exc}") from None


def require_globals(backup: Backup | None) -> list[GlobalStatement]:
    """The backup's globals for --with-globals; a backup without them is bad input (exit 2)."""
    found = backup_globals(backup)
    if found is None:
        what = f"backup {backup.id}" if backup else "a dump made outside the toolkit"
        raise UsageError(f"--with-globals: {what} keeps no roles or tablespaces (made before they were kept, or "
                         "by a DB_USER that could not read them): restore without --with-globals")
    return found


@dataclass
class ServerRoles:
    """What the server has of what globals hold: roles (name -> pg_roles attributes), memberships
    (role, member), tablespaces; and whether DB_USER is a superuser, and the roles it is a member of."""

    roles: dict[str, dict]
    memberships: set[tuple[str, str]]
    tablespaces: set[str]
    superuser: bool
    member_of: set[str]

    @classmethod
    def read(cls, server: DbServer) -> ServerRoles:
        """Read them from the server."""
        columns = [*ROLE_FLAGS.values(), "rolconnlimit"]
        with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT rolname, {', '.join(columns)} FROM pg_roles")
            roles = {row[0]: dict(zip(columns, row[1:], strict=True)) for row in cur.fetchall()}
            cur.execute("SELECT r.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid"
                        " JOIN pg_roles m ON m.oid = a.member")
            memberships = set(cur.fetchall())
            cur.execute("SELECT spcname FROM pg_tablespace")
            tablespaces = {name for (name,) in cur.fetchall()}
            cur.execute("SELECT rolname FROM pg_roles WHERE pg_has_role(current_user, oid, 'MEMBER')")
            member_of = {name for (name,) in cur.fetchall()}
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            superuser = cur.fetchone()[0]
        return cls(roles, memberships, tablespaces, superuser, member_of)


@dataclass
class GlobalsPlan:
    """What --with-globals creates: the statements to run, and what they make, for the report."""

    # (what it is about, for an error: never the text, which may hold a password hash; the statement)
    in_transaction: list[tuple[str, str]] = field(default_factory=list)  # roles, settings, memberships, grants
    tablespace_statements: list[tuple[str, list[str]]] = field(default_factory=list)  # (name, statements)
    roles: dict[str, str] = field(default_factory=dict)  # name -> its attributes, for the report
    settings: dict[str, int] = field(default_factory=dict)  # role -> how many settings
    memberships: list[tuple[str, str]] = field(default_factory=list)  # (role, member)
    tablespaces: dict[str, str] = field(default_factory=dict)  # name -> location
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self, done: bool) -> list[str]:
        """The report: what was (or, with --dry-run, would be) created, then notes (warnings go to stderr)."""
        verb = "created" if done else "would create"
        lines = [f"{verb} role {shown(name)}" + (f" ({attributes})" if attributes else "")
                 + (f", with {self.settings[name]} setting(s)" if self.settings.get(name) else "")
                 for name, attributes in self.roles.items()]
        made = "made" if done else "would make"
        lines += [f"{made} {shown(member)} a member of {shown(role)}" for role, member in self.memberships]
        lines += [f"{verb} tablespace {shown(name)} at {location}" for name, location in self.tablespaces.items()]
        if not lines:
            lines.append("every role, membership and tablespace of the backup exists here: nothing to create")
        return lines + [f"note: {note}" for note in self.notes]

    def to_dict(self) -> dict:
        """For --json."""
        return {"roles": list(self.roles), "memberships": [{"role": r, "member": m} for r, m in self.memberships],
                "tablespaces": [{"name": n, "location": loc} for n, loc in self.tablespaces.items()],
                "notes": self.notes, "warnings": self.warnings}


def plan_globals(found: list[GlobalStatement], have: ServerRoles, location_exists: Callable[[str], bool]
                 ) -> GlobalsPlan:
    """Choose the statements that create what the server lacks (see the module's docstring); existing
    roles are never altered, and a difference in their attributes is a note."""
    plan = GlobalsPlan()
    new = {s.name for s in found if s.kind == ROLE and s.creates and s.name not in have.roles}
    known = set(have.roles) | new
    new_tablespaces: set[str] = set()
    for statement in found:
        if statement.kind == SETUP and "client_encoding" not in statement.text.lower():
            plan.in_transaction.append(("the session's settings", statement.text))  # psycopg2 sets the encoding
        elif statement.kind in (ROLE, ROLE_SETTING) and statement.name in new:
            plan.in_transaction.append((f"{statement.kind} {shown(statement.name)}", statement.text))
            _describe_role(plan, statement)
        elif statement.kind == ROLE and statement.flags and statement.name in have.roles:
            _compare_role(plan, statement, have.roles[statement.name])
        elif statement.kind == MEMBERSHIP:
            _plan_membership(plan, statement, have, known, new)
        elif statement.kind == PARAMETER_GRANT and statement.grantees and set(statement.grantees) <= new:
            plan.in_transaction.append((f"a parameter privilege of {', '.join(map(shown, statement.grantees))}",
                                        statement.text))
        elif statement.kind == TABLESPACE and statement.name not in have.tablespaces:
            if _plan_tablespace(plan, statement, known, location_exists):
                new_tablespaces.add(statement.name)
        elif statement.kind == TABLESPACE_MORE and set(statement.grantees) <= known and (
                statement.name in new_tablespaces
                or (statement.name in have.tablespaces and statement.grantees and set(statement.grantees) <= new)):
            _more_for_tablespace(plan, statement)
    return plan


def _describe_role(plan: GlobalsPlan, statement: GlobalStatement) -> None:
    if statement.kind == ROLE_SETTING:
        plan.settings[statement.name] = plan.settings.get(statement.name, 0) + 1
    elif statement.flags:
        plan.roles[statement.name] = _attributes(statement.flags)
    else:
        plan.roles.setdefault(statement.name, "")


def _attributes(flags: dict[str, bool | int]) -> str:
    """The attributes worth naming: those a role created without options would not have."""
    named = [word for word, column in ROLE_FLAGS.items() if flags.get(column) and word != "INHERIT"]
    named += ["NOINHERIT"] if flags.get("rolinherit") is False else []
    named += [f"CONNECTION LIMIT {flags['rolconnlimit']}"] if flags.get("rolconnlimit", -1) != -1 else []
    return " ".join(named)


def _compare_role(plan: GlobalsPlan, statement: GlobalStatement, here: dict) -> None:
    """A note when a role that exists here has other attributes than in the backup (it is left as it is)."""
    differ = []
    for column, value in statement.flags.items():
        if here.get(column) != value:
            word = next((w for w, c in ROLE_FLAGS.items() if c == column), "CONNECTION LIMIT")
            differ.append(f"{_flag(word, value)} (here {_flag(word, here.get(column))})")
    if differ:
        plan.notes.append(f"role {shown(statement.name)} exists here and was left as it is; in the backup it has "
                          + ", ".join(differ))


def _flag(word: str, value: bool | int | None) -> str:
    if word == "CONNECTION LIMIT":
        return f"{word} {value}"
    return word if value else f"NO{word}"


def _plan_membership(plan: GlobalsPlan, statement: GlobalStatement, have: ServerRoles, known: set[str],
                     new: set[str]) -> None:
    missing = [pair for pair in statement.pairs if pair not in have.memberships]
    if not missing:
        return
    if not any(role in new or member in new for role, member in missing):
        # Between two roles this server already has: granting it would change what an existing role may do.
        pairs = " and ".join(f"{shown(m)} is not a member of {shown(r)}" for r, m in missing)
        plan.notes.append(f"left as it is here: {pairs} (both roles exist on this server, and --with-globals "
                          "never alters an existing role)")
        return
    unknown = sorted({name for pair in missing for name in pair} - known)
    if unknown:
        plan.warnings.append(f"membership {' and '.join(f'of {shown(m)} in {shown(r)}' for r, m in missing)} not "
                             f"granted: {', '.join(map(shown, unknown))} exists neither here nor in the backup")
        return
    if len(missing) < len(statement.pairs):  # one GRANT naming memberships that exist would alter them
        plan.notes.append(f"not run (some memberships it grants exist here): {statement.text}")
        return
    text = statement.text
    if statement.grantor is not None and statement.grantor not in known:
        text = statement.without_grantor()
        plan.notes.append(f"granted by DB_USER instead of {shown(statement.grantor)}, which does not exist here: "
                          f"{' and '.join(f'{shown(m)} in {shown(r)}' for r, m in missing)}")
    plan.in_transaction.append((f"membership {' and '.join(f'of {shown(m)} in {shown(r)}' for r, m in missing)}",
                                text))
    plan.memberships += missing


def _plan_tablespace(plan: GlobalsPlan, statement: GlobalStatement, known: set[str],
                     location_exists: Callable[[str], bool]) -> bool:
    """Plan a missing tablespace's CREATE if its owner will exist and its folder does; else a warning."""
    name = shown(statement.name)
    if statement.owner not in known:
        plan.warnings.append(f"tablespace {name} not created: its owner {shown(statement.owner)} exists neither "
                             "here nor in the backup")
        return False
    if not statement.location or not location_exists(statement.location):
        plan.warnings.append(f"tablespace {name} not created: its location {statement.location or '(none)'} does "
                             "not exist on the server; make the folder (empty, owned by the server's OS user) and "
                             "restore again")
        return False
    plan.tablespaces[statement.name] = statement.location
    plan.tablespace_statements.append((statement.name, [statement.text]))
    return True


def _more_for_tablespace(plan: GlobalsPlan, statement: GlobalStatement) -> None:
    for name, statements in plan.tablespace_statements:
        if name == statement.name:
            statements.append(statement.text)
            return
    plan.tablespace_statements.append((statement.name, [statement.text]))


def location_checker(server: DbServer) -> Callable[[str], bool]:
    """Whether a folder exists, as the server sees it (pg_stat_file: a superuser's, which --with-globals is)."""

    def exists(location: str) -> bool:
        with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT (pg_stat_file(%s, true)).isdir", (location,))
            return bool(cur.fetchone()[0])

    return exists


def create_globals(server: DbServer, plan: GlobalsPlan, warn: Callable[[str], None]) -> None:
    """Warn of what the plan leaves out, and run it: roles, settings and memberships in one transaction (a
    failure leaves none of them), then each tablespace on its own; a tablespace that cannot be created is a
    warning, as a missing location is (a dump that needs it then fails pg_restore, which changes nothing)."""
    import psycopg2

    for warning in plan.warnings:
        warn(warning)
    conn = server.connect(MAINTENANCE_DB)
    about = ""
    try:
        conn.set_client_encoding("UTF8")
        with conn.cursor() as cur:
            for what, statement in plan.in_transaction:
                about = what  # named in the error if this one fails
                cur.execute(statement)
        conn.commit()
    except psycopg2.Error as exc:
        raise ToolkitError(f"could not create the backup's roles ({about}: {pg_error(exc)}): none was created "
                           "and nothing was restored") from None
    finally:
        conn.close()
    for name, statements in plan.tablespace_statements:
        try:
            with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        except psycopg2.Error as exc:
            plan.tablespaces.pop(name, None)
            plan.warnings.append(f"tablespace {shown(name)} not created: {pg_error(exc)}")
            warn(plan.warnings[-1])


def drop_created_globals(server: DbServer, plan: GlobalsPlan) -> list[str]:
    """Undo create_globals after the restore it came before has failed: the tablespaces it created, each on its
    own, then its roles, each in a savepoint of one transaction (their memberships go with them). What could not
    be dropped (a role that owns something by now) stays and is named in the lines returned."""
    import psycopg2
    from psycopg2 import sql

    left = []
    for name in plan.tablespaces:
        try:
            with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
                cur.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(name)))
        except psycopg2.Error as exc:
            left.append(f"tablespace {shown(name)} kept: {pg_error(exc)}")
    if not plan.roles:
        return left
    with server.session(MAINTENANCE_DB) as conn, conn.cursor() as cur:
        for name in plan.roles:
            cur.execute("SAVEPOINT drop_role")
            try:
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            except psycopg2.Error as exc:
                cur.execute("ROLLBACK TO SAVEPOINT drop_role")
                left.append(f"role {shown(name)} kept: {pg_error(exc)}")
        conn.commit()
    return left
