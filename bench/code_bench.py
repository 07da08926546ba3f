#!/usr/bin/env python3
"""Benchmark code_rollback.py on a generated tree (20,000 files, about 200 MB) beside rsync, restic and borg.

In one run, whole processes, in rounds (medians of ROUNDS; the filesystem is synced before each timing, and
who goes first, ours or the peers, alternates between rounds). Each round starts every tool on a new store:
  first backup       ours | rsync -a | restic backup (new repository) | borg create (new repository, -e none)
  unchanged backup   ours | rsync -a --link-dest=FIRST (as rsnapshot takes them) | restic backup | borg create
  restore            ours (restore latest: the build, every checksum checked, the safety backup of the live
                     tree meanwhile, the switch) | rsync -a SNAPSHOT NEW | restic restore latest --target NEW |
                     borg extract (in a new folder)
  kept switch        ours only: in a symlink layout (current -> releases/X), `restore` of the backup of a
                     release still kept on disk (the one live before the last restore): its check, the
                     safety backup of the live release, the switch of `current`
  two backups on disk  ours, against the tree's size on disk
Goals (issue 17): first <= 1.0x and unchanged <= 0.5x the fastest peer's, restore <= 1.0x the fastest peer's,
kept switch <= 0.1x the fastest peer's restore, two backups <= 1.1x the tree. The peers come from Debian:
apt-get install rsync restic borgbackup.
--quick: 100 files, one round. A step that fails stops the benchmark with exit 1.
Usage: bench/code_bench.py [--quick] [--files N] [--rounds N]   (BENCH_ROUNDS=N also sets the rounds)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import harness  # noqa: E402

FILES, QUICK_FILES = 20_000, 100
CORES = len(os.sched_getaffinity(0))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PEERS = ("rsync", "restic", "borg")
STEPS = (("first", "first backup", 1.0), ("second", "unchanged backup", 0.5), ("restore", "restore", 1.0))
INSTALL = "apt-get install rsync restic borgbackup"


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


def check_peers() -> None:
    """Stop with one line when a peer is not installed."""
    missing = [tool for tool in PEERS if shutil.which(tool) is None]
    if missing:
        sys.exit(f"code_bench.py: {', '.join(missing)} not found: the benchmark times them beside ours; {INSTALL}")


def restic_env(work: Path) -> dict[str, str]:
    """restic with no password where the version allows one (0.17+), else a fixed one (0.14 refuses empty)."""
    env = {"RESTIC_CACHE_DIR": str(work / "restic-cache")}
    help_text = subprocess.run(["restic", "init", "--help"], capture_output=True, text=True).stdout
    if "--insecure-no-password" in help_text:
        return {**env, "RESTIC_INSECURE_NO_PASSWORD": "true"}
    (work / "restic-password").write_text("bench\n")
    return {**env, "RESTIC_PASSWORD_FILE": str(work / "restic-password")}


def in_folder(folder: Path, argv: list[str]) -> list[str]:
    """argv run in `folder` (borg extract writes into the working folder)."""
    return ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(folder), *argv]


def one_round(work: Path, live: Path, n: int, peers_env: dict[str, str]) -> dict[str, float]:
    """Every tool's first backup, unchanged backup and restore, each into a store of this round."""
    out = work / f"round{n}"
    out.mkdir()
    env = harness.command_env({"DEPLOYMENT_DIR": str(live), "CODE_BACKUP_DIR": str(out / "ours")})
    penv = harness.command_env(peers_env)
    script = [sys.executable, str(ROOT / "code_rollback.py")]
    restic = ["restic", "--quiet", "-r", str(out / "restic")]
    borg = f"{out / 'borg'}"
    harness.run_step([*restic, "init"], penv)
    harness.run_step(["borg", "init", "-e", "none", borg], penv)
    for folder in ("restic-restore", "borg-extract"):
        (out / folder).mkdir()
    steps = {
        "ours": [("first", [*script, "backup"], env), ("second", [*script, "backup"], env),
                 ("restore", [*script, "restore", "latest", "--yes"], env)],
        "rsync": [("first", ["rsync", "-a", f"{live}/", f"{out}/rsync-1/"], penv),
                  ("second", ["rsync", "-a", f"--link-dest={out}/rsync-1", f"{live}/", f"{out}/rsync-2/"], penv),
                  ("restore", ["rsync", "-a", f"{out}/rsync-2/", f"{out}/rsync-restore/"], penv)],
        "restic": [("first", [*restic, "backup", str(live)], penv), ("second", [*restic, "backup", str(live)], penv),
                   ("restore", [*restic, "restore", "latest", "--target", str(out / "restic-restore")], penv)],
        "borg": [("first", ["borg", "create", f"{borg}::a", str(live)], penv),
                 ("second", ["borg", "create", f"{borg}::b", str(live)], penv),
                 ("restore", in_folder(out / "borg-extract", ["borg", "extract", f"{borg}::b"]), penv)],
    }
    figures: dict[str, float] = {}
    order = ["ours", *PEERS] if n % 2 == 0 else [*PEERS, "ours"]
    for tool in order:
        for step, argv, tool_env in steps[tool]:
            figures[f"{tool}_{step}"] = harness.timed(argv, tool_env, sync=True).seconds
    figures["two_backups"] = disk_usage(out / "ours") / disk_usage(live)
    figures["ours_kept_switch"] = kept_switch(out, live)
    return figures


