"""The row counters PostgreSQL keeps for each table (pg_stat_user_tables), recorded with every backup, and
what they tell before a dump restore: how many rows were inserted, updated and deleted since the backup.

The counters are cumulative from the table's creation or the last statistics reset, so the difference
between now and the backup is the writes since, as long as the same database and the same tables are
compared and nothing reset them; where that cannot be known the report says "unknown" rather than guess.
They count rows of rolled-back transactions too, and a session's writes reach them within about a second
(PostgreSQL flushes each session's counters when it goes idle or ends).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime

from backup_store.manifest import Backup
from backup_store.staging import Staging
from common.errors import ToolkitError
from common.files import atomic_write
from common.text import count
from database.server import DbServer

COUNTERS_FILE = "row_counters.json"  # in the backup's folder, beside the dump, checksummed by its manifest

_READ_COUNTERS = """
SELECT d.oid, s.stats_reset, now(), current_setting('track_counts')::boolean, pg_postmaster_start_time()
  FROM pg_database d LEFT JOIN pg_stat_database s ON s.datid = d.oid
 WHERE d.datname = current_database()"""
_READ_TABLES = """
SELECT relid, schemaname, relname, n_tup_ins, n_tup_upd, n_tup_del, n_live_tup
  FROM pg_stat_user_tables ORDER BY schemaname, relname"""


@dataclass
class TableCounters:
    """One table's counters at one moment."""

    relid: int  # the table's oid: a table dropped and made again under the same name starts from zero
    schema: str
    table: str
    inserted: int
    updated: int
    deleted: int
    live_rows: int

    @property
    def name(self) -> str:
        """schema.table, as people write it."""
        return f"{self.schema}.{self.table}"


@dataclass
class RowCounters:
    """Every table's counters in one database at one moment, with what tells whether they can be compared."""

    database_oid: int
    stats_reset: str | None  # when the database's statistics were last reset (ISO time); None if never
    read_at: str  # the server's clock when they were read (ISO time)
    tables: list[TableCounters] = field(default_factory=list)
    counting: bool = True  # track_counts: off, PostgreSQL counts nothing
    server_started: str | None = None  # pg_postmaster_start_time (ISO time): a crash since drops every counter

    def dump(self) -> bytes:
        """The JSON a backup keeps."""
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def load(cls, data: bytes) -> RowCounters:
        """Read what dump() wrote."""
        raw = json.loads(data)
        return cls(raw["database_oid"], raw["stats_reset"], raw["read_at"],
                   [TableCounters(**table) for table in raw["tables"]], bool(raw.get("counting", True)),
                   raw.get("server_started"))


def read_counters(server: DbServer, dbname: str | None = None) -> RowCounters:
    """The counters of `dbname` (default DB_NAME) now."""
    with server.session(dbname) as conn, conn.cursor() as cur:
        cur.execute(_READ_COUNTERS)
        oid, reset, now, counting, started = cur.fetchone()
        cur.execute(_READ_TABLES)
        tables = [TableCounters(*row) for row in cur.fetchall()]
    return RowCounters(oid, reset.isoformat() if reset else None, now.isoformat(), tables, counting,
                       started.isoformat())


def record_counters(staging: Staging, server: DbServer) -> None:
    """Keep DB_NAME's counters in the backup being built (read before its dump starts)."""
    atomic_write(staging.path / COUNTERS_FILE, read_counters(server).dump())
    staging.adopt(COUNTERS_FILE)


