"""database_rollback.py changes: a kept database against the live one, on the real cluster, as processes; and
its --sql applied with psql."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from helpers import run_script, script_argv

from database.change_scan import merge
from database.change_tables import Column, TablePlan

SCHEMA = """
CREATE TABLE vendors (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE invoices (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                       vendor_id int NOT NULL REFERENCES vendors (id), total numeric(12,2), paid boolean DEFAULT false);
CREATE TABLE invoice_lines (invoice_id bigint REFERENCES invoices (id), line int, product text, qty int,
                            PRIMARY KEY (invoice_id, line));
CREATE TABLE tags (name text COLLATE "en-x-icu" PRIMARY KEY, weight int);
CREATE TABLE log (at timestamptz DEFAULT '2026-01-01', message text);
CREATE TABLE kinds (id int PRIMARY KEY, amount numeric, doc jsonb, raw bytea, at timestamptz, day date,
                    stamp timestamp, nums int[], words text[], flag boolean, ratio float8, span interval,
                    doubled numeric GENERATED ALWAYS AS (amount * 2) STORED);
CREATE TABLE events (id int PRIMARY KEY, kind text, payload jsonb);
INSERT INTO vendors (name) SELECT 'vendor ' || i FROM generate_series(1, 5) i;
INSERT INTO invoices (vendor_id, total) SELECT 1 + i % 5, i * 10.5 FROM generate_series(1, 40) i;
INSERT INTO invoice_lines SELECT i, l, 'product ' || l, i + l FROM generate_series(1, 40) i, generate_series(1, 3) l;
INSERT INTO tags VALUES ('apple', 1), ('Zebra', 2), ('zürich', 3), ('a b', 4), ('tab\there', 5), ('back\\slash', 6);
INSERT INTO log (message) VALUES ('started');
INSERT INTO kinds (id, amount, doc, raw, at, day, stamp, nums, words, flag, ratio, span) VALUES
  (1, 1.50, '{"a": [1, 2, {"b": null}]}', '\\x00ff10', '2026-03-01 12:00:00+02', '2026-03-01',
   '2026-03-01 12:00:00.123456', '{1,2,3}', '{"x y","quo\\"te",NULL}', true, 0.1, '1 day 02:03:04'),
  (2, -0.000001, '"text"', '\\x', '1999-12-31 23:59:59.999+00', '0044-03-15 BC', 'infinity', '{}', '{}', false,
   'NaN', '-3 mons'),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (4, 12345678901234567890.123456789, 'null', '\\x5c27', 'infinity', 'infinity', '-infinity', '{{1,2},{3,4}}',
   '{"it''s"}', NULL, '-Infinity', '0');
INSERT INTO events SELECT i, 'kind ' || (i % 7), jsonb_build_object('n', i) FROM generate_series(1, 12000) i;
"""

# What was written to the database after the backup, before the restore replaced it (it is the kept one).
WRITES_SINCE_BACKUP = """
INSERT INTO vendors (name) VALUES ('Zeta, the new one');
INSERT INTO invoices (vendor_id, total) VALUES (6, 99.95);
INSERT INTO invoice_lines VALUES (41, 1, 'first', 1), (41, 2, 'second', 2);
UPDATE invoices SET total = total + 1, paid = true WHERE id IN (3, 7);
UPDATE invoice_lines SET qty = 0 WHERE (invoice_id, line) = (5, 2);
DELETE FROM invoice_lines WHERE invoice_id = 40;
DELETE FROM invoices WHERE id = 40;
INSERT INTO tags VALUES ('éclair', 7), ('naïve', 8), ('日本', 9), ('quote''d', 10), ('Apple', 11);
UPDATE tags SET weight = 20 WHERE name IN ('Zebra', 'back\\slash');
DELETE FROM tags WHERE name = 'apple';
UPDATE kinds SET doc = '{"a": [1, 2, 3]}', raw = '\\xdeadbeef', nums = '{7}', words = '{"new, word"}' WHERE id = 2;
UPDATE kinds SET amount = NULL, stamp = '2026-01-01' WHERE id = 4;
INSERT INTO kinds (id, amount, span, words) VALUES (7, 3.25, '00:00:01.5', '{NULL,""}'), (8, NULL, NULL, NULL);
UPDATE events SET payload = payload || '{"seen": true}' WHERE id % 100 = 0;
DELETE FROM events WHERE id BETWEEN 4990 AND 5010;
INSERT INTO events SELECT i, 'late', NULL FROM generate_series(12001, 12010) i;
INSERT INTO log (message) VALUES ('not compared: no primary key');
"""
EXPECTED = {  # table -> (keys only in the kept database, only in the live one, differing), as text
    "public.vendors": ({("6",)}, set(), set()),
    "public.invoices": ({("41",)}, {("40",)}, {("3",), ("7",)}),
    "public.invoice_lines": ({("41", "1"), ("41", "2")}, {("40", "1"), ("40", "2"), ("40", "3")}, {("5", "2")}),
    "public.tags": ({("éclair",), ("naïve",), ("日本",), ("quote'd",), ("Apple",)}, {("apple",), ("live only",)},
                    {("Zebra",), ("back\\slash",)}),
    "public.kinds": ({("7",), ("8",)}, set(), {("2",), ("4",)}),
    "public.events": ({(str(i),) for i in range(12001, 12011)}, {(str(i),) for i in range(4990, 5011)},
                      {(str(i),) for i in range(100, 12001, 100)} - {("5000",)}),
}
KEYS = {"public.vendors": ("id",), "public.invoices": ("id",), "public.invoice_lines": ("invoice_id", "line"),
        "public.tags": ("name",), "public.kinds": ("id",), "public.events": ("id",)}


class Pair:
    """The live database (pg_db) and a copy of it, kept as a swap restore keeps the database it replaces."""

    def __init__(self, pg_db, root: Path):
        self.pg_db, self.root = pg_db, root
        self.live = pg_db.name
        self.kept = f"{pg_db.name[:33]}__before_20260101000000_abcdef"  # a name as a restore gives it
        self.env = {**pg_db.env, "BACKUP_DIR": str(root / "backups")}

    def sql(self, dbname: str, statement: str) -> list:
        return self.pg_db.cluster.query(dbname, statement)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return run_script("database_rollback.py", *args, env=self.env, cwd=self.root)

    def psql(self, dbname: str, script: str) -> subprocess.CompletedProcess:
        cluster = self.pg_db.cluster
        env = {**os.environ, "PGHOST": cluster.host, "PGPORT": str(cluster.port), "PGUSER": cluster.user,
               "PGPASSWORD": cluster.password}
        return subprocess.run([os.path.join(cluster.bindir, "psql"), "--no-psqlrc", "-d", dbname, "-f", "-"],
                              input=script, env=env, capture_output=True, text=True)

    def rows(self, dbname: str, table: str) -> list[tuple[tuple, str]]:
        """Every row of a table: (its key's values as text, the row's text), in key order."""
        key = ", ".join(f'"{k}"::text COLLATE "C"' for k in KEYS[table])
        found = self.sql(dbname, f"SELECT ARRAY[{key}], t::text FROM {table} t ORDER BY {key}")
        return [(tuple(values), text) for values, text in found]


@pytest.fixture
def pair(pg_db, tmp_path: Path):
    made = Pair(pg_db, tmp_path)
    made.sql(made.live, SCHEMA)
    made.sql("postgres", f'CREATE DATABASE "{made.kept}" TEMPLATE "{made.live}"')
    yield made
    pg_db.cluster.drop_database(made.kept)


def written(pair: Pair) -> Pair:
    """The writes since the backup in the kept database; one row written to the live one since the restore."""
    pair.sql(pair.kept, WRITES_SINCE_BACKUP)
    pair.sql(pair.live, "INSERT INTO tags VALUES ('live only', 0)")
    return pair


def listed(report: dict, table: str) -> tuple[set, set, set]:
    rows = report["rows"].get(table, {"only_in_kept": [], "only_in_live": [], "differ": []})
    keys = KEYS[table]
    return ({tuple(row[k] for k in keys) for row in rows["only_in_kept"]},
            {tuple(row[k] for k in keys) for row in rows["only_in_live"]},
            {tuple(row["key"][k] for k in keys) for row in rows["differ"]})


def test_changes_lists_exactly_the_rows_written_changed_and_deleted(pair: Pair):
    written(pair)
    result = pair.run("--json", "changes", pair.kept)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {table: listed(report, table) for table in EXPECTED} == EXPECTED
    assert report["totals"] == {"only_in_kept": 21, "only_in_live": 27, "differ": 126}
    assert {t["table"]: (t["only_in_kept"], t["only_in_live"], t["differ"]) for t in report["tables"]} == {
        table: tuple(map(len, expected)) for table, expected in EXPECTED.items()}
    assert report["not_compared"] == [{"table": "public.log", "reason": "no primary key in either database"}]
    assert {(s["sequence"], s["kept_last_value"], s["live_last_value"]) for s in report["sequences_behind"]} == {
        ("public.vendors_id_seq", 6, 5), ("public.invoices_id_seq", 41, 40)}
    # Values are PostgreSQL's own text of each value, NULLs are null, and a differing row names what differs.
    kinds = report["rows"]["public.kinds"]
    assert {row["id"]: row for row in kinds["only_in_kept"]}["7"] == {
        "id": "7", "amount": "3.25", "doc": None, "raw": None, "at": None, "day": None, "stamp": None, "nums": None,
        "words": '{NULL,""}', "flag": None, "ratio": None, "span": "00:00:01.5", "doubled": "6.50"}
    second = {row["key"]["id"]: row for row in kinds["differ"]}["2"]
    assert second["columns"] == ["doc", "raw", "nums", "words"]
    assert (second["kept"]["raw"], second["live"]["raw"]) == ("\\xdeadbeef", "\\x")
    assert second["kept"]["doc"] == '{"a": [1, 2, 3]}' and second["live"]["day"] == "0044-03-15 BC"


def test_the_text_report_gives_the_counts_then_at_most_50_rows_of_each_kind(pair: Pair):
    written(pair)
    result = pair.run("changes", pair.kept)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{pair.kept} (kept) against {pair.live} (live): 6 tables compared, 21 row(s) only in the "
                        "kept database, 27 only in the live one, 126 differ")
    assert lines[2:11] == [
        "TABLE                 ONLY KEPT  ONLY LIVE  DIFFER",
        "public.events         10         21         119",
        "public.invoice_lines  2          3          1",
        "public.invoices       1          1          2",
        "public.kinds          2          0          2",
        "public.tags           5          2          2",
        "public.vendors        1          0          0",
        "total                 21         27         126",
        "",
    ]
    assert "not compared: public.log (no primary key in either database)" in lines
    assert "sequence public.vendors_id_seq (public.vendors) is at 6 in the kept database, 5 in the live one" in lines
    events = lines[lines.index("public.events"):]
    differ = events.index("  differ, live value -> kept value (119):")
    assert events[differ + 1] == '    id=100: payload {"n": 100} -> {"n": 100, "seen": true}'
    assert events[differ + 51] == "    ... and 69 more (--json and --sql give every row)"
    assert "    id=4990: kind=kind 6, payload={\"n\": 4990}" in events
    assert "    name=tab\\there: weight=5" not in lines  # unchanged rows are not listed
    assert "    name=back\\slash: weight 6 -> 20" in lines
    assert "    id=4: amount 12345678901234567890.123456789 -> NULL; stamp -infinity -> 2026-01-01 00:00:00; " \
           "doubled 24691357802469135780.246913578 -> NULL" in lines


def test_sql_applied_with_psql_brings_the_kept_rows_back_leaving_the_deleted_ones(pair: Pair):
    written(pair)
    copy = f"{pair.live[:40]}_all"  # the script applied with its DELETEs too
    pair.sql("postgres", f'CREATE DATABASE "{copy}" TEMPLATE "{pair.live}"')
    try:
        live_before = {table: pair.rows(pair.live, table) for table in EXPECTED}
        result = pair.run("changes", pair.kept, "--sql")
        assert result.returncode == 0, result.stderr
        script = result.stdout
        # Parents before the tables that refer to them, though their names sort the other way.
        assert script.index('INSERT INTO "public"."vendors"') < script.index('INSERT INTO "public"."invoices"') \
            < script.index('INSERT INTO "public"."invoice_lines"')
        assert '-- DELETE FROM "public"."events" WHERE "id" = \'4990\';' in script.splitlines()
        applied = pair.psql(pair.live, script)
        assert applied.returncode == 0, applied.stderr
        for table in EXPECTED:  # the kept rows, and the live rows whose key the kept database does not have
            kept = pair.rows(pair.kept, table)
            kept_keys = {key for key, _ in kept}
            only_live = [(key, row) for key, row in live_before[table] if key not in kept_keys]
            assert {key for key, _ in only_live} == EXPECTED[table][1]
            assert pair.rows(pair.live, table) == sorted(kept + only_live), table
        # The sequences went past the rows put back: new rows take new keys.
        assert pair.sql(pair.live, "SELECT nextval('vendors_id_seq'), nextval('invoices_id_seq')") == [(7, 42)]
        assert pair.sql(pair.live, "SELECT count(*) FROM log") == [(1,)]  # not compared, not touched
        # With its DELETEs uncommented, the script makes every compared table the kept one, row for row.
        everything = script.replace("\n-- DELETE FROM", "\nDELETE FROM")
        applied = pair.psql(copy, everything)
        assert applied.returncode == 0, applied.stderr
        for table in EXPECTED:
            assert pair.rows(copy, table) == pair.rows(pair.kept, table), table
        # Nothing is left to put back.
        again = json.loads(pair.run("--json", "changes", pair.kept).stdout)
        assert (again["totals"]["only_in_kept"], again["totals"]["differ"]) == (0, 0)
    finally:
        pair.pg_db.cluster.drop_database(copy)


def test_the_script_names_foreign_key_cycles_and_tables_that_refer_to_themselves(pair: Pair):
    for dbname in (pair.live, pair.kept):
        pair.sql(dbname, "CREATE TABLE a_side (id int PRIMARY KEY, b_id int);"
                         "CREATE TABLE b_side (id int PRIMARY KEY, a_id int REFERENCES a_side);"
                         "ALTER TABLE a_side ADD FOREIGN KEY (b_id) REFERENCES b_side;"
                         "CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree)")
    pair.sql(pair.kept, "INSERT INTO a_side VALUES (1, NULL); INSERT INTO b_side VALUES (1, 1);"
                        "INSERT INTO tree VALUES (1, NULL), (2, 1)")
    script = pair.run("changes", pair.kept, "--sql").stdout
    lines = script.splitlines()
    assert ("-- The foreign keys of these form a cycle or lead into one, so they come last, in name order, and may "
            "need reordering: public.a_side, public.b_side") in lines
    assert ("-- Rows of tables that refer to themselves go in key order: one referring to a row that comes later "
            "would fail: public.tree") in lines
    inserts = [line.split('"')[3] for line in lines if line.startswith("INSERT INTO")]
    assert inserts == ["tree", "tree", "a_side", "b_side"]
    applied = pair.psql(pair.live, script)
    assert applied.returncode == 0, applied.stderr
    assert pair.sql(pair.live, "SELECT count(*) FROM a_side, b_side, tree") == [(2,)]


def test_table_limits_the_comparison_named_with_or_without_schema(pair: Pair):
    written(pair)
    result = pair.run("--json", "changes", pair.kept, "--table", "tags,public.invoice_lines", "--table", "log")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [t["table"] for t in report["tables"]] == ["public.invoice_lines", "public.tags"]
    assert report["not_compared"] == [{"table": "public.log", "reason": "no primary key in either database"}]
    assert listed(report, "public.tags") == EXPECTED["public.tags"]
    assert [s["sequence"] for s in report["sequences_behind"]] == []  # those of tables not compared are not named
    script = pair.run("changes", pair.kept, "--sql", "--table", "Tags").stdout
    assert "INSERT INTO \"public\".\"tags\"" in script and "\"vendors\"" not in script
    result = pair.run("changes", pair.kept, "--table", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["database_rollback.py: error: --table nope: no such table in "
                                                  "either database"]


def test_tables_columns_and_keys_that_differ_are_named(pair: Pair):
    pair.sql(pair.kept, "CREATE TABLE gone_since (id int PRIMARY KEY); ALTER TABLE events ADD COLUMN extra int;"
                        "UPDATE events SET extra = 1 WHERE id < 10; ALTER TABLE kinds ALTER COLUMN ratio TYPE numeric;"
                        "ALTER TABLE vendors DROP CONSTRAINT vendors_pkey CASCADE, ADD PRIMARY KEY (id, name);"
                        "UPDATE kinds SET span = '1 hour' WHERE id = 1")
    pair.sql(pair.live, "CREATE TABLE new_since (id int PRIMARY KEY); ALTER TABLE tags ADD COLUMN colour text")
    result = pair.run("--json", "changes", pair.kept)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tables_only_in_kept"] == ["public.gone_since"]
    assert report["tables_only_in_live"] == ["public.new_since"]
    assert report["not_compared"] == [
        {"table": "public.log", "reason": "no primary key in either database"},
        {"table": "public.vendors", "reason": "primary keys differ: (id, name) in the kept database, (id) in the "
                                              "live one"}]
    assert report["column_differences"] == [
        {"table": "public.events", "column": "extra", "kept_type": "integer", "live_type": None},
        {"table": "public.kinds", "column": "ratio", "kept_type": "numeric", "live_type": "double precision"},
        {"table": "public.tags", "column": "colour", "kept_type": None, "live_type": "text"}]
    # The columns both have are compared: only the interval changed, not the retyped ratio's 0.1.
    assert report["totals"] == {"only_in_kept": 0, "only_in_live": 0, "differ": 1}
    assert listed(report, "public.kinds") == (set(), set(), {("1",)})
    lines = pair.run("changes", pair.kept).stdout.splitlines()
    assert "column public.events.extra only in the kept database (integer): not compared" in lines
    assert "table only in the live database: public.new_since" in lines


def test_sql_to_a_reader_that_has_gone_stops_without_an_error(pair: Pair):
    written(pair)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `changes --sql | head` once head has exited
    env = {**os.environ, **pair.env}
    done = subprocess.run(script_argv("database_rollback.py", "-q", "changes", pair.kept, "--sql"), cwd=pair.root,
                          env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert done.returncode == 0 and done.stderr == ""


def test_a_missing_database_or_the_live_one_itself_is_refused(pair: Pair):
    for args, message in [
        (["changes", "nope"], f"no database 'nope' on this server; kept by restores: {pair.kept}"),
        (["changes", pair.live], f"BEFORE_DB '{pair.live}' is the live database DB_NAME itself: name the database "
                                 f"a restore kept ({pair.live}__before_...)"),
        (["changes", pair.kept, "--sql", "--json"], None),
    ]:
        result = pair.run(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        if message:
            assert result.stderr.strip() == f"database_rollback.py: error: {message}"
        else:
            assert json.loads(result.stdout)["error"].startswith("--sql prints a SQL script")


def test_after_a_swap_restore_changes_finds_the_writes_since_the_backup_and_sql_brings_them_back(pg_db, tmp_path):
    pair = Pair(pg_db, tmp_path)
    pair.sql(pair.live, SCHEMA)
    assert pair.run("backup").returncode == 0
    at_backup = {table: pair.rows(pair.live, table) for table in EXPECTED}
    pair.sql(pair.live, WRITES_SINCE_BACKUP)
    after_writes = {table: pair.rows(pair.live, table) for table in EXPECTED}
    restore = pair.run("--json", "restore", "latest", "--yes")
    assert restore.returncode == 0, restore.stderr
    kept = json.loads(restore.stdout)["previous_database"]
    try:
        assert {table: pair.rows(pair.live, table) for table in EXPECTED} == at_backup
        result = pair.run("--json", "changes", kept)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        expected = {**EXPECTED, "public.tags": (EXPECTED["public.tags"][0], {("apple",)}, EXPECTED["public.tags"][2])}
        assert {table: listed(report, table) for table in EXPECTED} == expected
        script = pair.run("changes", kept, "--sql").stdout
        applied = pair.psql(pair.live, script.replace("\n-- DELETE FROM", "\nDELETE FROM"))
        assert applied.returncode == 0, applied.stderr
        assert {table: pair.rows(pair.live, table) for table in EXPECTED} == after_writes
    finally:
        pg_db.cluster.drop_database(kept)


@pytest.mark.parametrize("seed", range(20))
def test_the_merge_finds_what_a_comparison_of_whole_tables_finds_whatever_the_batches(seed: int):
    chooser = random.Random(seed)
    rows = {(i, f"k{i % 3}"): chooser.randrange(3) for i in range(chooser.randrange(0, 3000))}
    kept = {key: value for key, value in rows.items() if chooser.random() > 0.05}
    live = {key: (value + 1 if chooser.random() < 0.03 else value) for key, value in rows.items()
            if chooser.random() > 0.05}

    def batches(table: dict) -> list[list[tuple]]:
        ordered, found = [(*key, value) for key, value in sorted(table.items())], []
        while ordered:
            size = chooser.choice([1, 2, 7, 64, 1000])
            found.append(ordered[:size])
            ordered = ordered[size:]
        return found

    key = (Column("a", "integer", "integer", 23, False, False), Column("b", "text", "text", 25, False, False))
    diff = merge(TablePlan("public", "t", key, key), iter(batches(kept)), iter(batches(live)))
    assert diff.only_in_kept == sorted(kept.keys() - live.keys())
    assert diff.only_in_live == sorted(live.keys() - kept.keys())
    assert diff.differ == sorted(k for k in kept.keys() & live.keys() if kept[k] != live[k])


def test_a_key_with_a_line_break_cannot_end_a_commented_delete_and_run_as_sql(pair: Pair):
    # A row written to the live database since the restore, keyed by text the application's users chose.
    hostile = "x\nCOMMIT; DROP TABLE vendors; --"
    pair.sql(pair.live, f"INSERT INTO tags VALUES (E'{hostile.replace(chr(10), chr(92) + 'n')}', 0)")
    script = pair.run("changes", pair.kept, "--sql").stdout
    assert not [line for line in script.splitlines() if line.startswith("COMMIT; DROP")]
    assert "left out here: key {'name': 'x\\nCOMMIT; DROP TABLE vendors; --'}" in script
    applied = pair.psql(pair.live, script)
    assert applied.returncode == 0, applied.stderr
    assert pair.sql(pair.live, "SELECT count(*) FROM vendors") != []  # still there
