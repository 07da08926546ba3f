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
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = 20_000
CORES = len(os.sched_getaffinity(0))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def generate(tree: Path) -> None:
    """20,000 files of 2-18 KB (about 200 MB) in 400 folders, some executable."""
    block = os.urandom(20_000)
    for i in range(FILES):
        folder = tree / f"pkg{i % 40:02d}" / f"mod{i % 400:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = 2_000 + (i * 7919) % 16_000
        path = folder / f"file{i:05d}.py"
        path.write_bytes(block[i % 1000:][:size])
        if i % 50 == 0:
            os.chmod(path, 0o755)


def disk_usage(path: Path) -> int:
    """Bytes on disk, hard links counted once (du)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds the command took, after a sync so earlier writes are not paid for here; the CPU seconds
    (user and system) of it and its children, on all cores; and its stdout."""
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}: {done.stderr.strip()}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu, done.stdout


def one_round(work: Path, live: Path, n: int) -> dict[str, float]:
    """cp -a, a first and an unchanged second backup into a new store, cp -a again, a restore of the newest.

    Each of ours is set against the cp -a timed just before it: on a shared disk the speed of file
    creation drifts over seconds, and neighbours see the same disk.
    """
    env = {**os.environ, "DEPLOYMENT_DIR": str(live), "CODE_BACKUP_DIR": str(work / f"store{n}")}
    script = [sys.executable, str(ROOT / "code_rollback.py"), "--json"]
    figures: dict[str, float] = {}
    figures["cp"], figures["cp_cpu"], _ = timed(["cp", "-a", str(live), str(work / f"copy{n}")], env)
    figures["first"], figures["first_cpu"], _ = timed([*script, "backup"], env)
    figures["second"], figures["second_cpu"], _ = timed([*script, "backup"], env)
    # Of the copy, not the live tree: a new link changes a file's ctime, which the next snapshot would doubt.
    figures["links"] = timed(["cp", "-al", str(work / f"copy{n}"), str(work / f"links{n}")], env)[0]
    figures["two_backups"] = disk_usage(work / f"store{n}") / disk_usage(live)
    figures["cp_again"] = timed(["cp", "-a", str(live), str(work / f"copy{n}b")], env)[0]
    figures["restore"], figures["restore_cpu"], out = timed([*script, "restore", "latest", "--yes"], env)
    report = json.loads(out)
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
    # Timed as installed: with the project's modules already byte-compiled, whatever this shell says.
    sources = [str(ROOT / name) for name in ("code_rollback.py", "code_tree.py", "common")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *sources], check=True)
    work = Path(tempfile.mkdtemp(prefix="code-bench-"))
    try:
        live = work / "deploy"
        generate(live)
        tree_size = disk_usage(live)
        rounds = [one_round(work, live, n) for n in range(ROUNDS)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(f"code_rollback.py on {FILES} files ({tree_size / 1e6:.0f} MB on disk), {CORES} cores, "
          f"median of {ROUNDS} rounds; each ratio against the cp -a timed just before")
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
