#!/usr/bin/env python3
"""Benchmark cleanup on a store of 10,000 configuration backups, locally and on a local S3 server, in one run.

The store holds one backup an hour for 10,000 hours (about 14 months; each a copy of one real config
backup, its manifest rewritten with its own id and time). Timed, whole processes, median of ROUNDS, each
round on a fresh copy of the store (cp -al):
  nightly cleanup      `cleanup 416 --keep 5`: every manifest read, the 16 hours older than 416 days removed
                       (goal: under 2 s), beside `find STORE -mtime +416 -exec rm -rf`, which reads none
  calendar cleanup     `cleanup --keep-daily 7 --keep-weekly 4 --keep-monthly 12`: 9,978 of 10,000 removed
                       (figure only), beside `find STORE -mtime +30 -exec rm -rf` (9,281 removed)
  remote cleanup       `cleanup 416 --keep 5 --remote` over the 10,000 manifests pushed to the server (goal:
                       under 30 s): once as the first cleanup from this host (remote_first: every manifest
                       read), then in rounds as the nightly one (415, 414 ... days: only what is new is read),
                       beside boto3 reading every manifest
--quick: 200 backups, one round. A step that fails stops the benchmark with exit 1.
Usage: bench/retention_bench.py [--quick]   (BENCH_ROUNDS=N sets the rounds of a full run)
The benchmark starts its own S3 server unless BENCH_S3_ENDPOINT_URL names one (see remote_bench.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import harness  # noqa: E402
from remote_bench import s3_target  # noqa: E402

from backup_store.manifest import MANIFEST, format_time, manifest_bytes, split_manifest  # noqa: E402
from offsite.manifest_cache import CACHE_FILE  # noqa: E402

BACKUPS, QUICK_BACKUPS = 10_000, 200
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
READ_ALL = """
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
pages = s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2], Prefix=sys.argv[3])
keys = [item["Key"] for page in pages for item in page.get("Contents", []) if "/manifests/" in item["Key"]]
print(sum(len(s3.get_object(Bucket=sys.argv[2], Key=key)["Body"].read()) for key in keys))
"""


def make_config(folder: Path) -> None:
    """A configuration of the size the runbook's apps have: a few YAML and JSON files and a .env."""
    (folder / "config" / "services").mkdir(parents=True)
    (folder / "config" / "app.yml").write_text("server:\n  port: 8080  # public\n" + "# note\n" * 40)
    (folder / "config" / "database.yml").write_text("pool: 10\ntimeout: 5000\n" * 20)
    (folder / "config" / "services" / "cache.json").write_text(json.dumps({"ttl": 60, "hosts": ["a"] * 30}))
    (folder / ".env").write_text("API_TOKEN=bench-token\nDEBUG=false\n")
    os.chmod(folder / ".env", 0o600)