def recorded_counters(backup: Backup) -> RowCounters | None:
    """The counters a backup recorded; None for a backup taken before they were recorded (ToolkitError when
    its file cannot be read)."""
    if not any(entry.path == COUNTERS_FILE and entry.type == "file" for entry in backup.entries):
        return None
    try:
        return RowCounters.load((backup.path / COUNTERS_FILE).read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ToolkitError(f"backup {backup.id}'s {COUNTERS_FILE} cannot be read ({exc})") from None


# -- the writes since a backup ---------------------------------------------------------------------------


@dataclass
class TableWrites:
    """One table's writes since the backup; None counts are unknown (the note says why)."""

    name: str
    inserted: int | None
    updated: int | None
    deleted: int | None
    live_rows_then: int | None
    live_rows_now: int | None
    note: str | None = None

    @property
    def total(self) -> int:
        """Rows written, for sorting (unknown counts as none)."""
        return (self.inserted or 0) + (self.updated or 0) + (self.deleted or 0)

    def line(self) -> str:
        """One line of the report."""
        if self.inserted is None:
            return f"  {self.name}: unknown ({self.note})"
        note = f" ({self.note})" if self.note else ""
        return (f"  {self.name}: {self.inserted} inserted, {self.updated} updated, {self.deleted} deleted"
                f"{note}")


@dataclass
class WritesReport:
    """What a dump restore would throw away: the writes since the backup, per table, largest first."""

    database: str
    unknown_reason: str | None = None  # set when no figure can be given for the whole database
    tables: list[TableWrites] = field(default_factory=list)
    unchanged_tables: int = 0

    @property
    def total(self) -> int:
        """Rows inserted, updated and deleted since the backup, in the tables whose figures are known."""
        return sum(table.total for table in self.tables)

    @property
    def partly_unknown(self) -> bool:
        """Some table's figure is unknown: the total is a lower bound."""
        return any(table.inserted is None for table in self.tables)

    def lines(self) -> list[str]:
        """The report for people: the total first, then each table that changed."""
        if self.unknown_reason:
            return [f"writes to {self.database} since the backup: unknown ({self.unknown_reason})"]
        if not self.tables:
            return [f"writes to {self.database} since the backup: none counted in its "
                    f"{count(self.unchanged_tables, 'table')}"]
        bound = "at least " if self.partly_unknown else ""
        lines = [f"writes to {self.database} since the backup, lost by a dump restore: {bound}"
                 f"{count(self.total, 'row')} in {count(len(self.tables), 'table')}"
                 + (f" ({self.unchanged_tables} other tables unchanged)" if self.unchanged_tables else "")]
        return lines + [table.line() for table in self.tables]

    def to_dict(self) -> dict:
        """For --json."""
        return {"database": self.database, "known": self.unknown_reason is None, "reason": self.unknown_reason,
                "total": self.total if self.unknown_reason is None else None, "lower_bound": self.partly_unknown,
                "tables": [asdict(table) for table in self.tables], "unchanged_tables": self.unchanged_tables}


def writes_since(database: str, then: RowCounters | None, now: RowCounters) -> WritesReport:
    """Compare the counters a backup recorded with today's, table by table (matched by oid)."""
    if then is None:
        return WritesReport(database, "the backup recorded no row counters: it was taken by an older version "
                                      "of the toolkit or made elsewhere")
    if then.database_oid != now.database_oid:
        return WritesReport(database, "the database was replaced since the backup (restored or made again), so "
                                      "its counters started over")
    if not now.counting:
        return WritesReport(database, "track_counts is off on the server: PostgreSQL counts no rows")
    if _moment(then.stats_reset) != _moment(now.stats_reset):
        return WritesReport(database, f"the server's statistics were reset at {now.stats_reset}, after the backup")
    if then.server_started is not None and _moment(then.server_started) != _moment(now.server_started):
        # A clean stop keeps the counters; a crash drops them without a reset time. Which one it was is not
        # known here, and a figure too low would be worse than none.
        return WritesReport(database, f"the server was restarted at {now.server_started}, after the backup, and a "
                                      "crash would have dropped its counters")
    before = {table.relid: table for table in then.tables}
    report = WritesReport(database)
    for table in now.tables:
        old = before.pop(table.relid, None)
        writes = _table_writes(old, table)
        if writes.total or writes.inserted is None:
            report.tables.append(writes)
        else:
            report.unchanged_tables += 1
    report.tables += [TableWrites(old.name, None, None, None, old.live_rows, None,
                                  f"dropped since the backup, then {count(old.live_rows, 'row')}")
                      for old in before.values()]
    report.tables.sort(key=lambda table: (table.inserted is not None, table.total), reverse=True)
    return report


def _moment(iso: str | None) -> datetime | None:
    """An ISO time as a moment, whatever time zone the session that read it printed it in."""
    return datetime.fromisoformat(iso) if iso else None


def _table_writes(old: TableCounters | None, new: TableCounters) -> TableWrites:
    if old is None:  # made since the backup: every row it holds was written since
        return TableWrites(new.name, new.inserted, new.updated, new.deleted, None, new.live_rows,
                           "created since the backup")
    deltas = (new.inserted - old.inserted, new.updated - old.updated, new.deleted - old.deleted)
    if min(deltas) < 0:  # only a reset of this table's counters makes them go down
        return TableWrites(new.name, None, None, None, old.live_rows, new.live_rows,
                           "its counters were reset since the backup")
    return TableWrites(new.name, *deltas, old.live_rows, new.live_rows)
