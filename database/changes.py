"""`database_rollback.py changes BEFORE_DB`: what differs, row by row on the primary key, between a database a
swap restore kept (`<name>__before_...`: the database as it was when it was replaced, with the writes made
after the backup) and the live database DB_NAME; with --sql, the statements that put the kept rows back.

Both databases are read in one REPEATABLE READ, READ ONLY transaction each, with the same settings for how
values print, so that the same row prints, and hashes, the same on both sides.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from common.text import count, printable, table
from database.change_scan import Row, TableDiff, diff_table, fetch_rows
from database.change_sql import SCRIPT_SETTINGS, sql_script
from database.change_tables import (
    Pairing,
    SequenceGap,
    TablePlan,
    pair_tables,
    read_foreign_keys,
    read_sequences,
    read_shapes,
    select_tables,
    sequence_gaps,
)
from database.scratch import KEPT_ROLES, scratch_databases
from database.server import DbServer
from database.sql import pg_error

if TYPE_CHECKING:
    from psycopg2.extensions import connection

LISTED_ROWS = 50  # per table and kind, in the text output; --json and --sql give every row
VALUE_CHARS = 60
# How values print decides their text and hash: the same on both sides whatever each database's defaults.
READ_SETTINGS = (*SCRIPT_SETTINGS[1:], ("bytea_output", "hex"), ("extra_float_digits", "1"),
                 ("search_path", "pg_catalog"), ("statement_timeout", "0"),
                 ("idle_in_transaction_session_timeout", "0"))
KINDS = (("only_in_kept", "only in the kept database"), ("only_in_live", "only in the live database"),
         ("differ", "differ, live value -> kept value"))


class DatabasePair:
    """Read-only sessions on the kept database and the live one, each in one REPEATABLE READ transaction."""

    def __init__(self, server: DbServer, kept_name: str):
        """Open both; BEFORE_DB that does not exist is a UsageError naming the databases restores kept."""
        self.kept_name, self.live_name = kept_name, server.name
        self.live: connection = _reading_session(server, server.name)
        try:
            _require_kept(self.live, kept_name)
            self.kept: connection = _reading_session(server, kept_name)
        except BaseException:
            self.live.close()
            raise

    def close(self) -> None:
        """Close both sessions (they only read: nothing to commit)."""
        self.kept.close()
        self.live.close()

    def plan(self, wanted: list[str]) -> tuple[Pairing, list[SequenceGap]]:
        """The tables to compare (those of --table, if given) and the sequences behind in the live database."""
        with self.kept.cursor() as kept, self.live.cursor() as live:
            kept_shapes, live_shapes = read_shapes(kept), read_shapes(live)
            chosen = select_tables(set(kept_shapes) | set(live_shapes), wanted) if wanted else None
            pairing = pair_tables(kept_shapes, live_shapes, chosen, read_foreign_keys(live))
            return pairing, sequence_gaps(read_sequences(kept), read_sequences(live), pairing.plans)


def _reading_session(server: DbServer, dbname: str) -> connection:
    conn = server.connect(dbname)
    conn.set_client_encoding("UTF8")
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    with conn.cursor() as cur:
        for name, value in (*READ_SETTINGS, ("lock_timeout", f"{server.lock_timeout}s")):
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))
    return conn


def _require_kept(live: connection, name: str) -> None:
    with live.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is not None:
            return
        kept = [s.name for s in scratch_databases(cur, live.info.dbname) if s.role in KEPT_ROLES]
    hint = f"; kept by restores: {', '.join(kept[-3:])}" if kept else ""
    raise UsageError(f"no database {name!r} on this server{hint}")


def table_arguments(values: list[str] | None) -> list[str]:
    """--table T, repeated or comma separated."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def changes_command(ctx: Context) -> Result:
    """changes BEFORE_DB: rows only in the kept database, only in the live one, and rows that differ."""
    import psycopg2

    server = DbServer.from_settings(ctx.settings)
    before: str = ctx.args.before_db
    if ctx.args.sql and ctx.json:
        raise UsageError("--sql prints a SQL script and --json a JSON document: give one of them")
    if before == server.name:
        raise UsageError(f"BEFORE_DB {before!r} is the live database DB_NAME itself: name the database a restore "
                         f"kept ({server.name}__before_...)")
    wanted = table_arguments(ctx.args.table)
    pair = DatabasePair(server, before)
    try:
        pairing, gaps = pair.plan(wanted)
        ctx.info(f"comparing {count(len(pairing.plans), 'table')} of {before} (kept) and {server.name} (live) ...")
        diffs = [diff_table(pair.kept, pair.live, plan, before, server.name) for plan in pairing.plans]
        by_name = sorted(diffs, key=lambda diff: diff.plan.label)  # people look tables up by name
        data = _counts(pair, pairing, by_name, gaps)
        if ctx.args.sql:  # parents first
            script = sql_script(pair.kept, pair.live, before, server.name, pairing, diffs, gaps)
            result, pair = Result(data, report=True, stream=_closing(pair, script)), None  # the stream closes it
            return result
        lines = _summary(pair, pairing, by_name, gaps)
        if ctx.json:
            data["rows"] = {d.plan.label: _all_rows(pair, d) for d in by_name if d.total}
        else:
            for diff in by_name:
                lines += _listing(pair, diff)
        return Result(data, lines, report=True)
    except psycopg2.Error as exc:
        raise ToolkitError(f"comparing {before} with {server.name} failed: {pg_error(exc)}") from None
    finally:
        if pair is not None:
            pair.close()


