"""`changes --sql`: the statements that put the kept database's rows back into the live one, written out as
they are made (rows read KEY_BATCH at a time), for the operator to read and then run with psql.

Rows only in the kept database become INSERTs, rows that differ UPDATEs to the kept values, rows only in the
live database DELETEs that are commented out. Values are the server's own text for each value, quoted as
string literals: the column's type reads them back as they were, whatever the type (jsonb, arrays, bytea).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from common.text import printable
from database.change_scan import Key, TableDiff, fetch_rows
from database.change_tables import Pairing, SequenceGap, TablePlan

if TYPE_CHECKING:
    from psycopg2.extensions import connection

# What the values were written with is what they are read with: the same settings as the reading sessions.
SCRIPT_SETTINGS = (("standard_conforming_strings", "on"), ("DateStyle", "ISO, YMD"), ("IntervalStyle", "postgres"),
                   ("TimeZone", "UTC"), ("lc_monetary", "C"))


def sql_script(kept: connection, live: connection, kept_name: str, live_name: str, pairing: Pairing,
               diffs: list[TableDiff], gaps: list[SequenceGap]) -> Iterator[str]:
    """The script, a chunk of lines at a time: header, INSERTs and UPDATEs parents first, setval of the
    sequences behind, the commented DELETEs children first, COMMIT."""
    yield "\n".join(_header(kept_name, live_name, pairing, diffs))
    for diff in diffs:
        yield from _inserts(kept, live, diff)
        yield from _updates(kept, live, diff)
    if gaps:
        yield "\n".join(["", "-- Sequences that went further in the kept database: moved on, so that new rows",
                         "-- do not take the keys of the rows above.", *(_setval(live, gap) for gap in gaps)])
    for diff in reversed(diffs):
        yield from _deletes(live, diff)
    yield "\nCOMMIT;"


def _header(kept_name: str, live_name: str, pairing: Pairing, diffs: list[TableDiff]) -> list[str]:
    inserts = sum(len(d.only_in_kept) for d in diffs)
    updates = sum(len(d.differ) for d in diffs)
    deletes = sum(len(d.only_in_live) for d in diffs)
    lines = [f"-- Puts rows of the kept database {printable(kept_name)} back into the live database "
             f"{printable(live_name)}.",
             f"-- Read it, then run it on the live database: psql -d {printable(live_name)} -f FILE",
             "-- It runs in one transaction and stops at the first error: then nothing is applied.",
             f"-- {inserts} INSERT(s) of rows only in the kept database, {updates} UPDATE(s) of rows that differ "
             "(to the kept values),",
             f"-- {deletes} DELETE(s) of rows only in the live database, commented out (see the end)."]
    lines += [f"--   {printable(d.plan.label)}: {len(d.only_in_kept)} INSERT, {len(d.differ)} UPDATE, "
              f"{len(d.only_in_live)} DELETE (commented out)" for d in diffs if d.total]
    lines.append("-- Tables come parents first along their foreign keys (no constraint needs to be deferrable).")
    if pairing.cycle:
        lines.append(f"-- The foreign keys of these form a cycle or lead into one, so they come last, in name order, "
                     f"and may need reordering: {printable(', '.join(pairing.cycle))}")
    if pairing.self_referring:
        lines.append(f"-- Rows of tables that refer to themselves go in key order: one referring to a row that "
                     f"comes later would fail: {printable(', '.join(pairing.self_referring))}")
    lines.append("-- Triggers of the live tables fire for these statements as for any other write.")
    lines += [f"-- Not compared: {printable(table)} ({why})" for table, why in pairing.not_compared]
    lines += [f"-- Columns: {printable(c.describe())}" for c in pairing.columns]
    lines += ["\\set ON_ERROR_STOP on", "SET client_encoding = 'UTF8';", "BEGIN;"]
    lines += [f"SET LOCAL {name} = '{value}';" for name, value in SCRIPT_SETTINGS]
    return lines


def _literal(conn: connection, value: str | None) -> str:
    from psycopg2 import sql

    return "NULL" if value is None else sql.Literal(value).as_string(conn)


def _where(conn: connection, plan: TablePlan, key: dict[str, str | None]) -> str:
    from psycopg2 import sql

    return " AND ".join(f"{sql.Identifier(c.name).as_string(conn)} = {_literal(conn, key[c.name])}"
                        for c in plan.key)


def _key_of(plan: TablePlan, key: Key) -> dict[str, str]:
    return {column.name: str(value) for column, value in zip(plan.key, key, strict=True)}


def _inserts(kept: connection, live: connection, diff: TableDiff) -> Iterator[str]:
    from psycopg2 import sql

    if not diff.only_in_kept:
        return
    plan = diff.plan
    columns = plan.writable
    override = " OVERRIDING SYSTEM VALUE" if any(c.identity_always for c in columns) else ""
    prefix = sql.SQL("INSERT INTO {} ({})").format(
        plan.identifier, sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)).as_string(live) + override
    values = "(" + ", ".join(["%s"] * len(columns)) + ")"
    yield f"\n-- {printable(plan.label)}: {len(diff.only_in_kept)} row(s) only in the kept database"
    with live.cursor() as cur:
        for batch in fetch_rows(kept, plan, diff.only_in_kept):
            yield "\n".join(f"{prefix} VALUES {cur.mogrify(values, [row[c.name] for c in columns]).decode()};"
                            for _, row in batch)


def _updates(kept: connection, live: connection, diff: TableDiff) -> Iterator[str]:
    from psycopg2 import sql

    if not diff.differ:
        return
    plan = diff.plan
    table = plan.identifier.as_string(live)
    yield f"\n-- {printable(plan.label)}: {len(diff.differ)} row(s) that differ, set to the kept values"
    for kept_rows, live_rows in zip(fetch_rows(kept, plan, diff.differ), fetch_rows(live, plan, diff.differ),
                                    strict=True):
        lines = []
        now = dict(live_rows)
        for key, row in kept_rows:
            changed = [c for c in plan.writable if now[key][c.name] != row[c.name]]
            if not changed:  # only a generated column differs
                continue
            assignments = ", ".join(f"{sql.Identifier(c.name).as_string(live)} = {_literal(live, row[c.name])}"
                                    for c in changed)
            lines.append(f"UPDATE {table} SET {assignments} WHERE {_where(live, plan, row)};")
        if lines:
            yield "\n".join(lines)


def _setval(live: connection, gap: SequenceGap) -> str:
    from psycopg2 import sql

    sequence = sql.Identifier(gap.schema, gap.name).as_string(live)
    return f"SELECT setval({_literal(live, sequence)}, greatest(last_value, {gap.kept})) FROM {sequence};"


def _deletes(live: connection, diff: TableDiff) -> Iterator[str]:
    if not diff.only_in_live:
        return
    plan = diff.plan
    table = plan.identifier.as_string(live)
    yield (f"\n-- {printable(plan.label)}: {len(diff.only_in_live)} row(s) only in the live database: deleted from "
           "the kept one after the backup, or\n-- written to the live one since the restore. Left as they are: "
           "remove the leading -- of a line to delete that row too.")
    for start in range(0, len(diff.only_in_live), 1000):
        yield "\n".join(_commented_delete(live, plan, table, key) for key in diff.only_in_live[start:start + 1000])


def _commented_delete(live: connection, plan: TablePlan, table: str, key: Key) -> str:
    """A DELETE behind `--`. A line break inside a quoted key or name would end the comment and let the rest
    of the value run as SQL, so such a row is named by its key (escaped), never written as a statement."""
    where = _key_of(plan, key)
    statement = f"DELETE FROM {table} WHERE {_where(live, plan, where)};"
    if any(char in statement for char in "\n\r\x0b\x0c\x85\u2028\u2029"):
        return f"-- a row whose key or table name holds a line break, left out here: key {printable(repr(where))}"
    return f"-- {statement}"
