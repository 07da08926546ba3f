#!/usr/bin/env python3
"""Benchmark database_rollback.py against plain pg_dump / pg_restore on a pgbench database (scale 30).

In one run, on a throwaway cluster:
  backup    `database_rollback.py backup`      vs  `pg_dump -Fc`
  restore   `database_rollback.py restore`     vs  `pg_restore` into an empty database
  outage    the longest stretch, during our restore, in which a poller (every 20 ms) got no answer with
            whole data from the live database
  changes   `database_rollback.py changes <kept>`  vs  an EXCEPT query in psql, both directions, counted:
            the database our restore kept (`<name>__before_...`) has 1 % of pgbench_accounts' rows changed
            (0.8 % updated, 0.1 % deleted, 0.1 % inserted) and is compared with the live one. EXCEPT cannot
            span two databases, so the baseline gets both copies in one: a copy of the live database whose
            schema `kept` holds pgbench_accounts with the same changes. Median of 3 rounds, who goes first
            alternating; also our peak memory (max RSS), and one run of `changes --sql` (every statement).
Targets (issue 3): backup <= 1.10x pg_dump, restore <= 1.25x pg_restore, outage <= 1 s; changes <= 1.5x
EXCEPT, under 200 MiB.
--quick: scale 1 (about 20 MB), one round. A step that fails stops the benchmark with exit 1.
Usage: bench/db_bench.py [--quick] [--scale N]
The benchmark starts its own cluster unless BENCH_DB_HOST names a server (with BENCH_DB_PORT, BENCH_DB_USER,
BENCH_DB_PASSWORD: a superuser); it then creates and drops databases named bench_<random>*.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import harness  # noqa: E402
from pg_cluster import ThrowawayCluster, find_bindir  # noqa: E402

if TYPE_CHECKING:
    from psycopg2.extensions import connection

POLL_SECONDS = 0.020
SCALE, QUICK_SCALE = 30, 1
CHANGES_ROUNDS = 3
ACCOUNTS_PER_SCALE = 100_000
# 1 % of the rows: 0.8 % updated, 0.1 % deleted, 0.1 % inserted (after the last account).
CHANGE_ACCOUNTS = """
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 125 = 7;
DELETE FROM pgbench_accounts WHERE aid % 1000 = 3;
INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
  SELECT {last} + i, 1, 0, 'late' FROM generate_series(1, {count}) i;
"""
EXCEPT_BOTH_WAYS = ("SELECT count(*) FROM ("
                    "(SELECT * FROM public.pgbench_accounts EXCEPT SELECT * FROM kept.pgbench_accounts) UNION ALL "
                    "(SELECT * FROM kept.pgbench_accounts EXCEPT SELECT * FROM public.pgbench_accounts)) AS d")
_COUNTS = re.compile(r"(\d+) row\(s\) only in the kept database, (\d+) only in the live one, (\d+) differ")


@dataclass(frozen=True)
class PgServer:
    """The PostgreSQL server the benchmark runs on, as a superuser (it creates and drops databases)."""

    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str) -> connection:
        """A new connection to `dbname`; the caller closes it."""
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=10)

    def admin(self, statement: str, name: str) -> None:
        """CREATE or DROP DATABASE (no transaction block allowed) with `name` as its identifier."""
        from psycopg2 import sql

        conn = self.connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL(statement).format(sql.Identifier(name)))
        finally:
            conn.close()

    def databases(self, prefix: str) -> list[str]:
        """The databases whose names start with `prefix`."""
        conn = self.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database")
                return [name for (name,) in cur.fetchall() if name.startswith(prefix)]
        finally:
            conn.close()

    def client_env(self) -> dict[str, str]:
        """libpq's settings for the plain tools (pg_dump, pg_restore, pgbench)."""
        found = {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user}
        return {**found, "PGPASSWORD": self.password} if self.password else found

    def toolkit_env(self, dbname: str) -> dict[str, str]:
        """The DB_* settings that point database_rollback.py at `dbname`."""
        return {"DB_HOST": self.host, "DB_PORT": str(self.port), "DB_NAME": dbname, "DB_USER": self.user,
                "DB_PASSWORD": self.password}


