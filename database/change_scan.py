"""Comparing one table of two databases in bounded memory, and reading back the rows that differ.

Each database streams `(key..., hash of the row's text)` in key order through a server-side cursor, fetched
in batches on a thread of its own so that both servers work while Python merges; the merge keeps only the
keys of rows on one side or differing. Equal stretches, nearly all of two copies of a database, are skipped
by comparing slices of the two batches (C speed) rather than row by row.

The order both sides sort by must be the order Python compares the fetched keys in: integer and boolean keys
are fetched and sorted as they are, a uuid sorted as it is and fetched as text (same order), and any other
key sorted and fetched as its text in the "C" collation (byte order, which is code point order for UTF-8).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.errors import ToolkitError
from database.change_tables import Column, TablePlan
from database.sql import pg_error

if TYPE_CHECKING:
    from psycopg2 import sql
    from psycopg2.extensions import connection

SCAN_BATCH_ROWS = 5000
PREFETCH_BATCHES = 4  # per database: rows held in memory stay a few batches
KEY_BATCH = 1000  # keys looked up in one query when reading the differing rows back
_NATIVE_ORDER = frozenset({16, 20, 21, 23, 26})  # bool, int8, int2, int4, oid: Python orders them alike
_UUID = 2950  # sorts by its bytes, which is the order of its text
_FIRST_STEP = 8
Key = tuple
Row = dict[str, "str | None"]  # column -> its value's text (NULL: None)


@dataclass
class TableDiff:
    """The keys of one table's rows that are only in the kept database, only in the live one, or differ."""

    plan: TablePlan
    only_in_kept: list[Key] = field(default_factory=list)
    only_in_live: list[Key] = field(default_factory=list)
    differ: list[Key] = field(default_factory=list)

    @property
    def total(self) -> int:
        """How many rows are not alike."""
        return len(self.only_in_kept) + len(self.only_in_live) + len(self.differ)


def _key_select(column: Column) -> sql.Composable:
    from psycopg2 import sql

    name = sql.Identifier(column.name)
    if column.type_oid in _NATIVE_ORDER:
        return name
    if column.type_oid == _UUID:
        return sql.SQL("{}::text").format(name)
    return sql.SQL('{}::text COLLATE "C"').format(name)


def _key_order(column: Column) -> sql.Composable:
    from psycopg2 import sql

    return sql.Identifier(column.name) if column.type_oid in _NATIVE_ORDER | {_UUID} else _key_select(column)


def scan_query(plan: TablePlan) -> sql.Composed:
    """Key and a 64-bit hash of the compared columns' text for every row, in key order."""
    from psycopg2 import sql

    row = sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.columns)
    query = 'SELECT {keys}, hashtextextended(ROW({row})::text COLLATE "C", 0) FROM {table} ORDER BY {order}'
    return sql.SQL(query).format(
        keys=sql.SQL(", ").join(map(_key_select, plan.key)), row=row, table=plan.identifier,
        order=sql.SQL(", ").join(map(_key_order, plan.key)))


class _Scan:
    """The rows of one query, fetched in batches through a named cursor on a thread, a few batches ahead."""

    def __init__(self, conn: connection, query: sql.Composed, what: str):
        self._conn, self._what = conn, what
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(query,), name=f"scan {what}", daemon=True)
        self._thread.start()

    def _run(self, query: sql.Composed) -> None:
        try:
            with self._conn.cursor("changes_scan") as cur:
                cur.execute(query)
                while not self._stop.is_set():
                    rows = cur.fetchmany(SCAN_BATCH_ROWS)
                    self._put(rows)
                    if not rows:
                        return
        except Exception as exc:  # handed to the reading thread, which reports it
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # the timeout only lets a stopped reader be noticed
                return
            except queue.Full:
                continue

    def batches(self) -> Iterator[list[tuple]]:
        """The fetched batches, in order; a failure on the thread is raised here."""
        import psycopg2

        while True:
            item = self._queue.get()
            if isinstance(item, psycopg2.Error):
                raise ToolkitError(f"reading {self._what} failed: {pg_error(item)}") from None
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item

    def close(self) -> None:
        """Stop fetching; a query still running is cancelled (the run is failing: its transaction goes too)."""
        self._stop.set()
        self._thread.join(0.5)
        if self._thread.is_alive():
            self._conn.cancel()
            self._thread.join()


