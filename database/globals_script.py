"""Reading the SQL that pg_dumpall --globals-only writes, and the GRANTs pg_restore prints: each statement split
the way psql would (database.sql), cut into tokens, and told what it is about (which role, membership or
tablespace), so that a restore can run exactly the statements that concern what is missing.

Only the head of a statement is read (its first keywords and the names after them); what follows (a role's
attributes, a setting's value, a tablespace's options) is run as pg_dumpall wrote it, never rebuilt here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from database.dumps import quote_identifier
from database.sql import statements

# Kinds of statement in pg_dumpall --globals-only output.
SETUP = "setup"  # SET ...: the session pg_dumpall expects (standard_conforming_strings for its literals)
ROLE = "role"  # CREATE ROLE, ALTER ROLE ... WITH, COMMENT ON ROLE, SECURITY LABEL ON ROLE
ROLE_SETTING = "role setting"  # ALTER ROLE ... SET / RESET
MEMBERSHIP = "membership"  # GRANT role TO role
PARAMETER_GRANT = "parameter grant"  # GRANT/REVOKE ... ON PARAMETER
TABLESPACE = "tablespace"  # CREATE TABLESPACE
TABLESPACE_MORE = "tablespace more"  # ALTER / COMMENT / SECURITY LABEL / GRANT / REVOKE on a tablespace
OTHER = "other"

_TOKEN = re.compile(r"""
    (?P<space>\s+|--[^\n]*)
  | (?P<ident>"(?:[^"]|"")*")
  | (?P<string>[eE]'(?:[^'\\]|''|\\.)*'|'(?:[^']|'')*')
  | (?P<word>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<other>.)
""", re.X | re.S)
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
# Booleans pg_dumpall writes in ALTER ROLE ... WITH, and the pg_roles column each sets.
ROLE_FLAGS = {"SUPERUSER": "rolsuper", "INHERIT": "rolinherit", "CREATEROLE": "rolcreaterole",
              "CREATEDB": "rolcreatedb", "LOGIN": "rolcanlogin", "REPLICATION": "rolreplication",
              "BYPASSRLS": "rolbypassrls"}
# Words that stand for no role (PUBLIC) or for the session's own: never a role to look for.
_NOT_A_ROLE = {"PUBLIC", "CURRENT_USER", "SESSION_USER", "CURRENT_ROLE", "GROUP"}


@dataclass(frozen=True)
class Token:
    """One token of a statement: `kind` (ident, string, word, number, other), its text and where it starts."""

    kind: str
    text: str
    start: int

    @property
    def keyword(self) -> str:
        """The word in capitals ("" for anything but a bare word): how keywords are compared."""
        return self.text.upper() if self.kind == "word" else ""

    @property
    def name(self) -> str | None:
        """The identifier this token is, folded as PostgreSQL does (quoted: as written), or None."""
        if self.kind == "ident":
            return self.text[1:-1].replace('""', '"')
        return self.text.lower() if self.kind == "word" else None

    @property
    def literal(self) -> str | None:
        """The value of a string literal ('...' or E'...'), or None."""
        if self.kind != "string":
            return None
        if self.text[0] in "eE":
            return re.sub(r"\\(.)", r"\1", self.text[2:-1].replace("''", "'"))
        return self.text[1:-1].replace("''", "'")


def shown(name: str | None) -> str:
    """A role or tablespace name for messages: as it is when plain, else quoted ("app group")."""
    if name is None:
        return "(none)"
    return name if _PLAIN_NAME.fullmatch(name) else quote_identifier(name)


def tokens(statement: str) -> list[Token]:
    """The tokens of one statement, without spaces and comments."""
    found = []
    for match in _TOKEN.finditer(statement):
        if match.lastgroup != "space":
            found.append(Token(match.lastgroup, match.group(), match.start()))
    return found


def script_statements(text: str) -> list[str]:
    """The SQL statements of a pg_dumpall or pg_restore script, without psql's meta-commands (\\restrict)."""
    sql_only = "\n".join("" if line.startswith("\\") else line for line in text.split("\n"))
    return [statement for _, statement in statements(sql_only)]


def top_level_keyword_at(toks: list[Token], keyword: str, start: int = 0) -> int | None:
    """The index of the first `keyword` at parenthesis depth 0 from `start`, or None."""
    depth = 0
    for index in range(start, len(toks)):
        text = toks[index].text
        depth += (text == "(") - (text == ")")
        if depth == 0 and toks[index].keyword == keyword:
            return index
    return None


def role_names(toks: list[Token], start: int, stop: set[str]) -> list[str]:
    """The roles of a comma-separated list starting at `start`, up to a keyword in `stop` (PUBLIC and the
    session's own user left out)."""
    names = []
    for tok in toks[start:]:
        if tok.keyword in stop or tok.text == ";":
            break
        if tok.name is not None and tok.keyword not in _NOT_A_ROLE:
            names.append(tok.name)
    return names


@dataclass
class GlobalStatement:
    """A statement of pg_dumpall --globals-only output, and what it is about."""

    text: str
    kind: str
    name: str | None = None  # the role or tablespace it is about
    pairs: list[tuple[str, str]] = field(default_factory=list)  # MEMBERSHIP: (role, member)
    grantor: str | None = None  # MEMBERSHIP: GRANTED BY
    grantor_at: int | None = None  # where GRANTED BY starts in `text`
    grantees: list[str] = field(default_factory=list)  # privileges: the roles granted to or revoked from
    owner: str | None = None  # TABLESPACE
    location: str | None = None  # TABLESPACE
    flags: dict[str, bool | int] = field(default_factory=dict)  # ALTER ROLE ... WITH: pg_roles column -> value
    creates: bool = False  # CREATE ROLE / CREATE TABLESPACE

    def without_grantor(self) -> str:
        """The statement without its GRANTED BY clause (for a grantor this server does not have)."""
        return self.text if self.grantor_at is None else self.text[:self.grantor_at].rstrip()


def read_globals(text: str) -> list[GlobalStatement]:
    """Every statement of a pg_dumpall --globals-only script, in its order, with what it is about."""
    return [classify(statement) for statement in script_statements(text)]


def classify(statement: str) -> GlobalStatement:
    """What one statement of pg_dumpall's output is about (OTHER when it is none of the kinds above)."""
    toks = tokens(statement)
    words = [tok.keyword for tok in toks[:4]] + ["", "", "", ""]
    if words[0] == "SET":
        return GlobalStatement(statement, SETUP)
    if words[0] in ("CREATE", "ALTER") and words[1] in ("ROLE", "USER", "GROUP") and len(toks) > 2:
        name = toks[2].name
        if words[0] == "ALTER" and words[3] in ("SET", "RESET", "IN"):
            return GlobalStatement(statement, ROLE_SETTING, name)
        if words[0] == "CREATE":
            return GlobalStatement(statement, ROLE, name, creates=True)
        return GlobalStatement(statement, ROLE, name, flags=_role_flags(toks[3:]))
    if words[0] == "CREATE" and words[1] == "TABLESPACE" and len(toks) > 2:
        owner_at = top_level_keyword_at(toks, "OWNER")
        location_at = top_level_keyword_at(toks, "LOCATION")
        return GlobalStatement(statement, TABLESPACE, toks[2].name,
                               owner=toks[owner_at + 1].name if owner_at is not None else None,
                               location=toks[location_at + 1].literal if location_at is not None else None,
                               creates=True)
    about = _object_of(toks)
    if about == ("ROLE", "COMMENT") or about == ("ROLE", "SECURITY"):
        return GlobalStatement(statement, ROLE, _name_after(toks, "ROLE"))
    if words[0] == "ALTER" and words[1] == "TABLESPACE" and len(toks) > 2:
        return GlobalStatement(statement, TABLESPACE_MORE, toks[2].name)
    if about in (("TABLESPACE", "COMMENT"), ("TABLESPACE", "SECURITY")):
        return GlobalStatement(statement, TABLESPACE_MORE, _name_after(toks, "TABLESPACE"))
    if words[0] in ("GRANT", "REVOKE"):
        return _grant(statement, toks)
    return GlobalStatement(statement, OTHER)


def _object_of(toks: list[Token]) -> tuple[str, str] | None:
    """(ROLE or TABLESPACE, COMMENT or SECURITY) for COMMENT ON ... / SECURITY LABEL ... ON ...; else None."""
    first = toks[0].keyword if toks else ""
    if first not in ("COMMENT", "SECURITY"):
        return None
    on = top_level_keyword_at(toks, "ON")
    if on is None or on + 1 >= len(toks):
        return None
    return toks[on + 1].keyword, first


def _name_after(toks: list[Token], keyword: str) -> str | None:
    at = top_level_keyword_at(toks, keyword)
    return toks[at + 1].name if at is not None and at + 1 < len(toks) else None


def _grant(statement: str, toks: list[Token]) -> GlobalStatement:
    """GRANT role TO role (a membership), or GRANT/REVOKE ... ON PARAMETER / TABLESPACE ... TO/FROM roles."""
    revoke = toks[0].keyword == "REVOKE"
    to = top_level_keyword_at(toks, "FROM" if revoke else "TO")
    if to is None:
        return GlobalStatement(statement, OTHER)
    on = top_level_keyword_at(toks, "ON")
    grantees = role_names(toks, to + 1, {"WITH", "GRANTED", "CASCADE", "RESTRICT"})
    if on is not None and on < to:
        target = toks[on + 1].keyword if on + 1 < len(toks) else ""
        if target == "TABLESPACE":
            return GlobalStatement(statement, TABLESPACE_MORE, toks[on + 2].name if on + 2 < len(toks) else None,
                                   grantees=grantees)
        kind = PARAMETER_GRANT if target == "PARAMETER" else OTHER
        return GlobalStatement(statement, kind, grantees=grantees)
    if revoke:
        return GlobalStatement(statement, OTHER)
    granted = role_names(toks, 1, {"TO"})
    by = top_level_keyword_at(toks, "GRANTED", to)
    grantor = toks[by + 2].name if by is not None and by + 2 < len(toks) else None
    return GlobalStatement(statement, MEMBERSHIP, pairs=[(role, member) for role in granted for member in grantees],
                           grantor=grantor, grantor_at=toks[by].start if by is not None else None)


def _role_flags(toks: list[Token]) -> dict[str, bool | int]:
    """The attributes of ALTER ROLE ... WITH that pg_roles shows: flags, and the connection limit (-1 when
    the statement names none, as pg_dumpall leaves the default out)."""
    flags: dict[str, bool | int] = {"rolconnlimit": -1}
    for index, tok in enumerate(toks):
        word = tok.keyword
        if word in ROLE_FLAGS:
            flags[ROLE_FLAGS[word]] = True
        elif word.startswith("NO") and word[2:] in ROLE_FLAGS:
            flags[ROLE_FLAGS[word[2:]]] = False
        elif word == "LIMIT" and index + 1 < len(toks) and toks[index + 1].kind == "number":
            flags["rolconnlimit"] = int(toks[index + 1].text)
    return flags
