#!/usr/bin/env python3
"""Benchmark code_rollback.py on a generated 20,000-file tree (about 200 MB), beside `cp -a` of it.

In one run, whole processes, in rounds (the median of ROUNDS ratios, each against the cp -a timed just
before; the filesystem is synced before each timing, and nothing is deleted until the end, so one step's
writeback or discards do not land in the next):
  first backup             vs cp -a of the tree (a fresh store each round)
  unchanged second backup  vs cp -a (files hard-linked to the first backup)
  restore                  vs cp -a (the build beside the live tree, checking every checksum, with a backup of
                           the live tree meanwhile, then the switch)
  cp -al                   (hard links of every file by coreutils, for the unchanged backup's floor)
  CPU time                 (user and system, every process of the command): divided by the cores, the
                           least the command could take if its work were spread perfectly
  the switch itself        (reported by restore)
  two backups on disk      vs the tree's size on disk
Targets (issue 4): first <= 1.5x, second <= 0.2x, restore <= 1.3x cp -a; two backups <= 1.1x the tree;
switch < 50 ms.
--quick: 100 files, one round. A step that fails stops the benchmark with exit 1.
Usage: bench/code_bench.py [--quick]   (BENCH_ROUNDS=N sets the rounds of a full run)
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
sys.path[:0] = [str(ROOT)]

import harness  # noqa: E402

FILES, QUICK_FILES = 20_000, 100
CORES = len(os.sched_getaffinity(0))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def generate(tree: Path, files: int) -> None:
    """`files` files of 2-18 KB (20,000 are about 200 MB) in up to 400 folders, some executable."""
    block = os.urandom(20_000)
    for i in range(files):
        folder = tree / f"pkg{i % 40:02d}" / f"mod{i % 400:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = 2_000 + (i * 7919) % 16_000
        path = folder / f"file{i:05d}.py"
        path.write_bytes(block[i % 1000:][:size])
        if i % 50 == 0:
            os.chmod(path, 0o755)


def disk_usage(path: Path) -> int:
    """Bytes on disk, hard links counted once (du)."""
    return int(harness.run_step(["du", "-s", "-B1", str(path)], harness.command_env({})).split()[0])


def one_round(work: Path, live: Path, n: int) -> dict[str, float]:
    """cp -a, a first and an unchanged second backup into a new store, cp -a again, a restore of the newest.

    Each of ours is set against the cp -a timed just before it: on a shared disk the speed of file
    creation drifts over seconds, and neighbours see the same disk. Every timing follows a sync.
    """
    env = harness.command_env({"DEPLOYMENT_DIR": str(live), "CODE_BACKUP_DIR": str(work / f"store{n}")})
    script = [sys.executable, str(ROOT / "code_rollback.py"), "--json"]
    figures: dict[str, float] = {}

    def time_it(key: str, argv: list[str]) -> harness.Timing:
        run = harness.timed(argv, env, sync=True)
        figures[key], figures[f"{key}_cpu"] = run.seconds, run.cpu_seconds
        return run

    time_it("cp", ["cp", "-a", str(live), str(work / f"copy{n}")])
    time_it("first", [*script, "backup"])
    time_it("second", [*script, "backup"])
    # Of the copy, not the live tree: a new link changes a file's ctime, which the next snapshot would doubt.
    time_it("links", ["cp", "-al", str(work / f"copy{n}"), str(work / f"links{n}")])
    figures["two_backups"] = disk_usage(work / f"store{n}") / disk_usage(live)
    time_it("cp_again", ["cp", "-a", str(live), str(work / f"copy{n}b")])
    report = json.loads(time_it("restore", [*script, "restore", "latest", "--yes"]).stdout)
    figures["switch"] = report["switch"]["seconds"]
    figures.update({f"restore_{phase}": value for phase, value in report["seconds"].items()})
    figures["first_ratio"] = figures["first"] / figures["cp"]
    figures["second_ratio"] = figures["second"] / figures["cp"]
    figures["links_ratio"] = figures["links"] / figures["cp"]
    figures["restore_ratio"] = figures["restore"] / figures["cp_again"]
    # The least time the work could take, its CPU seconds spread perfectly over every core, against cp -a.
    for key, cp in (("first", "cp"), ("second", "cp"), ("restore", "cp_again")):
        figures[f"{key}_floor_ratio"] = figures[f"{key}_cpu"] / CORES / figures[cp]
    return figures


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    files, rounds_wanted = (QUICK_FILES, 1) if args.quick else (FILES, ROUNDS)
    # Timed as installed: with the project's modules already byte-compiled, whatever this shell says.
    sources = [*map(str, sorted(ROOT.glob("*.py"))), str(ROOT / "common")]  # every module a script may import
    harness.run_step([sys.executable, "-m", "compileall", "-q", *sources], harness.command_env({}))
    work = Path(tempfile.mkdtemp(prefix="code-bench-"))
    try:
        harness.isolate(work)
        live = work / "deploy"
        generate(live, files)
        tree_size = disk_usage(live)
        rounds = [one_round(work, live, n) for n in range(rounds_wanted)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    if args.quick:
        print(harness.QUICK_BANNER)
    print(f"code_rollback.py on {files:,} files ({tree_size / 1e6:.0f} MB on disk), {CORES} cores, "
          f"median of {rounds_wanted} rounds; each ratio against the cp -a timed just before")
    for r in rounds:
        print(f"  round: cp {r['cp']:.2f} (cpu {r['cp_cpu']:.2f}) first {r['first']:.2f} (cpu {r['first_cpu']:.2f})"
              f" second {r['second']:.2f} (cpu {r['second_cpu']:.2f}) cp -al {r['links']:.2f}"
              f" | cp {r['cp_again']:.2f} restore {r['restore']:.2f} (cpu {r['restore_cpu']:.2f})")
    print(f"  cp -a                 {median('cp'):6.2f} s")
    for key, name, target in (("first", "first backup", 1.5), ("second", "unchanged 2nd backup", 0.2),
                              ("restore", "restore", 1.3)):
        print(f"  {name:<21} {median(key):6.2f} s   {median(key + '_ratio'):5.2f}x cp -a   (target <= {target});"
              f" its CPU time over {CORES} cores alone: {median(key + '_floor_ratio'):5.2f}x")
    print(f"  cp -al (hard links only, no checks, no manifest) {median('links'):.2f} s   "
          f"{median('links_ratio'):5.2f}x cp -a: the least any snapshot that hard-links every file can cost")
    print(f"    restore: build {median('restore_build'):.2f} s, and meanwhile the backup of the live tree "
          f"{median('restore_safety_backup'):.2f} s")
    print(f"  the switch itself     {median('switch') * 1000:6.1f} ms                  (target < 50 ms)")
    print(f"  two backups on disk   {median('two_backups'):5.2f}x the tree          (target <= 1.1)")


if __name__ == "__main__":
    main()