def _closing(pair: DatabasePair, chunks: Iterator[str]) -> Iterator[str]:
    """`chunks`, then the sessions closed, however the printing ends."""
    import psycopg2

    try:
        yield from chunks
    except psycopg2.Error as exc:
        raise ToolkitError(f"writing the SQL failed: {pg_error(exc)} (the script is incomplete: it has no "
                           "COMMIT, so psql would apply none of it)") from None
    finally:
        pair.close()


def _counts(pair: DatabasePair, pairing: Pairing, diffs: list[TableDiff], gaps: list[SequenceGap]) -> dict:
    totals = {kind: sum(len(getattr(d, kind)) for d in diffs) for kind, _ in KINDS}
    return {
        "kept_database": pair.kept_name, "live_database": pair.live_name, "totals": totals,
        "tables": [{"table": d.plan.label, **{kind: len(getattr(d, kind)) for kind, _ in KINDS}} for d in diffs],
        "not_compared": [{"table": name, "reason": why} for name, why in pairing.not_compared],
        "tables_only_in_kept": pairing.only_in_kept, "tables_only_in_live": pairing.only_in_live,
        "column_differences": [{"table": c.table, "column": c.column, "kept_type": c.kept, "live_type": c.live}
                               for c in pairing.columns],
        "sequences_behind": [{"sequence": g.label, "table": g.table, "kept_last_value": g.kept,
                              "live_last_value": g.live} for g in gaps],
    }


def _summary(pair: DatabasePair, pairing: Pairing, diffs: list[TableDiff], gaps: list[SequenceGap]) -> list[str]:
    totals = [sum(len(getattr(d, kind)) for d in diffs) for kind, _ in KINDS]
    lines = [f"{pair.kept_name} (kept) against {pair.live_name} (live): {count(len(diffs), 'table')} compared, "
             f"{totals[0]} row(s) only in the kept database, {totals[1]} only in the live one, {totals[2]} differ"]
    rows = [(d.plan.label, *(str(len(getattr(d, kind))) for kind, _ in KINDS)) for d in diffs]
    if rows:
        lines += ["", *table(("TABLE", "ONLY KEPT", "ONLY LIVE", "DIFFER"), [*rows, ("total", *map(str, totals))])]
    notes = [f"not compared: {name} ({why})" for name, why in pairing.not_compared]
    notes += [f"table only in the kept database: {name}" for name in pairing.only_in_kept]
    notes += [f"table only in the live database: {name}" for name in pairing.only_in_live]
    notes += [f"column {c.describe()}" for c in pairing.columns]
    notes += [f"sequence {g.label} ({g.table}) is at {g.kept} in the kept database, "
              f"{'unused' if g.live is None else g.live} in the live one" for g in gaps]
    return lines + ([""] + [printable(note) for note in notes] if notes else [])


def _all_rows(pair: DatabasePair, diff: TableDiff) -> dict:
    plan = diff.plan
    found: dict = {
        "only_in_kept": [row for batch in fetch_rows(pair.kept, plan, diff.only_in_kept) for _, row in batch],
        "only_in_live": [row for batch in fetch_rows(pair.live, plan, diff.only_in_live) for _, row in batch],
        "differ": []}
    for kept_rows, live_rows in zip(fetch_rows(pair.kept, plan, diff.differ), fetch_rows(pair.live, plan, diff.differ),
                                    strict=True):
        live = dict(live_rows)
        found["differ"] += [{"key": {c.name: row[c.name] for c in plan.key}, "columns": _changed(plan, row, live[key]),
                             "kept": row, "live": live[key]} for key, row in kept_rows]
    return found


def _changed(plan: TablePlan, kept: Row, live: Row) -> list[str]:
    return [c.name for c in plan.columns if kept[c.name] != live[c.name]]


def _listing(pair: DatabasePair, diff: TableDiff) -> list[str]:
    """The first LISTED_ROWS rows of each kind of one table, for people."""
    if not diff.total:
        return []
    plan = diff.plan
    lines = ["", printable(plan.label)]
    for kind, title in KINDS:
        keys = getattr(diff, kind)
        if not keys:
            continue
        lines.append(f"  {title} ({len(keys)}):")
        shown = keys[:LISTED_ROWS]
        if kind == "differ":
            live = {key: row for batch in fetch_rows(pair.live, plan, shown) for key, row in batch}
            lines += [f"    {_key_text(plan, row)}: " + "; ".join(
                f"{printable(name)} {_value(live[key][name])} -> {_value(row[name])}"
                for name in _changed(plan, row, live[key])) for batch in fetch_rows(pair.kept, plan, shown)
                for key, row in batch]
        else:
            conn = pair.kept if kind == "only_in_kept" else pair.live
            lines += [f"    {_key_text(plan, row)}: " + ", ".join(
                f"{printable(c.name)}={_value(row[c.name])}" for c in plan.columns if c not in plan.key)
                for batch in fetch_rows(conn, plan, shown) for _, row in batch]
        if len(keys) > LISTED_ROWS:
            lines.append(f"    ... and {len(keys) - LISTED_ROWS} more (--json and --sql give every row)")
    return lines


def _key_text(plan: TablePlan, row: Row) -> str:
    return ", ".join(f"{printable(c.name)}={_value(row[c.name])}" for c in plan.key)


def _value(value: str | None) -> str:
    if value is None:
        return "NULL"
    text = printable(value)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."
