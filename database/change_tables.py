"""What `changes` compares: the tables of two databases paired by name, with their primary keys and the
columns both have; the tables it cannot compare and why; the order foreign keys ask for; and the sequences
that hand out the compared tables' keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from common.errors import UsageError

if TYPE_CHECKING:
    from psycopg2 import sql

# User tables and partitioned tables, not partitions (their rows are read through the partitioned table).
_COLUMNS = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, NULL), format_type(a.atttypid, a.atttypmod),
       a.atttypid::int, a.attgenerated <> '', a.attidentity = 'a',
       (SELECT array_position(i.indkey::int2[], a.attnum) FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY n.nspname, c.relname, a.attnum
"""

_FOREIGN_KEYS = """
SELECT cn.nspname, c.relname, pn.nspname, p.relname
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE k.contype = 'f' AND k.conparentid = 0
"""

# The sequences a serial or identity column of a table takes its values from, and how far each has gone.
_SEQUENCES = """
SELECT tn.nspname, t.relname, sn.nspname, s.relname, ps.last_value
FROM pg_depend d
JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_sequences ps ON ps.schemaname = sn.nspname AND ps.sequencename = s.relname
WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
ORDER BY 3, 4
"""


# The three small records are NamedTuples: each dataclass costs every --help about a millisecond to create.
class Column(NamedTuple):
    """One column of a table as the catalog describes it."""

    name: str
    type: str  # the type without modifiers, what a list of key values is cast to
    full_type: str  # with modifiers (numeric(10,2)): compared between the two databases
    type_oid: int
    generated: bool  # GENERATED ALWAYS AS (...) STORED: never written by an INSERT or UPDATE
    identity_always: bool  # GENERATED ALWAYS AS IDENTITY: an INSERT of it needs OVERRIDING SYSTEM VALUE


@dataclass
class TableShape:
    """A table of one database: its columns in order and its primary key's columns in key order."""

    schema: str
    name: str
    columns: list[Column] = field(default_factory=list)
    key: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """`schema.table`, for people."""
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class TablePlan:
    """A table both databases have, with the same primary key: what is compared and written."""

    schema: str
    name: str
    key: tuple[Column, ...]
    columns: tuple[Column, ...]  # the columns both have, in the kept table's order (the key among them)

    @property
    def label(self) -> str:
        """`schema.table`, for people."""
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        """The table's name for SQL, quoted."""
        from psycopg2 import sql

        return sql.Identifier(self.schema, self.name)

    @property
    def writable(self) -> tuple[Column, ...]:
        """The columns an INSERT or UPDATE may set."""
        return tuple(column for column in self.columns if not column.generated)


class ColumnDifference(NamedTuple):
    """A column of a compared table that is on one side only or has another type on each."""

    table: str
    column: str
    kept: str | None  # its type in the kept database; None if it has no such column
    live: str | None

    def describe(self) -> str:
        """One line for people."""
        if self.live is None:
            return f"{self.table}.{self.column} only in the kept database ({self.kept}): not compared"
        if self.kept is None:
            return f"{self.table}.{self.column} only in the live database ({self.live}): not compared"
        return f"{self.table}.{self.column} is {self.kept} in the kept database, {self.live} in the live one"


class SequenceGap(NamedTuple):
    """A sequence feeding a compared table's column that went further in the kept database than live."""

    table: str
    schema: str
    name: str
    kept: int
    live: int | None  # None: never used in the live database (or not readable there)

    @property
    def label(self) -> str:
        """`schema.sequence`, for people."""
        return f"{self.schema}.{self.name}"


@dataclass
class Pairing:
    """The outcome of pairing two databases' tables."""

    plans: list[TablePlan]  # parents before the tables that refer to them
    not_compared: list[tuple[str, str]] = field(default_factory=list)  # (table, why)
    only_in_kept: list[str] = field(default_factory=list)
    only_in_live: list[str] = field(default_factory=list)
    columns: list[ColumnDifference] = field(default_factory=list)
    cycle: list[str] = field(default_factory=list)  # tables whose foreign keys form a cycle: order not assured
    self_referring: list[str] = field(default_factory=list)  # their rows go in key order, whatever they refer to


def read_shapes(cur) -> dict[tuple[str, str], TableShape]:
    """Every user table of the cursor's database, by (schema, name)."""
    cur.execute(_COLUMNS)
    shapes: dict[tuple[str, str], TableShape] = {}
    keys: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for schema, table, name, type_, full_type, oid, generated, identity, position in cur.fetchall():
        shape = shapes.setdefault((schema, table), TableShape(schema, table))
        shape.columns.append(Column(name, type_, full_type, oid, generated, identity))
        if position is not None:  # the column's place in the primary key
            keys.setdefault((schema, table), []).append((position, name))
    for where, columns in keys.items():
        shapes[where].key = [name for _, name in sorted(columns)]
    return shapes


