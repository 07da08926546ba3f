#!/usr/bin/env python3
"""Benchmark off-host copies against boto3 on its own, on a local S3 server (rclone serve s3), in one run.

  push of a 450 MB dump   vs boto3's upload_file of the same file      (goal <= 1.2x)
  pull of it              vs boto3's download_file of the same object  (goal <= 1.2x)
  push of an unchanged 20,000-file code backup                         (goal < 2 s, bytes sent < 1% of the tree)

Every figure is a whole process (interpreter, imports, connection), ours and boto3's alike; the median of
ROUNDS, with the filesystem synced before each timing and who goes first alternating between rounds. The
dump is 450 MB of random bytes (the size of a pgbench scale-30 dump; it does not compress, like a
compressed dump) stored as a database backup.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from code_bench import generate, timed  # noqa: E402 - the code benchmark's tree and timing
from s3_server import LocalS3, objects_under  # noqa: E402

from common.store import BackupStore  # noqa: E402

DUMP_MB = 450
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))

BOTO3 = """
import sys, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
config = TransferConfig(multipart_chunksize=8 * 1024 * 1024, max_concurrency=16)
if sys.argv[2] == "up":
    s3.upload_file(sys.argv[5], sys.argv[3], sys.argv[4], Config=config)
else:
    s3.download_file(sys.argv[3], sys.argv[4], sys.argv[5], Config=config)
"""


def make_dump_backup(store_root: Path, work: Path) -> str:
    dump = work / "db.dump"
    with open(dump, "wb") as out:
        for _ in range(DUMP_MB):
            out.write(os.urandom(1024 * 1024))
    store = BackupStore(store_root, "db")
    with store.lock("bench"), store.new_backup("bench dump", name="bench") as staging:
        staging.add_file(dump, "db.dump")
    return staging.backup_id


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    server = LocalS3(work / "s3")
    server.start()
    try:
        server.bucket("bench")
        env = {**os.environ, **server.env("bench"), "BACKUP_DIR": str(work / "db_backups"),
               "DEPLOYMENT_DIR": str(work / "deploy"), "CODE_BACKUP_DIR": str(work / "code_backups")}
        backup_id = make_dump_backup(work / "db_backups", work)
        dump = work / "db_backups" / backup_id / "db.dump"
        db = [sys.executable, str(ROOT / "database_rollback.py"), "--json"]
        boto = [sys.executable, "-c", BOTO3, server.endpoint]
        figures: dict[str, list[float]] = {key: [] for key in ("push", "upload", "pull", "download")}
        for n in range(ROUNDS):
            env_n = {**env, "REMOTE_URL": f"s3://bench/round{n}"}  # a fresh prefix: a whole push each round
            ups = [("upload", [*boto, "up", "bench", f"plain/{n}", str(dump)], env),
                   ("push", [*db, "push", backup_id], env_n)]
            for name, argv, run_env in ups if n % 2 == 0 else reversed(ups):  # who goes first alternates
                figures[name].append(timed(argv, run_env)[0])
            downs = [("download", [*boto, "down", "bench", f"plain/{n}", str(work / "down.bin")], env),
                     ("pull", [*db, "pull", backup_id], env_n)]
            shutil.rmtree(work / "db_backups" / backup_id)
            for name, argv, run_env in downs if n % 2 == 0 else reversed(downs):
                figures[name].append(timed(argv, run_env)[0])
            (work / "down.bin").unlink()

        generate(work / "deploy")
        code = [sys.executable, str(ROOT / "code_rollback.py"), "--json"]
        timed([*code, "backup", "--push"], env)
        tree_bytes = sum(p.stat().st_size for p in (work / "deploy").rglob("*") if p.is_file())
        unchanged = []
        for _ in range(ROUNDS):
            before = objects_under(work / "s3" / "bench")
            timed([*code, "backup"], env)
            seconds, out = timed([*code, "push"], env)
            sent = sum(size for key, size in objects_under(work / "s3" / "bench").items() if key not in before)
            unchanged.append((seconds, sent, json.loads(out)))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(figures[key])

    print(f"off-host copies on a local S3 server (rclone serve s3), {os.cpu_count()} cores, median of {ROUNDS}")
    print(f"  push of a {DUMP_MB} MB dump      {median('push'):6.2f} s   boto3 upload_file   {median('upload'):6.2f} s"
          f"   {median('push') / median('upload'):5.2f}x   (goal <= 1.2)")
    print(f"  pull of it                {median('pull'):6.2f} s   boto3 download_file {median('download'):6.2f} s"
          f"   {median('pull') / median('download'):5.2f}x   (goal <= 1.2)")
    seconds = statistics.median(s for s, _, _ in unchanged)
    sent = statistics.median(b for _, b, _ in unchanged)
    print(f"  push of an unchanged 20,000-file code backup   {seconds:6.2f} s   (goal < 2 s), "
          f"{sent / 1024:.0f} KiB sent = {100 * sent / tree_bytes:.3f}% of the tree's {tree_bytes / 1e6:.0f} MB"
          "   (goal < 1%)")


if __name__ == "__main__":
    main()