def fill_store(store: Path, count: int) -> None:
    """`count` backups one hour apart, ending now: copies of the store's one backup (payload linked)."""
    (original,) = [p for p in store.iterdir() if (p / MANIFEST).is_file()]
    header, entries = split_manifest((original / MANIFEST).read_bytes())
    payload = [p for p in original.rglob("*") if p.is_file() and p.name != MANIFEST]
    now = datetime.now(UTC)
    for hour in range(count):
        when = now - timedelta(hours=hour)
        backup_id = when.strftime("%Y%m%dT%H%M%S.%f")[:-3] + f"Z-config-bench-{hour:08x}"
        folder = store / backup_id
        for path in payload:
            target = folder / path.relative_to(original)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        (folder / MANIFEST).write_bytes(manifest_bytes({**header, "id": backup_id, "created_at": format_time(when)},
                                                       entries))
        os.utime(folder, (when.timestamp(), when.timestamp()))
    shutil.rmtree(original)


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    count, rounds = (QUICK_BACKUPS, 1) if args.quick else (BACKUPS, ROUNDS)
    work = Path(tempfile.mkdtemp(prefix="retention-bench-"))
    figures: dict[str, list[float]] = {}
    try:
        harness.isolate(work)
        make_config(work)
        store = work / "store"
        env = harness.command_env({"CONFIG_DIR": str(work / "config"), "ENV_FILE": str(work / ".env"),
                                   "CONFIG_BACKUP_DIR": str(store), "POINTS_DIR": str(work / "points")})
        config = [sys.executable, str(ROOT / "config_rollback.py"), "--json"]
        harness.run_step([*config, "backup"], env)
        fill_store(store, count)
        days = count // 24
        local = {
            "nightly": ([*config, "cleanup", str(days), "--keep", "5"],
                        ["find", "{store}", "-mindepth", "1", "-maxdepth", "1", "-name", "2*", "-mtime", f"+{days}",
                         "-exec", "rm", "-rf", "{}", "+"]),
            "calendar": ([*config, "cleanup", "--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "12"],
                         ["find", "{store}", "-mindepth", "1", "-maxdepth", "1", "-name", "2*", "-mtime", "+30",
                          "-exec", "rm", "-rf", "{}", "+"]),
        }
        removed: dict[str, int] = {}
        for n in range(rounds):
            for name, (ours, peer) in local.items():
                runs = [("ours", ours), ("find", peer)]
                for tool, argv in runs if n % 2 == 0 else reversed(runs):
                    copy = work / f"copy-{name}-{tool}"
                    harness.run_step(["cp", "-al", str(store), str(copy)], env)
                    argv = [str(copy) if part == "{store}" else part for part in argv]
                    timing = harness.timed(argv, {**env, "CONFIG_BACKUP_DIR": str(copy)}, sync=True)
                    figures.setdefault(f"{name}_{tool}", []).append(timing.seconds)
                    if tool == "ours":
                        removed[name] = len(json.loads(timing.stdout)["removed"])
                    shutil.rmtree(copy)
        with s3_target(work) as s3:
            url = f"s3://{s3.bucket}/bench-{secrets.token_hex(4)}"
            remote_env = {**env, **s3.settings, "REMOTE_URL": url}
            harness.run_step([*config, "push", "--all"], remote_env)
            (store / CACHE_FILE).unlink(missing_ok=True)  # the first cleanup from this host reads every manifest
            first = harness.timed([*config, "cleanup", str(days), "--keep", "5", "--remote"], remote_env, sync=True)
            figures["remote_first"] = [first.seconds]
            removed["remote_first"] = len(json.loads(first.stdout)["removed"])
            for n in range(rounds):  # each night one day more goes: nothing is pushed back between rounds
                runs = [("ours", [*config, "cleanup", str(days - 1 - n), "--keep", "5", "--remote"]),
                        ("boto3", [sys.executable, "-c", READ_ALL, s3.endpoint, s3.bucket, url.split("/", 3)[3]])]
                for tool, argv in runs if n % 2 == 0 else reversed(runs):
                    timing = harness.timed(argv, remote_env, sync=True)
                    figures.setdefault(f"remote_{tool}", []).append(timing.seconds)
                    if tool == "ours":
                        removed["remote"] = len(json.loads(timing.stdout)["removed"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {key: statistics.median(seconds) for key, seconds in figures.items()}
    print(*([harness.QUICK_BANNER] if args.quick else []),
          f"cleanup of a store of {count:,} configuration backups, median of {rounds} rounds", sep="\n")
    lines = (("nightly", "nightly_ours", "find", "nightly_find", 2.0),
             ("calendar", "calendar_ours", "find", "calendar_find", None),
             ("remote", "remote_ours", "boto3", "remote_boto3", 30.0),
             ("remote_first", "remote_first", "boto3", "remote_boto3", 30.0))
    for name, ours_key, peer, peer_key, goal in lines:
        ours, theirs = medians[ours_key], medians[peer_key]
        verdict = f"goal < {goal:.0f} s: {'met' if ours < goal else 'MISSED'}" if goal else "figure only"
        print(f"  {name:<12} {ours:6.2f} s ({removed[name]:,} removed)   {peer} {theirs:6.2f} s   "
              f"{ours / theirs:5.2f}x   {verdict}")

if __name__ == "__main__":
    main()