def select_tables(names: Iterable[tuple[str, str]], wanted: list[str]) -> set[tuple[str, str]]:
    """The tables `--table` names: `schema.table`, or a table name found in one schema only."""
    names = set(names)
    chosen: set[tuple[str, str]] = set()
    for text in wanted:
        schema, dot, table = text.partition(".")
        matches = ({(schema, table)} & names) if dot else {n for n in names if n[1] == text}
        if not matches and text != text.lower():  # unquoted, PostgreSQL would fold the name to lower case
            lower = text.lower()
            schema, dot, table = lower.partition(".")
            matches = ({(schema, table)} & names) if dot else {n for n in names if n[1] == lower}
        if not matches:
            raise UsageError(f"--table {text}: no such table in either database")
        if len(matches) > 1:
            found = ", ".join(sorted(f"{s}.{t}" for s, t in matches))
            raise UsageError(f"--table {text}: there is one in several schemas ({found}): name it with its schema")
        chosen |= matches
    return chosen


def pair_tables(kept: dict[tuple[str, str], TableShape], live: dict[tuple[str, str], TableShape],
                chosen: set[tuple[str, str]] | None, foreign_keys: list[tuple[tuple[str, str], tuple[str, str]]]
                ) -> Pairing:
    """Pair the two databases' tables (only the `chosen` ones, if given): what is compared, in what order."""
    pairing = Pairing([])
    names = sorted((set(kept) | set(live)) & chosen if chosen is not None else set(kept) | set(live))
    plans: dict[tuple[str, str], TablePlan] = {}
    for where in names:
        label = f"{where[0]}.{where[1]}"
        if where not in live:
            pairing.only_in_kept.append(label)
        elif where not in kept:
            pairing.only_in_live.append(label)
        else:
            plan = _plan(kept[where], live[where], pairing)
            if plan is not None:
                plans[where] = plan
    order, pairing.cycle = parents_first(list(plans), foreign_keys)
    pairing.self_referring = sorted({f"{c[0]}.{c[1]}" for c, p in foreign_keys if c == p and c in plans})
    pairing.plans = [plans[where] for where in order]
    return pairing


def _plan(kept: TableShape, live: TableShape, pairing: Pairing) -> TablePlan | None:
    """The plan for a table both databases have, or None (and why, in `pairing`) if it cannot be compared."""
    if not kept.key or not live.key:
        side = "either database" if not kept.key and not live.key else "the kept database" if not kept.key else \
            "the live database"
        pairing.not_compared.append((kept.label, f"no primary key in {side}"))
        return None
    kept_types = {c.name: c for c in kept.columns}
    live_types = {c.name: c for c in live.columns}
    if kept.key != live.key or any(kept_types[k].full_type != live_types[k].full_type for k in kept.key):
        pairing.not_compared.append((kept.label, f"primary keys differ: ({', '.join(kept.key)}) in the kept "
                                                 f"database, ({', '.join(live.key)}) in the live one"))
        return None
    for column in kept.columns:
        other = live_types.get(column.name)
        if other is None or other.full_type != column.full_type:
            pairing.columns.append(ColumnDifference(kept.label, column.name, column.full_type,
                                                    other.full_type if other else None))
    pairing.columns += [ColumnDifference(kept.label, c.name, None, c.full_type)
                        for c in live.columns if c.name not in kept_types]
    common = tuple(c for c in kept.columns if c.name in live_types)
    return TablePlan(kept.schema, kept.name, tuple(kept_types[k] for k in kept.key), common)


def read_foreign_keys(cur) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(referring table, referred table) for every foreign key of the cursor's database."""
    cur.execute(_FOREIGN_KEYS)
    return [((a, b), (c, d)) for a, b, c, d in cur.fetchall()]


def parents_first(tables: list[tuple[str, str]], foreign_keys: list[tuple[tuple[str, str], tuple[str, str]]]
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """`tables` with every referred table before the tables referring to it, else in name order; and the
    tables caught in a cycle of foreign keys (put last, in name order: no order suits them all)."""
    wanted = set(tables)
    parents: dict[tuple[str, str], set[tuple[str, str]]] = {t: set() for t in tables}
    for child, parent in foreign_keys:
        if child in wanted and parent in wanted and child != parent:  # a table referring to itself: key order
            parents[child].add(parent)
    order: list[tuple[str, str]] = []
    placed: set[tuple[str, str]] = set()
    while True:
        ready = sorted(t for t in tables if t not in placed and parents[t] <= placed)
        if not ready:
            break
        order += ready
        placed.update(ready)
    stuck = sorted(t for t in tables if t not in placed)
    return order + stuck, [f"{s}.{t}" for s, t in stuck]


def read_sequences(cur) -> dict[tuple[str, str], tuple[tuple[str, str], int | None]]:
    """(sequence schema, name) -> ((table schema, name), last value or None) for the sequences of columns."""
    cur.execute(_SEQUENCES)
    return {(sn, s): ((tn, t), last) for tn, t, sn, s, last in cur.fetchall()}


def sequence_gaps(kept: dict, live: dict, plans: list[TablePlan]) -> list[SequenceGap]:
    """The compared tables' sequences that went further in the kept database than in the live one: a row
    copied back with such a key would collide with a later default value in the live database."""
    compared = {(p.schema, p.name) for p in plans}
    gaps = []
    for where, (table, kept_last) in kept.items():
        if table not in compared or kept_last is None or where not in live:
            continue
        live_last = live[where][1]
        if live_last is None or kept_last > live_last:
            gaps.append(SequenceGap(f"{table[0]}.{table[1]}", where[0], where[1], kept_last, live_last))
    return gaps
