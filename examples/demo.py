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


def newest_backup(script: str, env: dict[str, str], cwd: Path, oldest: bool = False) -> str:
    """The id of the newest (or oldest) backup, from `list --json`, without printing it."""
    listing = subprocess.run([sys.executable, str(ROOT / script), "--json", "list"], env={**os.environ, **env},
                             cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(listing.stdout)["backups"][-1 if oldest else 0]["id"]


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
    step("A rotated secret goes in from a private file (or standard input), never on the command line")
    rotated = work / "rotated.json"
    rotated.write_text('{"DB_PASSWORD": "rotated secret", "FEATURE_FLAGS": null}')
    os.chmod(rotated, 0o600)
    cr("update", ".env", "--patch-file", rotated.name)
    step("Something goes wrong: a file is broken and another deleted")
    (work / "config" / "app.yml").write_text("server: [unclosed\n")
    (work / "config" / "services" / "cache.json").unlink()
    cr("verify", "--against", "latest", expect=3)
    step("Roll back the configuration to the backup taken before the deployment")
    first = newest_backup("config_rollback.py", env, work, oldest=True)
    cr("restore", first, "--yes")
    cr("verify", "--against", first)
    step("Retention: what cleanup would remove (the newest 2 taken with backup stay; safety backups are not counted)")
    cr("cleanup", "0", "--keep", "2", "--dry-run")


def git(repo: Path, *args: str) -> str:
    """git in the sample repository, with a fixed author so the demo runs on a machine without git config."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@example.test",
           "GIT_COMMITTER_NAME": "demo", "GIT_COMMITTER_EMAIL": "demo@example.test"}
    return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True,
                          text=True).stdout


def code_part(work: Path) -> None:
    repo = work / "app-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for version, body in (("v1.0", "print('orders v1.0')\n"), ("v1.1", "print('orders v1.1')\n"),
                          ("v1.2", "print('orders v1.2: reads the dropped column')\n")):
        (repo / "app.py").write_text(body)
        (repo / "VERSION").write_text(version + "\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"release {version}")
        git(repo, "tag", version)
    # A Capistrano-style deployment: current -> releases/v1.2, the code exported from the tag.
    release = work / "releases" / "v1.2"
    release.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "v1.2"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(release)], input=archive, check=True)
    os.symlink("releases/v1.2", work / "current")
    env = {"REPO_PATH": str(repo), "DEPLOYMENT_DIR": str(work / "current"),
           "CODE_BACKUP_DIR": str(work / "code_backups")}

    def cc(*args: str, expect: int = 0) -> str:
        return run("code_rollback.py", *args, env=env, cwd=work, expect=expect)

    step("Code: release v1.2 is deployed (current -> releases/v1.2); take a backup")
    cc("backup", "--label", "v1.2 as deployed")
    deployed = newest_backup("code_rollback.py", env, work)
    step("v1.2 misbehaves: roll the code back to the tag v1.1 (git archive, built aside, symlink switched)")
    cc("rollback", "v1.1", "--yes")
    print((work / "current" / "VERSION").read_text(), end="")
    cc("verify", "--compile")
    step("A hand edit on the server is drift: verify names it")
    (work / "current" / "app.py").write_text("print('hot fix')\n")
    cc("verify", expect=3)
    step("Restore the backup of v1.2 as deployed, byte for byte")
    cc("restore", deployed, "--yes")
    print((work / "current" / "VERSION").read_text(), end="")
    cc("verify")
    cc("list")


def database_part(work: Path, cluster) -> None:
    cluster.create_database("ariesone")
    shutil.copytree(ROOT / "examples" / "migrations", work / "migrations")
    env = {**cluster.env("ariesone"), "BACKUP_DIR": str(work / "backups"), "MIGRATIONS_DIR": str(work / "migrations")}

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


def restore_point_part(work: Path, cluster) -> None:
    """All three at once: one restore point, a release that breaks all three, the runbook's rollback."""
    env = {"CONFIG_DIR": str(work / "config"), "CONFIG_BACKUP_DIR": str(work / "config_backups"),
           "ENV_FILE": str(work / ".env"), "REPO_PATH": str(work / "app-repo"),
           "DEPLOYMENT_DIR": str(work / "current"), "CODE_BACKUP_DIR": str(work / "code_backups"),
           **cluster.env("ariesone"), "BACKUP_DIR": str(work / "backups"),
           "MIGRATIONS_DIR": str(work / "migrations"), "POINTS_DIR": str(work / "restore_points"),
           "POST_RESTORE_HOOK": f"touch {work / 'app-restarted'}", "METRICS_FILE": str(work / "rollback.prom"),
           # The demo machine's own CPU and memory are not what this shows.
           "HEALTH_MAX_CPU": "100", "HEALTH_MAX_MEMORY": "100"}

    def rb(*args: str, expect: int = 0) -> str:
        return run("rollback.py", *args, env=env, cwd=work, expect=expect)

    step("All three at once: a restore point before release 2.0")
    rb("backup", "--label", "before release 2.0")
    rb("list")
    step("Release 2.0 breaks all three: a config key, the code, and a migration")
    (work / "config" / "app.yml").write_text("server: [this is not yaml\n")
    (work / "current" / "app.py").write_text("raise SystemExit('release 2.0')\n")
    run("database_rollback.py", "migrate", env=env, cwd=work)
    rb("verify", expect=3)
    step("Roll back in the runbook's order: configuration, code, database; each verified, each against its RTO")
    rb("restore", "latest", "--yes")
    print(f"POST_RESTORE_HOOK ran: {(work / 'app-restarted').exists()}")
    rb("verify")
    step("The monthly drill: the newest database backup restored into a scratch database, timed against its RTO")
    rb("drill")
    step("What node_exporter's textfile collector reads")
    print("\n".join(line for line in (work / "rollback.prom").read_text().splitlines()
                    if line.startswith("rollback_last_run_ok") or line.startswith("rollback_rto_seconds")))


def main() -> None:
    from pg_cluster import ThrowawayCluster

    work = Path(tempfile.mkdtemp(prefix="rollback-demo-"))
    cluster = ThrowawayCluster()
    try:
        config_part(work)
        code_part(work)
        print("\nstarting a throwaway PostgreSQL cluster ...", flush=True)
        cluster.start()
        database_part(work, cluster)
        restore_point_part(work, cluster)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\nDemo finished: configuration, code and database are back to their state before the deployment.")


if __name__ == "__main__":
    main()
