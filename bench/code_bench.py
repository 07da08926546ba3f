#!/usr/bin/env python3
"""Benchmark code_rollback.py on a generated 20,000-file tree (about 200 MB), beside `cp -a` of it.

In one run, whole processes:
  first backup             vs cp -a of the tree
  unchanged second backup  vs cp -a (files hard-linked to the first backup)
  restore                  vs cp -a (the tree built beside the live one and switched in)
  the switch itself        (reported by restore)
  two backups on disk      vs the tree's size on disk
Targets (issue 4): first <= 1.5x, second <= 0.2x, restore <= 1.3x cp -a; two backups <= 1.1x the tree;
switch < 50 ms.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = 20_000


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


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}: {done.stderr.strip()}")
    return elapsed, done.stdout


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="code-bench-"))
    try:
        live = work / "deploy"
        generate(live)
        subprocess.run(["sync"], check=True)
        env = {**os.environ, "DEPLOYMENT_DIR": str(live), "CODE_BACKUP_DIR": str(work / "store")}
        script = [sys.executable, str(ROOT / "code_rollback.py"), "--json"]

        cp_first, _ = timed(["cp", "-a", str(live), str(work / "copy1")], env)
        first, _ = timed([*script, "backup"], env)
        second, _ = timed([*script, "backup"], env)
        tree_size = disk_usage(live)
        store_size = disk_usage(work / "store")
        shutil.rmtree(work / "copy1")
        cp_again, _ = timed(["cp", "-a", str(live), str(work / "copy2")], env)
        shutil.rmtree(work / "copy2")
        restore, out = timed([*script, "restore", "latest", "--yes", "--no-backup"], env)
        switch = json.loads(out)["switch"]["seconds"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cp = min(cp_first, cp_again)
    print(f"code_rollback.py on {FILES} files ({tree_size / 1e6:.0f} MB on disk), {os.cpu_count()} cores")
    print(f"  cp -a                 {cp:6.2f} s")
    print(f"  first backup          {first:6.2f} s   {first / cp:5.2f}x cp -a   (target <= 1.5)")
    print(f"  unchanged 2nd backup  {second:6.2f} s   {second / cp:5.2f}x cp -a   (target <= 0.2)")
    print(f"  restore               {restore:6.2f} s   {restore / cp:5.2f}x cp -a   (target <= 1.3)")
    print(f"  the switch itself     {switch * 1000:6.1f} ms                  (target < 50 ms)")
    print(f"  two backups on disk   {store_size / tree_size:5.2f}x the tree          (target <= 1.1)")


if __name__ == "__main__":
    main()