def kept_switch(out: Path, live: Path) -> float:
    """Seconds of a switch back to a kept release: a symlink layout of the tree, its backup restored (built as a
    kept release), the safety backup of the tree it replaced restored (built as another), then, timed, the
    first backup restored again, which finds its release kept and whole."""
    app = out / "app"
    (app / "releases").mkdir(parents=True)
    harness.run_step(["cp", "-a", str(live), str(app / "releases" / "first")], harness.command_env({}))
    os.symlink("releases/first", app / "current")
    env = harness.command_env({"DEPLOYMENT_DIR": str(app / "current"), "CODE_BACKUP_DIR": str(out / "app-store")})
    script = [sys.executable, str(ROOT / "code_rollback.py")]

    def run_json(*args: str) -> dict:
        return json.loads(harness.run_step([*script, "--json", *args], env))

    harness.run_step([*script, "backup"], env)
    backup = run_json("list")["backups"][0]["id"]
    safety = run_json("restore", backup, "--yes")["safety_backup"]
    run_json("restore", safety, "--yes")  # now another kept release is live
    timing = harness.timed([*script, "--json", "restore", backup, "--yes"], env, sync=True)
    kept = json.loads(timing.stdout).get("kept_release") or {}
    if not kept.get("ok"):
        sys.exit(f"code_bench.py: the switch back did not find its kept release: {timing.stdout.strip()}")
    return timing.seconds


def clean_round(work: Path, live: Path, n: int) -> None:
    """Remove a round's stores and copies, and the trees our restore set aside; synced, untimed."""
    shutil.rmtree(work / f"round{n}")
    for kept in live.parent.glob(f".{live.name}.replaced-*"):
        subprocess.run(["chmod", "-R", "u+w", str(kept)], check=True)
        shutil.rmtree(kept)
    harness.run_step(["sync"], harness.command_env({}))


def main() -> None:
    cli = harness.parser(__doc__)
    cli.add_argument("--files", type=int, default=FILES, help=f"files in the generated tree (default {FILES:,})")
    cli.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of a full run (default BENCH_ROUNDS or 5)")
    args = cli.parse_args()
    check_peers()
    files, rounds_wanted = (QUICK_FILES, 1) if args.quick else (args.files, args.rounds)
    # Timed as installed: with the project's modules already byte-compiled, whatever this shell says.
    sources = [*map(str, sorted(ROOT.glob("*.py"))), str(ROOT / "common")]  # every module a script may import
    harness.run_step([sys.executable, "-m", "compileall", "-q", *sources], harness.command_env({}))
    work = Path(tempfile.mkdtemp(prefix="code-bench-"))
    try:
        harness.isolate(work)
        peers_env = {**restic_env(work), "BORG_BASE_DIR": str(work / "borg-home"),
                     "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        live = work / "deploy"
        generate(live, files)
        tree_size = disk_usage(live)
        rounds = []
        for n in range(rounds_wanted):
            rounds.append(one_round(work, live, n, peers_env))
            clean_round(work, live, n)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    report(rounds, files, tree_size, args.quick)


def report(rounds: list[dict[str, float]], files: int, tree_size: int, quick: bool) -> None:
    """Each round's figures, then each step's median beside every peer's and the ratio to the fastest."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    if quick:
        print(harness.QUICK_BANNER)
    print(f"code_rollback.py on {files:,} files ({tree_size / 1e6:.0f} MB on disk), {CORES} cores, "
          f"median of {len(rounds)} rounds, beside rsync, restic and borg")
    for r in rounds:
        print("  round: " + " | ".join(f"{step} " + " ".join(f"{tool} {r[f'{tool}_{step}']:.2f}"
                                                             for tool in ("ours", *PEERS)) for step, _, _ in STEPS))
    for step, name, goal in STEPS:
        fastest = min(PEERS, key=lambda tool: median(f"{tool}_{step}"))
        ratio = median(f"ours_{step}") / median(f"{fastest}_{step}")
        peers = "  ".join(f"{tool} {median(f'{tool}_{step}'):.2f} s" for tool in PEERS)
        print(f"  {name:<17} {median(f'ours_{step}'):6.2f} s   {ratio:5.2f}x fastest peer ({fastest})"
              f"   goal <= {goal}: {'met' if ratio <= goal else 'MISSED'}   [{peers}]")
    switch, restore_peer = median("ours_kept_switch"), min(median(f"{tool}_restore") for tool in PEERS)
    ratio = switch / restore_peer
    print(f"  {'kept switch':<17} {switch:6.2f} s   {ratio:5.2f}x fastest peer's restore"
          f"   goal <= 0.1: {'met' if ratio <= 0.1 else 'MISSED'}")
    two = median("two_backups")
    print(f"  two backups on disk {two:5.2f}x the tree   goal <= 1.1: {'met' if two <= 1.1 else 'MISSED'}")


if __name__ == "__main__":
    main()
