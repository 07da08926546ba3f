#!/usr/bin/env python3
"""Benchmark config_rollback.py on a generated 1,000-file CONFIG_DIR, beside `cp -a` of the same tree.

Every figure is a whole process (interpreter start included), the median of several runs:
  --help                      the operator's first command at 3 a.m.
  update                      a one-key YAML change, with the backup of all 1,000 files it takes first
  restore, all files differ   every file rewritten, with the safety backup of the current state first
  restore, one file differs   the common case after a bad deploy
  cp -a                       the plain tool copying the same tree, for scale
Targets (issue 2): update < 0.3 s, restore of 1,000 files < 1 s, --help < 0.15 s.
--quick: 50 files, one run of each. A step that fails stops the benchmark with exit 1.
Usage: bench/config_bench.py [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import harness  # noqa: E402

SCRIPT = str(ROOT / "config_rollback.py")
FILES, RUNS = 1000, 7
QUICK_FILES, QUICK_RUNS = 50, 1


def generate_tree(config: Path, files: int) -> None:
    """`files` small config files in 20 folders: YAML, JSON and .env, 0.5 to 3 KB each."""
    for i in range(files):
        folder = config / f"service-{i % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 3
        if kind == 0:
            body = "".join(f"# setting {j} of file {i}\nkey_{j}: value-{i}-{j}\n" for j in range(20))
            (folder / f"app-{i}.yml").write_text(f"name: svc{i}\nport: {8000 + i}\n{body}")
        elif kind == 1:
            data = {"name": f"svc{i}", "limits": {f"k{j}": j * i for j in range(30)}}
            (folder / f"settings-{i}.json").write_text(json.dumps(data, indent=2) + "\n")
        else:
            (folder / f"svc-{i}.env").write_text("".join(f"VAR_{j}=value_{i}_{j}\n" for j in range(40)))


def median_time(argv: list[str], env: dict[str, str], runs: int,
                prepare: Callable[[int], object] | None = None) -> float:
    """Median wall time of `runs` runs of argv; `prepare` runs untimed before each."""
    times = []
    for n in range(runs):
        if prepare:
            prepare(n)
        times.append(harness.timed(argv, env).seconds)
    return statistics.median(times)


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    files, runs = (QUICK_FILES, QUICK_RUNS) if args.quick else (FILES, RUNS)
    work = Path(tempfile.mkdtemp(prefix="config-bench-"))
    try:
        harness.isolate(work)
        config = work / "config"
        generate_tree(config, files)
        (work / ".env").write_text("DB_PASSWORD=x\n")
        os.chmod(work / ".env", 0o600)
        env = harness.command_env({"CONFIG_DIR": str(config), "CONFIG_BACKUP_DIR": str(work / "store"),
                                   "ENV_FILE": str(work / ".env")})
        py = [sys.executable, SCRIPT]
        harness.run_step([*py, "backup", "--label", "baseline"], env)
        baseline = json.loads(harness.run_step([*py, "--json", "list"], env))["backups"][0]["id"]

        def clear_store(_n: int) -> None:
            # Keep the store the same size run after run: only the baseline stays.
            for item in (work / "store").iterdir():
                if item.is_dir() and item.name != baseline:
                    shutil.rmtree(item)

        def change_all(n: int) -> None:
            clear_store(n)
            for path in config.rglob("*"):
                if path.is_file():
                    with open(path, "a") as out:
                        out.write(f"\n# changed by run {n}\n" if path.suffix != ".json" else " ")

        def change_one(n: int) -> None:
            clear_store(n)
            with open(config / "service-00" / "app-0.yml", "a") as out:
                out.write(f"# run {n}\n")

        def fresh_copy_target(_n: int) -> None:
            shutil.rmtree(work / "copy", ignore_errors=True)

        results = {
            "--help": median_time([*py, "--help"], env, runs),
            "update (one YAML key, with its backup)": median_time(
                [*py, "update", "service-00/app-0.yml", '{"port": 1234}'], env, runs,
                prepare=lambda n: (clear_store(n), (config / "service-00" / "app-0.yml").write_text(
                    f"name: svc0\nport: {9000 + n}\n# kept\nother: 1\n"))),
            f"restore, all {files:,} files differ": median_time([*py, "restore", baseline, "--yes"], env, runs,
                                                                 prepare=change_all),
            "restore, one file differs": median_time([*py, "restore", baseline, "--yes"], env, runs,
                                                     prepare=change_one),
            "cp -a of the tree": median_time(["cp", "-a", str(config), str(work / "copy")], env, runs,
                                             prepare=fresh_copy_target),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cp = results["cp -a of the tree"]
    if args.quick:
        print(harness.QUICK_BANNER)
    print(f"config_rollback.py on {files:,} files, median of {runs} whole-process runs, {os.cpu_count()} cores")
    for name, seconds in results.items():
        print(f"  {name:42} {seconds * 1000:7.0f} ms   {seconds / cp:5.1f}x cp -a")


if __name__ == "__main__":
    main()