class _Cursor:
    """A position in a stream of batches."""

    def __init__(self, batches: Iterator[list[tuple]]):
        self._batches = batches
        self.rows: list[tuple] = []
        self.at = 0
        self.done = False
        self.refill()

    def refill(self) -> None:
        """Move to the next batch once this one is used up; `done` at the end of the stream."""
        while self.at >= len(self.rows) and not self.done:
            self.rows, self.at = next(self._batches, []), 0
            self.done = not self.rows

    def rest(self) -> Iterator[tuple]:
        """Every row from here to the end."""
        while not self.done:
            yield from self.rows[self.at:]
            self.at = len(self.rows)
            self.refill()


def diff_table(kept: connection, live: connection, plan: TablePlan, kept_name: str, live_name: str) -> TableDiff:
    """Compare one table of the two databases; the keys of the rows that are not alike."""
    query = scan_query(plan)
    scans = [_Scan(kept, query, f"{plan.label} in {kept_name}"), _Scan(live, query, f"{plan.label} in {live_name}")]
    try:
        return merge(plan, scans[0].batches(), scans[1].batches())
    finally:
        for scan in scans:
            scan.close()


def merge(plan: TablePlan, kept_batches: Iterator[list[tuple]], live_batches: Iterator[list[tuple]]) -> TableDiff:
    """Merge two streams of (key..., hash) rows sorted by key, like a merge join."""
    diff = TableDiff(plan)
    width = len(plan.key)
    a, b = _Cursor(kept_batches), _Cursor(live_batches)
    while not a.done and not b.done:
        n = min(len(a.rows) - a.at, len(b.rows) - b.at)
        same = _common_prefix(a.rows, a.at, b.rows, b.at, n)
        a.at += same
        b.at += same
        if same < n:
            key_a, key_b = a.rows[a.at][:width], b.rows[b.at][:width]
            if key_a == key_b:
                diff.differ.append(key_a)
                a.at += 1
                b.at += 1
            elif key_a < key_b:
                diff.only_in_kept.append(key_a)
                a.at += 1
            else:
                diff.only_in_live.append(key_b)
                b.at += 1
        a.refill()
        b.refill()
    diff.only_in_kept += [row[:width] for row in a.rest()]
    diff.only_in_live += [row[:width] for row in b.rest()]
    return diff


def _common_prefix(x: list[tuple], i: int, y: list[tuple], j: int, n: int) -> int:
    """How many rows from x[i] and y[j] on (at most n) are equal: slices of growing size, then a binary
    search in the first slice that differs."""
    done, step = 0, _FIRST_STEP
    while done < n:
        step = min(step, n - done)
        if x[i + done:i + done + step] != y[j + done:j + done + step]:
            low, high = done, done + step - 1  # the first difference is in [low, high]
            while low < high:
                middle = (low + high) // 2
                if x[i + low:i + middle + 1] == y[j + low:j + middle + 1]:
                    low = middle + 1
                else:
                    high = middle
            return low
        done += step
        step *= 2
    return n


def fetch_rows(conn: connection, plan: TablePlan, keys: list[Key]) -> Iterator[list[tuple[Key, Row]]]:
    """The rows with these keys (each column's value as text), KEY_BATCH at a time, in the order of `keys`."""
    import psycopg2
    from psycopg2 import sql

    lookup = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(sql.SQL(c.type)) for c in plan.key)
    query = sql.SQL("SELECT {keys}, {values} FROM {table} WHERE ({names}) IN (SELECT * FROM unnest({lookup}))").format(
        keys=sql.SQL(", ").join(map(_key_select, plan.key)),
        values=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in plan.columns),
        table=plan.identifier, names=sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.key), lookup=lookup)
    width = len(plan.key)
    names = [c.name for c in plan.columns]
    for start in range(0, len(keys), KEY_BATCH):
        batch = keys[start:start + KEY_BATCH]
        try:
            with conn.cursor() as cur:
                cur.execute(query, [[str(key[i]) for key in batch] for i in range(width)])
                found = {row[:width]: dict(zip(names, row[width:], strict=True)) for row in cur.fetchall()}
        except psycopg2.Error as exc:
            raise ToolkitError(f"reading rows of {plan.label} failed: {pg_error(exc)}") from None
        yield [(key, found[key]) for key in batch if key in found]
