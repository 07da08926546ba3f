"""Running SQL files statement by statement: reading and hashing them, splitting them the way psql does,
executing them with the failing line named, and describing PostgreSQL errors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from common.errors import UsageError

_TRANSACTION_CONTROL = re.compile(r"(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT)\b(?!\s+(TO|PREPARED)\b)",
                                  re.I)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def read_sql(path: Path) -> str:
    """A SQL file's text, without a byte-order mark; an unreadable file is a UsageError."""
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex; an unreadable file is a UsageError."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def statements(text: str) -> list[tuple[int, str]]:
    """Top-level statements of a script as (offset of their first token, text), split the way psql does:
    semicolons in quotes, comments, dollar-quoted and BEGIN ATOMIC ... END bodies do not split."""
    statements: list[tuple[int, str]] = []
    first: int | None = None
    words: list[str] = []
    routine, depth, i = False, 0, 0
    while i < len(text):
        char = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if text.startswith("/*", i):  # block comments nest in PostgreSQL
            depth_of_comment, i = 1, i + 2
            while i < len(text) and depth_of_comment:
                depth_of_comment += text.startswith("/*", i) - text.startswith("*/", i)
                i += 2 if text.startswith(("/*", "*/"), i) else 1
            continue
        if char == ";" and depth == 0:
            if first is not None:
                statements.append((first, text[first:i]))
            first, words, routine, i = None, [], False, i + 1
            continue
        if first is None and not char.isspace():
            first = i
        after_word = i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_$")
        dollar = _DOLLAR_QUOTE.match(text, i) if char == "$" and not after_word else None
        word = _WORD.match(text, i) if not after_word else None
        if char in "'\"":
            escapes = char == "'" and i > 0 and text[i - 1] in "eE"  # E'...' strings take backslash escapes
            i += 1
            while i < len(text) and text[i] != char:
                i += 2 if escapes and text[i] == "\\" else 1
            i += 1  # a doubled quote closes one string and opens the next: same result
        elif dollar:
            close = text.find(dollar.group(), dollar.end())
            i = len(text) if close < 0 else close + len(dollar.group())
        elif word:
            # A SQL-standard routine body (BEGIN ATOMIC ... END, with CASE ... END inside) holds semicolons.
            keyword = word.group().upper()
            if len(words) < 4:
                words.append(keyword)
                routine = words[0] == "CREATE" and not {"FUNCTION", "PROCEDURE"}.isdisjoint(words)
            elif routine and keyword in ("BEGIN", "CASE"):
                depth += 1
            elif routine and keyword == "END" and depth:
                depth -= 1
            i = word.end()
        else:
            i += 1
    if first is not None:
        statements.append((first, text[first:]))
    return statements


def execute_script(cur, path: Path, text: str) -> None:
    """Run a script one statement at a time, so that a failure names its line even when PostgreSQL gives
    no position, and so that DROP INDEX CONCURRENTLY is not inside an implicit multi-statement block."""
    import psycopg2

    for done, (offset, statement) in enumerate(statements(text)):
        try:
            cur.execute(statement)
        except psycopg2.Error as exc:
            raise ScriptError(path, text, offset, exc, done) from exc


class ScriptError(Exception):
    """A statement of a script failed: `line` names where, `statements_done` how many ran before it."""

    def __init__(self, path: Path, text: str, offset: int, exc: Exception, statements_done: int):
        super().__init__(str(exc))
        self.path, self.exc, self.statements_done = path, exc, statements_done
        self.pgcode = getattr(exc, "pgcode", None)
        self.line = text.count("\n", 0, offset) + 1
        position = getattr(getattr(exc, "diag", None), "statement_position", None)
        if position and position.isdigit():  # the server pointed inside the statement: a more precise line
            self.line = text.count("\n", 0, offset + int(position) - 1) + 1

    def describe(self) -> str:
        """`<file>, line <n>: <error>`, for messages."""
        return f"{self.path.name}, line {self.line}: {pg_error(self.exc)}"


def terminated(text: str) -> str:
    """A script's text for psql: as it is, with a `;` added if its last statement lacks one (the toolkit runs
    such a file as it is; psql would join that statement to the next one)."""
    found = statements(text)
    if found and found[-1][0] + len(found[-1][1]) == len(text):
        return text.rstrip("\n") + "\n;\n"  # on a line of its own: the statement may end in a -- comment
    return text if text.endswith("\n") else text + "\n"


def quote_literal(text: str) -> str:
    """A string as a SQL literal, for scripts shown to the operator (the toolkit passes values as parameters)."""
    quoted = "'" + text.replace("'", "''") + "'"
    # E'' takes backslashes as escapes whatever standard_conforming_strings says; '' would depend on it.
    return "E" + quoted.replace("\\", "\\\\") if "\\" in text else quoted


def refuse_transaction_control(path: Path, text: str) -> None:
    """A UsageError if the script has a top-level BEGIN, COMMIT, ROLLBACK or the like."""
    for offset, statement in statements(text):
        if _TRANSACTION_CONTROL.match(statement):
            line = text.count("\n", 0, offset) + 1
            raise UsageError(f"{path.name}, line {line}: {statement.split()[0].upper()} in a migration would end "
                             "the transaction the toolkit runs it in; remove BEGIN/COMMIT from the file")


def pg_error(exc: Exception) -> str:
    """The first line of a PostgreSQL error, with the PL/pgSQL line it happened at if any."""
    diag = getattr(exc, "diag", None)
    lines = str(exc).strip().splitlines()
    message = (diag.message_primary if diag is not None else None) or (lines[0] if lines else type(exc).__name__)
    context = diag.context if diag is not None else None
    if context:  # e.g. "PL/pgSQL function f() line 3 at RAISE"
        return f"{message} ({context.strip().splitlines()[-1]})"
    return message
