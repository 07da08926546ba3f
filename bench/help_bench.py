#!/usr/bin/env python3
"""Benchmark the four scripts' `--help`: the operator's first command at 3 a.m., and the start-up every other
command pays before doing any work.

Whole processes, the median of 21 runs taken in turn (script after script, round after round, so a busy moment
of the machine falls on all of them alike), beside the bare start of the same interpreter (`python -c pass`),
which no script can beat. Target (issue 15): each `--help` under 150 ms.
--python PATH: time under another interpreter (e.g. /usr/bin/python3); `--help` needs none of the packages
in requirements.txt, so any Python 3.11+ runs it.
--quick: one run of each. A run that fails stops the benchmark with exit 1.
Usage: bench/help_bench.py [--quick] [--python PATH]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import harness  # noqa: E402

SCRIPTS = ("config_rollback.py", "code_rollback.py", "database_rollback.py", "rollback.py")
TARGET_MS = 150
RUNS, QUICK_RUNS = 21, 1


def main() -> None:
    cli = harness.parser(__doc__)
    cli.add_argument("--python", default=sys.executable, help="the interpreter to time (this one)")
    args = cli.parse_args()
    runs = QUICK_RUNS if args.quick else RUNS
    env = harness.command_env({})
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the scripts' modules load from bytecode, as when installed
    commands = {"python -c pass": [args.python, "-c", "pass"]}
    commands |= {f"{script} --help": [args.python, str(ROOT / script), "--help"] for script in SCRIPTS}
    for argv in commands.values():  # the first run writes the bytecode; it is not timed
        harness.run_step(argv, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            times[name].append(harness.timed(argv, env).seconds)
    version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()

    if args.quick:
        print(harness.QUICK_BANNER)
    print(f"--help, median of {runs} whole-process runs, Python {version} ({args.python}), {os.cpu_count()} cores")
    for name, seconds in times.items():
        median_ms = statistics.median(seconds) * 1000
        verdict = "" if name.startswith("python") else (
            f"   target < {TARGET_MS} ms: {'met' if median_ms < TARGET_MS else 'MISSED'}")
        print(f"  {name:30} {median_ms:6.0f} ms{verdict}")


if __name__ == "__main__":
    main()
