#!/usr/bin/env python3
"""rollback.py: one restore point across configuration, code and database, rolled back in the runbook's order."""

from __future__ import annotations

import argparse
import sys

from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command
from common.cli import Context, Result, add_backup_arguments, add_command, make_parser
from common.components import POINTS
from restore_points.backup import backup_command
from restore_points.checks import drill_command, verify_command
from restore_points.restore_command import restore_command
from restore_points.store_commands import cleanup_command, list_command, pin_command, unpin_command

SCRIPT = "rollback.py"


def cmd_backup(ctx: Context) -> Result:
    """backup: a configuration, a code and a database backup under one restore point id and label."""
    return backup_command(ctx)


def cmd_list(ctx: Context) -> Result:
    """list: the restore points, newest first, with their three backups (a part whose backup is gone is marked)."""
    return list_command(ctx)


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup: remove the restore points no rule keeps, then the backups only they held."""
    return cleanup_command(ctx)


def cmd_pin(ctx: Context) -> Result:
    """pin POINT: the point and its three backups stay through every cleanup."""
    return pin_command(ctx)


def cmd_unpin(ctx: Context) -> Result:
    """unpin POINT: the point and the backups it pinned follow the retention rules again."""
    return unpin_command(ctx)


def cmd_restore(ctx: Context) -> Result:
    """restore POINT: configuration, then code, then database, each verified, stopping at the first failure."""
    return restore_command(ctx)


def cmd_verify(ctx: Context) -> Result:
    """verify: the three verifies and the health check, one report, one exit code."""
    return verify_command(ctx)


def cmd_drill(ctx: Context) -> Result:
    """drill: the monthly test: restore the newest database backup aside, check the rest, time each against its RTO."""
    return drill_command(ctx)


# -- the command line ---------------------------------------------------------------------------------------


def add_health_arguments(sub: argparse.ArgumentParser) -> None:
    """The health check's URL and thresholds (defaults: HEALTH_* settings, else the runbook's)."""
    group = sub.add_argument_group("health check (defaults from HEALTHCHECK_URL and HEALTH_* settings)")
    group.add_argument("--health-url", metavar="URL",
                       help="send requests here and check errors and p95 time (http://user:password@... sends "
                            "basic authentication; the password is masked in the audit log)")
    group.add_argument("--max-error-rate", type=float, metavar="PCT", help="failed requests, percent (1)")
    group.add_argument("--max-p95-ms", type=float, metavar="MS", help="95th percentile response time (500)")
    group.add_argument("--max-cpu", type=float, metavar="PCT", help="CPU use, percent (80)")
    group.add_argument("--max-memory", type=float, metavar="PCT", help="memory use, percent (80)")
    group.add_argument("--health-requests", type=int, metavar="N", help="requests to send (20)")
    group.add_argument("--no-system-check", action="store_true",
                       help="leave out this host's CPU and memory (e.g. when it is not the application's host)")


def build_parser() -> argparse.ArgumentParser:
    """Every command of rollback.py."""
    parser, commands = make_parser(
        SCRIPT,
        "One restore point for configuration, code and database; rolled back in the runbook's order\n"
        "(configuration -> code -> database), each step verified.",
        "settings: those of the three scripts (a component is part of a point when CONFIG_DIR,\n"
        "  DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set), and POINTS_DIR=./restore_points,\n"
        "  PRE_RESTORE_HOOK, POST_RESTORE_HOOK (commands run without a shell, e.g. stop/start the app;\n"
        "  done when their process exits; stopped with all they started after HOOK_TIMEOUT_SECONDS=300),\n"
        "  LOCK_WAIT_SECONDS=30 (how long backup, restore and drill wait for the store locks they need),\n"
        "  HEALTHCHECK_URL and HEALTH_* thresholds, RTO_CONFIG_SECONDS=300, RTO_CODE_SECONDS=900,\n"
        "  RTO_DATABASE_SECONDS=1800\n\n"
        "examples:\n"
        f"  {SCRIPT} backup --label release-1.4\n"
        f"  {SCRIPT} restore latest --yes --health-url http://127.0.0.1:8080/health\n"
        f"  {SCRIPT} restore latest --only config,code --yes\n"
        f"  {SCRIPT} drill",
    )
    sub = add_command(commands, "backup", cmd_backup, "take a restore point of every configured component")
    add_backup_arguments(sub)
    sub = add_command(commands, "restore", cmd_restore, "restore a point: configuration, then code, then database",
                      "Changes nothing until it has checked the health URL, the thresholds and that each hook is\n"
                      "an executable file (else exit 2); taken every lock its steps need, the restore points' and\n"
                      "each component store's (waiting up to LOCK_WAIT_SECONDS, else exit 75), held to the last\n"
                      "step; and checked that every part is here (pulled if only off-host) and whole (checksums).\n"
                      "Runs PRE_RESTORE_HOOK, restores each component with its script (which saves what it\n"
                      "replaces first), verifies it, checks health, and stops at the first failure with the\n"
                      "commands that undo the steps already taken; then POST_RESTORE_HOOK and a last health\n"
                      "check. Each step's time is reported against its RTO. The database goes back with its down\n"
                      "migrations to the version the point recorded, keeping every row written since, when each\n"
                      "down file exists; otherwise, or with --restore-data, its dump is restored, and the plan\n"
                      "first counts, per table, the rows written since the point that this throws away.")
    sub.add_argument("point", metavar="POINT", help="a restore point id or `latest`")
    sub.add_argument("--only", metavar="LIST", help="a comma-separated subset of config,code,db")
    sub.add_argument("--restore-data", action="store_true",
                     help="restore the database's dump, losing every row written since the point, instead of "
                          "rolling the schema back with the down migrations")
    add_health_arguments(sub)
    sub = add_verify_command(commands, cmd_verify, "the three verifies and the health check, one exit code",
                             "Runs each configured component's verify and the health check: one report, exit 3\n"
                             "on any problem. --remote checks the restore points' copies on REMOTE_URL.")
    add_health_arguments(sub)
    add_command(commands, "drill", cmd_drill, "the monthly test of the procedures, timed against the RTOs",
                "Takes the database store's lock (waiting up to LOCK_WAIT_SECONDS, else exit 75), restores\n"
                "the newest database backup into a scratch database and verifies it, checks the\n"
                "newest configuration and code backups' checksums, drops the scratch database, and fails\n"
                "(exit 3) when a step misses its RTO.")
    add_store_commands(commands, cmd_cleanup, cmd_list, cmd_pin, cmd_unpin, "restore point")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run rollback.py."""
    return run(build_parser(), POINTS, argv)


if __name__ == "__main__":
    sys.exit(main())
