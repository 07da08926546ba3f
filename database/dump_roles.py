"""The roles a dump needs on the server it is restored into, found before anything changes: the owners of
its entries (pg_restore --list prints each entry's owner last), the roles its grants, default privileges
and policies name (read from the SQL of those entries only, through pg_restore -L), and, for a database
that does not exist yet, the database's own owner. A role missing here would make pg_restore fail half-way
(ALTER ... OWNER TO, GRANT ... TO a role that does not exist), so the restore refuses first, naming it.

pg_restore --list does not quote names, and role names may hold spaces: an entry's owner is the longest
run of its last words that names a role known here or in the backup's globals, else its last word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from backup_store.manifest import Backup
from common.errors import ToolkitError
from common.proc import run_tool, secret_file
from database.cluster_globals import (
    GlobalsPlan,
    ServerRoles,
    backup_globals,
    location_checker,
    plan_globals,
    require_globals,
)
from database.dumps import PgTools
from database.globals_script import ROLE, role_names, script_statements, shown, tokens, top_level_keyword_at
from database.server import DbServer

_ENTRY = re.compile(r"(\d+); \d+ \d+ (.*)")
_HEADER = re.compile(r"^-- Name: (.*); Type: (.*); Schema: (.*); Owner: .*$", re.M)
_NAMING_ROLES = ("ACL ", "DEFAULT ACL ", "POLICY ")  # entries whose SQL names roles besides the owner
_NOT_RESTORED = ("SUBSCRIPTION ",)  # restore passes --no-subscriptions


@dataclass
class RoleCheck:
    """What a restore found of the roles its dump needs: what --with-globals creates first, and the owner a
    database that does not exist yet is given (the dump's, when the role exists and DB_USER may give it)."""

    plan: GlobalsPlan | None = None
    database_owner: str | None = None
    notes: list[str] = field(default_factory=list)


def check_roles(server: DbServer, tools: PgTools, dump: Path, entries: list[str], backup: Backup | None,
                with_globals: bool, new_database: bool) -> RoleCheck:
    """Refuse (exit 1, nothing changed) if a role the dump needs is missing here and --with-globals would not
    create it, or if --with-globals is asked of a DB_USER that is not a superuser."""
    found = require_globals(backup) if with_globals else backup_globals(backup)
    have = ServerRoles.read(server)
    if with_globals and not have.superuser:
        raise ToolkitError(f"restore --with-globals creates roles and tablespaces, which takes a superuser, and "
                           f"{server.user} is not one: nothing was changed")
    check = RoleCheck()
    if with_globals:
        check.plan = plan_globals(found, have, location_checker(server))
    in_backup = {s.name for s in found or [] if s.kind == ROLE and s.creates}
    available = set(have.roles) | (set(check.plan.roles) if check.plan else set())
    needed = roles_named(tools, dump, entries, set(have.roles) | in_backup)
    owner = None
    if new_database:
        owner = database_owner(tools, dump, set(have.roles) | in_backup)
        if owner is not None:
            needed.setdefault(owner, []).insert(0, "owner of the database")
    missing = {name: what for name, what in needed.items() if name not in available}
    if missing:
        raise ToolkitError(_refusal(missing, in_backup))
    if owner is not None:
        if have.superuser or owner in have.member_of:
            check.database_owner = owner
            check.notes.append(f"a new database here: its owner is {shown(owner)}, as in the dump")
        else:
            check.notes.append(f"a new database here: its owner is {shown(server.user)}, not {shown(owner)} as in "
                               f"the dump ({shown(server.user)} is not a member of {shown(owner)})")
    return check


def _refusal(missing: dict[str, list[str]], in_backup: set[str]) -> str:
    """role X (owner of ...) does not exist on this server: and what to do."""
    roles = ", ".join(f"{shown(name)} ({_what(what)})" for name, what in sorted(missing.items()))
    one = len(missing) == 1
    head = f"role{'' if one else 's'} {roles} do{'es' if one else ''} not exist on this server"
    absent = sorted(set(missing) - in_backup)  # with --with-globals, every missing role is one of these
    if not absent:
        return f"{head}: restore with --with-globals to create {'it' if one else 'them'} from the backup"
    return (f"{head}, and the backup keeps no role {', '.join(map(shown, absent))}: create "
            f"{'it' if len(absent) == 1 else 'them'} first (CREATE ROLE); nothing was changed")


def _what(described: list[str]) -> str:
    more = len(described) - 1
    return described[0] + (f" and {more} more {'entry' if more == 1 else 'entries'}" if more else "")


def roles_named(tools: PgTools, dump: Path, entries: list[str], known: set[str]) -> dict[str, list[str]]:
    """Every role the dump's entries name (owners, grantees, policies' roles), each with the entries naming it."""
    named: dict[str, list[str]] = {}
    naming = []
    for line in entries:
        entry = parse_entry(line, known)
        if entry is None or entry[1].startswith(_NOT_RESTORED):
            continue
        owner, what = entry
        if owner:
            named.setdefault(owner, []).append(f"owner of {what}")
        if what.startswith(_NAMING_ROLES):
            naming.append(line)
    for role, what in _roles_in_sql(tools, dump, naming):
        named.setdefault(role, []).append(f"named in {what}")
    return named


def parse_entry(line: str, known: set[str]) -> tuple[str | None, str] | None:
    """(owner or None, the entry as `TYPE schema name`) of one pg_restore --list line; None if not an entry."""
    match = _ENTRY.fullmatch(line)
    if match is None:
        return None
    rest = match.group(2)
    if rest.endswith(" "):  # an entry without an owner (an extension, its comment)
        return None, _readable(rest.split(" ")[:-1])
    words = rest.split(" ")
    for start in range(2, len(words)):  # the longest run of last words that is a known role
        if " ".join(words[start:]) in known:
            return " ".join(words[start:]), _readable(words[:start])
    return words[-1], _readable(words[:-1])


def _readable(words: list[str]) -> str:
    return " ".join(word for word in words if word != "-")


def database_owner(tools: PgTools, dump: Path, known: set[str]) -> str | None:
    """The owner of the database the dump was taken of (its DATABASE entry, listed with --create), or None."""
    for line in _list(tools, dump, "--create"):
        entry = parse_entry(line, known)
        if entry is not None and entry[1].startswith("DATABASE ") and not entry[1].startswith("DATABASE PROP"):
            return entry[0]
    return None


def _list(tools: PgTools, dump: Path, *options: str) -> list[str]:
    result = run_tool([tools.path("pg_restore"), "--list", *options, str(dump)], f"pg_restore --list of {dump}")
    return [line for line in result.stdout.decode().splitlines() if line and not line.startswith(";")]


def _roles_in_sql(tools: PgTools, dump: Path, lines: list[str]) -> list[tuple[str, str]]:
    """(role, entry) for every role the SQL of these entries names, pg_restore printing only them."""
    if not lines:
        return []
    # The list in a memory-only file: a run killed at any moment leaves no file behind.
    with secret_file("\n".join(lines) + "\n") as use_list:
        result = run_tool([tools.path("pg_restore"), f"--use-list={use_list.child_path}", "--file=-", str(dump)],
                          f"pg_restore of the grants in {dump}", pass_fds=[use_list.fd])
    text = result.stdout.decode()
    found = []
    headers = list(_HEADER.finditer(text))
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        name, kind, schema = header.groups()
        what = _readable([kind, schema, name])
        for statement in script_statements(text[header.end():end]):
            found += [(role, what) for role in statement_roles(statement)]
    return found


def statement_roles(statement: str) -> list[str]:
    """The roles a GRANT, REVOKE, ALTER DEFAULT PRIVILEGES, CREATE POLICY or SET SESSION AUTHORIZATION names."""
    toks = tokens(statement)
    first = toks[0].keyword if toks else ""
    if first == "SET" and len(toks) > 3 and toks[1].keyword == "SESSION":
        return [toks[3].literal or toks[3].name]
    roles = []
    start = 0
    if first == "ALTER" and len(toks) > 3 and toks[1].keyword == "DEFAULT":
        start = next((i for i, tok in enumerate(toks) if tok.keyword in ("GRANT", "REVOKE")), len(toks))
        if toks[3].keyword == "FOR":
            roles += role_names(toks, 5, {"IN", "GRANT", "REVOKE"})
        first = toks[start].keyword if start < len(toks) else ""
    if first in ("GRANT", "REVOKE", "CREATE"):
        to = top_level_keyword_at(toks, "FROM" if first == "REVOKE" else "TO", start)
        if to is not None:
            roles += role_names(toks, to + 1, {"WITH", "GRANTED", "CASCADE", "RESTRICT", "USING"})
        by = top_level_keyword_at(toks, "GRANTED", start)
        if by is not None and by + 2 < len(toks):
            roles.append(toks[by + 2].name)
    return [role for role in roles if role]
