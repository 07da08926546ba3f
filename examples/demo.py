#!/usr/bin/env python3
"""`make demo`: the toolkit doing its job on sample files and a throwaway PostgreSQL cluster.

Everything happens in a temporary folder that is removed at the end; each command is printed before it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{PLAIN}", flush=True)


def run(script: str, *args: str, env: dict[str, str], cwd: Path, expect: int = 0) -> str:
    """Show and run one command; stop the demo if its exit code is not the expected one."""
    print(f"$ {script} {' '.join(_shell_quote(a) for a in args)}", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / script), *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True)
    sys.stdout.write(done.stderr)  # progress and warnings came first as the command ran
    sys.stdout.write(done.stdout)
    if expect:
        print(f"(exit code {done.returncode})")
    if done.returncode != expect:
        sys.exit(f"demo stopped: expected exit code {expect}, got {done.returncode}")
    return done.stdout


def _shell_quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./:=@" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def config_part(work: Path) -> None:
    shutil.copytree(ROOT / "examples" / "config", work / "config")
    shutil.copy(ROOT / "examples" / "env.sample", work / ".env")
    shutil.copy(ROOT / "examples" / "env.example", work / ".env.example")
    os.chmod(work / ".env", 0o600)
    env = {"CONFIG_DIR": str(work / "config"), "CONFIG_BACKUP_DIR": str(work / "config_backups"),
           "ENV_FILE": str(work / ".env")}

    def cr(*args: str, expect: int = 0) -> str:
        return run("config_rollback.py", *args, env=env, cwd=work, expect=expect)

    step("Configuration, before the deployment: take a backup")
    cr("backup", "--label", "before release 1.4")
    step("The deployment changes the port (comments and layout kept; only those lines change)")
    cr("update", "app.yml", '{"server": {"port": 9090}, "logging": {"level": "debug"}}')
    cr("update", ".env", '{"DB_PASSWORD": "rotated secret", "FEATURE_FLAGS": null}')
    step("Something goes wrong: a file is broken and another deleted")
    (work / "config" / "app.yml").write_text("server: [unclosed\n")
    (work / "config" / "services" / "cache.json").unlink()
    cr("verify", "--against", "latest", expect=3)
    step("Roll back the configuration to the backup taken before the deployment")
    listing = subprocess.run([sys.executable, str(ROOT / "config_rollback.py"), "--json", "list"],
                             env={**os.environ, **env}, cwd=work, capture_output=True, text=True, check=True)
    first = json.loads(listing.stdout)["backups"][-1]["id"]
    cr("restore", first, "--yes")
    cr("verify", "--against", first)
    step("Retention: what cleanup would remove (keeping the newest 2)")
    cr("cleanup", "0", "--keep", "2", "--dry-run")


def database_part(work: Path) -> None:
    from pg_cluster import ThrowawayCluster

    cluster = ThrowawayCluster()
    print("\nstarting a throwaway PostgreSQL cluster ...", flush=True)
    cluster.start()
    try:
        cluster.create_database("ariesone")
        shutil.copytree(ROOT / "examples" / "migrations", work / "migrations")
        env = {**cluster.env("ariesone"), "BACKUP_DIR": str(work / "backups"),
               "MIGRATIONS_DIR": str(work / "migrations")}

        def dr(*args: str, expect: int = 0) -> str:
            return run("database_rollback.py", *args, env=env, cwd=work, expect=expect)

        step("Database: the schema as it is in production (migrations 001-004)")
        dr("migrate", "004")
        dr("status")
        step("Before the deployment: take a backup")
        release_backup = json.loads(dr("--json", "backup", "--label", "before release 005"))["backup"]["id"]
        step("The release's migration 005 drops a column the application still reads")
        dr("migrate")
        step("Roll back to 004_orders_by_customer_index: the down scripts run in one transaction")
        dr("rollback", "004_orders_by_customer_index", "--dry-run")
        dr("rollback", "004_orders_by_customer_index", "--yes")
        dr("status")
        step("Or restore the backup taken before the release: restored aside, then switched in")
        dr("restore", release_backup, "--yes")
        step("Verify: migrations match their files, the newest backup's checksums and table of contents hold")
        dr("verify")
        dr("list")
    finally:
        cluster.stop()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="rollback-demo-"))
    try:
        config_part(work)
        database_part(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nDemo finished: configuration and database are back to their state before the deployment.")


if __name__ == "__main__":
    main()
