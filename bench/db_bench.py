#!/usr/bin/env python3
"""Benchmark database_rollback.py against plain pg_dump / pg_restore on a pgbench database (scale 30).

In one run, on a throwaway cluster:
  backup    `database_rollback.py backup`      vs  `pg_dump -Fc`
  restore   `database_rollback.py restore`     vs  `pg_restore` into an empty database
  outage    the longest stretch, during our restore, in which a poller (every 20 ms) got no answer with
            whole data from the live database
Targets (issue 3): backup <= 1.10x pg_dump, restore <= 1.25x pg_restore, outage <= 1 s.
Usage: bench/db_bench.py [--scale N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pg_cluster import ThrowawayCluster  # noqa: E402

POLL_SECONDS = 0.020


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one run of argv; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}: {done.stderr.strip()}")
    return elapsed


class Poller(threading.Thread):
    """Asks the live database for whole data every 20 ms and records the longest gap between answers."""

    def __init__(self, cluster: ThrowawayCluster, dbname: str, branches: int):
        super().__init__(daemon=True)
        self.cluster, self.dbname, self.branches = cluster, dbname, branches
        self.stop = threading.Event()
        self.longest_gap = 0.0
        self.failures = 0

    def run(self) -> None:
        conn = None
        last_ok = time.monotonic()
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.cluster.connect(self.dbname)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=30, help="pgbench scale (30 is about 450 MB)")
    scale = parser.parse_args().scale
    work = Path(tempfile.mkdtemp(prefix="db-bench-"))
    cluster = ThrowawayCluster()
    cluster.start()
    try:
        env = {**os.environ, "PGHOST": cluster.host, "PGPORT": str(cluster.port), "PGUSER": cluster.user}
        cluster.create_database("bench")
        print(f"building a pgbench database at scale {scale} ...", file=sys.stderr)
        subprocess.run([str(Path(cluster.bindir) / "pgbench"), "-i", "-q", "-s", str(scale), "bench"],
                       env=env, check=True, capture_output=True)
        with cluster.connect("bench") as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_size_pretty(pg_database_size('bench'))")
            size = cur.fetchone()[0]
        ours_env = {**env, **cluster.env("bench"), "BACKUP_DIR": str(work / "store")}
        script = [sys.executable, str(ROOT / "database_rollback.py")]

        plain_dump = timed(["pg_dump", "-Fc", "-f", str(work / "plain.dump"), "bench"], env)
        our_backup = timed([*script, "backup"], ours_env)

        cluster.create_database("bench_plain")
        plain_restore = timed(["pg_restore", "--exit-on-error", "-d", "bench_plain", str(work / "plain.dump")], env)

        poller = Poller(cluster, "bench", branches=scale)
        poller.start()
        our_restore = timed([*script, "restore", "latest", "--yes"], ours_env)
        poller.stop.set()
        poller.join()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"database_rollback.py on a pgbench database at scale {scale} ({size}), {os.cpu_count()} cores")
    print(f"  backup   {our_backup:7.2f} s   pg_dump -Fc   {plain_dump:7.2f} s   ratio {our_backup / plain_dump:.2f}"
          "  (target <= 1.10)")
    print(f"  restore  {our_restore:7.2f} s   pg_restore    {plain_restore:7.2f} s   ratio "
          f"{our_restore / plain_restore:.2f}  (target <= 1.25)")
    print(f"  outage   {poller.longest_gap * 1000:7.0f} ms longest gap between whole answers during our restore "
          f"({poller.failures} failed polls; target <= 1000 ms)")


if __name__ == "__main__":
    main()