@contextmanager
def pg_server() -> Iterator[PgServer]:
    """The server BENCH_DB_HOST names (with BENCH_DB_PORT, BENCH_DB_USER, BENCH_DB_PASSWORD), else a throwaway
    cluster started for this run. Only BENCH_ names: a DB_HOST meant for the toolkit is never benchmarked on."""
    host = os.environ.get("BENCH_DB_HOST")
    if host:
        port = os.environ.get("BENCH_DB_PORT", "5432")
        if not port.isdigit():
            sys.exit(f"BENCH_DB_PORT must be a port number, got {port!r}")
        yield PgServer(host, int(port), os.environ.get("BENCH_DB_USER", "postgres"),
                       os.environ.get("BENCH_DB_PASSWORD", ""))
        return
    cluster = ThrowawayCluster()
    cluster.start()
    try:
        yield PgServer(cluster.host, cluster.port, cluster.user, cluster.password)
    finally:
        cluster.stop()


class Poller(threading.Thread):
    """Asks the live database for whole data every 20 ms and records the longest gap between answers."""

    def __init__(self, server: PgServer, dbname: str, branches: int):
        super().__init__(daemon=True)
        self.server, self.dbname, self.branches = server, dbname, branches
        self.stop = threading.Event()
        self.longest_gap = 0.0
        self.failures = 0

    def run(self) -> None:
        conn = None
        last_ok = time.monotonic()
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.server.connect(self.dbname)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pgbench_branches")
                    whole = cur.fetchone()[0] == self.branches
                    cur.execute("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
                    whole = whole and cur.fetchone() is not None
            except Exception:
                whole = False
                self.failures += 1
                if conn is not None:
                    conn.close()
                conn = None
            now = time.monotonic()
            if whole:
                self.longest_gap = max(self.longest_gap, now - last_ok)
                last_ok = now
            time.sleep(POLL_SECONDS)
        if conn is not None:
            conn.close()


def main() -> None:
    cli = harness.parser(__doc__)
    cli.add_argument("--scale", type=int, help=f"pgbench scale ({SCALE}, about 450 MB, unless --quick: {QUICK_SCALE})")
    args = cli.parse_args()
    scale = args.scale or (QUICK_SCALE if args.quick else SCALE)
    work = Path(tempfile.mkdtemp(prefix="db-bench-"))
    name = f"bench_{secrets.token_hex(4)}"  # its own names: the server may be shared
    try:
        harness.isolate(work)
        with pg_server() as server:
            try:
                figures = measure(server, name, scale, work)
            finally:
                # Ours, the plain restore's, EXCEPT's, and those our restore kept (`<name>__before_<stamp>`).
                for leftover in server.databases(name):
                    server.admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", leftover)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.quick:
        print(harness.QUICK_BANNER)
    print(f"database_rollback.py on a pgbench database at scale {scale} ({figures['size']}), {os.cpu_count()} cores")
    print(f"  backup   {figures['backup']:7.2f} s   pg_dump -Fc   {figures['pg_dump']:7.2f} s   ratio "
          f"{figures['backup'] / figures['pg_dump']:.2f}  (target <= 1.10)")
    print(f"  restore  {figures['restore']:7.2f} s   pg_restore    {figures['pg_restore']:7.2f} s   ratio "
          f"{figures['restore'] / figures['pg_restore']:.2f}  (target <= 1.25)")
    print(f"  outage   {figures['outage'] * 1000:7.0f} ms longest gap between whole answers during our restore "
          f"({figures['failed_polls']} failed polls; target <= 1000 ms)")
    changes = figures["changes"]
    print(f"  changes  {changes['ours']:7.2f} s   EXCEPT in psql{changes['except']:7.2f} s   ratio "
          f"{changes['ours'] / changes['except']:.2f}  (target <= 1.50; {changes['rows']} rows differ, "
          f"{changes['rounds']} round(s))")
    print(f"  changes  peak memory {changes['rss']:.0f} MiB (target < 200 MiB); with --sql "
          f"{changes['sql']:.2f} s, {changes['sql_rss']:.0f} MiB, {changes['sql_mib']:.1f} MiB of SQL")


def measure(server: PgServer, name: str, scale: int, work: Path) -> dict:
    """Build a pgbench database `name`, then time our backup and restore of it against pg_dump and pg_restore."""
    env = harness.command_env(server.client_env())
    server.admin("CREATE DATABASE {}", name)
    print(f"building a pgbench database at scale {scale} ...", file=sys.stderr)
    harness.run_step([str(Path(find_bindir()) / "pgbench"), "-i", "-q", "-s", str(scale), name], env)
    conn = server.connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
            size = cur.fetchone()[0]
    finally:
        conn.close()
    ours_env = harness.command_env({**server.toolkit_env(name), "BACKUP_DIR": str(work / "store")})
    script = [sys.executable, str(ROOT / "database_rollback.py")]

    plain_dump = harness.timed(["pg_dump", "-Fc", "-f", str(work / "plain.dump"), name], env).seconds
    our_backup = harness.timed([*script, "backup"], ours_env).seconds

    server.admin("CREATE DATABASE {}", f"{name}_plain")
    plain_restore = harness.timed(["pg_restore", "--exit-on-error", "-d", f"{name}_plain",
                                   str(work / "plain.dump")], env).seconds

    poller = Poller(server, name, branches=scale)
    poller.start()
    try:
        our_restore = harness.timed([*script, "restore", "latest", "--yes"], ours_env).seconds
    finally:
        poller.stop.set()
        poller.join()
    changes = measure_changes(server, name, scale, env, ours_env, 1 if scale == QUICK_SCALE else CHANGES_ROUNDS)
    return {"size": size, "pg_dump": plain_dump, "backup": our_backup, "pg_restore": plain_restore,
            "restore": our_restore, "outage": poller.longest_gap, "failed_polls": poller.failures,
            "changes": changes}


def measure_changes(server: PgServer, name: str, scale: int, env: dict[str, str], ours_env: dict[str, str],
                    rounds: int) -> dict:
    """Change 1 % of the accounts in the database our restore kept, then time `changes` on it against EXCEPT
    on both copies in one database."""
    kept = server.databases(f"{name}__before_")[0]
    both = f"{name}_except"
    changes = CHANGE_ACCOUNTS.format(last=scale * ACCOUNTS_PER_SCALE, count=scale * ACCOUNTS_PER_SCALE // 1000)
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    print("changing 1 % of the accounts, and copying them for EXCEPT ...", file=sys.stderr)
    harness.run_step([*psql, "-d", kept, "-c", changes], env)
    harness.run_step(["createdb", "-T", name, both], env)
    harness.run_step([*psql, "-d", both, "-c", "CREATE SCHEMA kept; CREATE TABLE kept.pgbench_accounts AS TABLE "
                      "public.pgbench_accounts; SET search_path = kept;" + changes], env)
    for database in (kept, name, both):
        harness.run_step([*psql, "-d", database, "-c", "VACUUM ANALYZE"], env)
    ours_argv = [sys.executable, str(ROOT / "database_rollback.py"), "changes", kept]
    except_argv = [*psql, "-At", "-d", both, "-c", EXCEPT_BOTH_WAYS]
    ours, plain = [], []
    for round_number in range(rounds):
        pair = [(ours, ours_argv, ours_env), (plain, except_argv, env)]
        for times, argv, run_env in pair if round_number % 2 == 0 else reversed(pair):
            times.append(harness.timed(argv, run_env))
    found = _COUNTS.search(ours[0].stdout)
    rows_apart = int(plain[0].stdout.strip())
    if found is None or 2 * int(found[3]) + int(found[1]) + int(found[2]) != rows_apart:
        sys.exit(f"changes and EXCEPT disagree: {found[0] if found else ours[0].stdout[:200]!r}, "
                 f"EXCEPT: {rows_apart} rows")
    sql = harness.timed([*ours_argv, "--sql"], ours_env)
    return {"ours": statistics.median(t.seconds for t in ours), "except": statistics.median(t.seconds for t in plain),
            "rss": max(t.max_rss_mib for t in ours), "rows": int(found[1]) + int(found[2]) + int(found[3]),
            "rounds": rounds, "sql": sql.seconds, "sql_rss": sql.max_rss_mib, "sql_mib": len(sql.stdout) / 2**20}


if __name__ == "__main__":
    main()
