#!/usr/bin/env python3
"""Benchmark off-host copies against boto3 on its own, on a local S3 server (rclone serve s3), in one run.

  push of a 450 MB dump   vs boto3's upload_file of the same file      (goal <= 1.2x)
  pull of it              vs boto3's download_file of the same object  (goal <= 1.2x)
  push of an unchanged 20,000-file code backup                         (goal < 2 s, bytes sent < 1% of the tree)

Every figure is a whole process (interpreter, imports, connection), ours and boto3's alike; the median of
ROUNDS, with the filesystem synced before each timing and who goes first alternating between rounds. The
dump is 450 MB of random bytes (the size of a pgbench scale-30 dump; it does not compress, like a
compressed dump) stored as a database backup.
--quick: a 2 MB dump, 100 files, one round. A step that fails stops the benchmark with exit 1.
Usage: bench/remote_bench.py [--quick]   (BENCH_ROUNDS=N sets the rounds of a full run)
The benchmark starts its own server unless BENCH_S3_ENDPOINT_URL names one; it then writes under a new
prefix of the bucket BENCH_S3_BUCKET, with the AWS_* credentials of the environment.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import code_bench  # noqa: E402 - the code benchmark's tree
import harness  # noqa: E402
from s3_server import LocalS3  # noqa: E402

from backup_store.store import BackupStore  # noqa: E402

DUMP_MB, QUICK_DUMP_MB = 450, 2
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")

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


@dataclass(frozen=True)
class S3Target:
    """Where the benchmark writes: a server, a bucket, and the settings (endpoint, credentials) to reach it."""

    endpoint: str
    bucket: str
    settings: dict[str, str]
    description: str

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix`, with its size, as the server lists them."""
        import boto3

        credentials = {key.lower(): value for key, value in self.settings.items() if key in CREDENTIALS[:3]}
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.settings.get("AWS_DEFAULT_REGION"),
                              **credentials)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


@contextmanager
def s3_target(work: Path) -> Iterator[S3Target]:
    """The server named by BENCH_S3_ENDPOINT_URL and BENCH_S3_BUCKET, else a local one started for this run."""
    endpoint = os.environ.get("BENCH_S3_ENDPOINT_URL")
    if endpoint:
        bucket = os.environ.get("BENCH_S3_BUCKET") or sys.exit("BENCH_S3_ENDPOINT_URL is set: set BENCH_S3_BUCKET "
                                                                "to a bucket the benchmark may write into")
        credentials = {key: os.environ[key] for key in CREDENTIALS if key in os.environ}
        yield S3Target(endpoint, bucket, {"S3_ENDPOINT_URL": endpoint, **credentials}, f"the S3 server at {endpoint}")
        return
    server = LocalS3(work / "s3")
    server.start()
    try:
        server.bucket("bench")
        settings = server.env("bench")
        del settings["REMOTE_URL"]  # each step names its own
        yield S3Target(server.endpoint, "bench", settings, "a local S3 server (rclone serve s3)")
    finally:
        server.stop()


def make_dump_backup(store_root: Path, work: Path, megabytes: int) -> str:
    """A database backup in `store_root` whose dump is `megabytes` MB of random bytes; its id."""
    dump = work / "db.dump"
    with open(dump, "wb") as out:
        for _ in range(megabytes):
            out.write(os.urandom(1024 * 1024))
    store = BackupStore(store_root, "db")
    with store.lock("bench"), store.new_backup("bench dump", name="bench") as staging:
        staging.add_file(dump, "db.dump")
    return staging.backup_id


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    dump_mb, files, rounds = (QUICK_DUMP_MB, code_bench.QUICK_FILES, 1) if args.quick else (
        DUMP_MB, code_bench.FILES, ROUNDS)
    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    try:
        harness.isolate(work)
        with s3_target(work) as s3:
            server = s3.description
            run = f"bench-{secrets.token_hex(4)}"  # a prefix of this run's own: the bucket may be shared
            url = f"s3://{s3.bucket}/{run}"
            env = harness.command_env({**s3.settings, "BACKUP_DIR": str(work / "db_backups"),
                                       "DEPLOYMENT_DIR": str(work / "deploy"),
                                       "CODE_BACKUP_DIR": str(work / "code_backups"), "REMOTE_URL": f"{url}/code"})
            backup_id = make_dump_backup(work / "db_backups", work, dump_mb)
            dump = work / "db_backups" / backup_id / "db.dump"
            db = [sys.executable, str(ROOT / "database_rollback.py"), "--json"]
            boto = [sys.executable, "-c", BOTO3, s3.endpoint]
            figures: dict[str, list[float]] = {key: [] for key in ("push", "upload", "pull", "download")}
            for n in range(rounds):
                env_n = {**env, "REMOTE_URL": f"{url}/round{n}"}  # a fresh prefix: a whole push each round
                plain_key = f"{run}/plain/{n}"
                ups = [("upload", [*boto, "up", s3.bucket, plain_key, str(dump)], env),
                       ("push", [*db, "push", backup_id], env_n)]
                for name, argv, run_env in ups if n % 2 == 0 else reversed(ups):  # who goes first alternates
                    figures[name].append(harness.timed(argv, run_env, sync=True).seconds)
                downs = [("download", [*boto, "down", s3.bucket, plain_key, str(work / "down.bin")], env),
                         ("pull", [*db, "pull", backup_id], env_n)]
                shutil.rmtree(work / "db_backups" / backup_id)
                for name, argv, run_env in downs if n % 2 == 0 else reversed(downs):
                    figures[name].append(harness.timed(argv, run_env, sync=True).seconds)
                (work / "down.bin").unlink()

            code_bench.generate(work / "deploy", files)
            code = [sys.executable, str(ROOT / "code_rollback.py"), "--json"]
            harness.timed([*code, "backup", "--push"], env, sync=True)
            tree_bytes = sum(p.stat().st_size for p in (work / "deploy").rglob("*") if p.is_file())
            unchanged = []
            for _ in range(rounds):
                before = s3.sizes(f"{run}/code/")
                harness.timed([*code, "backup"], env, sync=True)
                push = harness.timed([*code, "push"], env, sync=True)
                sent = sum(size for key, size in s3.sizes(f"{run}/code/").items() if key not in before)
                unchanged.append((push.seconds, sent, json.loads(push.stdout)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(figures[key])

    if args.quick:
        print(harness.QUICK_BANNER)
    print(f"off-host copies on {server}, {os.cpu_count()} cores, median of {rounds}")
    print(f"  push of a {dump_mb} MB dump      {median('push'):6.2f} s   boto3 upload_file   {median('upload'):6.2f} s"
          f"   {median('push') / median('upload'):5.2f}x   (goal <= 1.2)")
    print(f"  pull of it                {median('pull'):6.2f} s   boto3 download_file {median('download'):6.2f} s"
          f"   {median('pull') / median('download'):5.2f}x   (goal <= 1.2)")
    seconds = statistics.median(s for s, _, _ in unchanged)
    sent = statistics.median(b for _, b, _ in unchanged)
    print(f"  push of an unchanged {files:,}-file code backup   {seconds:6.2f} s   (goal < 2 s), "
          f"{sent / 1024:.0f} KiB sent = {100 * sent / tree_bytes:.3f}% of the tree's {tree_bytes / 1e6:.0f} MB"
          "   (goal < 1%)")


if __name__ == "__main__":
    main()
