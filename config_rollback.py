#!/usr/bin/env python3
"""config_rollback.py: back up, restore, patch and verify an application's configuration folder and .env."""

from __future__ import annotations

import sys

from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command
from common.cli import (
    Context,
    Result,
    add_backup_argument,
    add_backup_arguments,
    add_command,
    add_no_backup_argument,
    make_parser,
)
from common.components import CONFIG
from configuration.backups import back_up, cleanup_config_backups, list_config_backups
from configuration.restore import restore
from configuration.update import update_file
from configuration.verify import verify_config

# -- the commands: each calls one function of the configuration package ----------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: snapshot CONFIG_DIR and ENV_FILE."""
    return back_up(ctx, ctx.args.label)


def cmd_restore(ctx: Context) -> Result:
    """restore BACKUP: checksums first, a backup of the current state, then the backup's exact tree."""
    return restore(ctx, ctx.args.backup, no_backup=ctx.args.no_backup)


def cmd_update(ctx: Context) -> Result:
    """update FILE JSON|-|--patch-file F: merge-patch one YAML, JSON or .env file, keeping every untouched line."""
    args = ctx.args
    return update_file(ctx, args.file, args.patch, args.patch_file, no_backup=args.no_backup)


def cmd_verify(ctx: Context) -> Result:
    """verify: files parse, ENV_FILE is private and complete, the newest backup is sound; report drift."""
    return verify_config(ctx, ctx.args.against)


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: remove backups older than DAYS, always keeping the newest --keep."""
    return cleanup_config_backups(ctx)


def cmd_list(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_config_backups(ctx)


# -- the command line -------------------------------------------------------------------------------


def build_parser():
    """Every command of config_rollback.py."""
    parser, commands = make_parser(
        "config_rollback.py",
        "Back up, restore, patch and verify the configuration folder (CONFIG_DIR) and the .env file (ENV_FILE).",
        "settings (environment, then .env, then defaults):\n"
        "  CONFIG_DIR=./config  CONFIG_BACKUP_DIR=./config_backups  ENV_FILE=.env  AUDIT_LOG=<store>/audit.log\n\n"
        "examples:\n"
        "  config_rollback.py backup --label before-deploy\n"
        "  config_rollback.py update app.yml '{\"server\": {\"port\": 8081}}'\n"
        "  config_rollback.py update .env - < rotated-secrets.json\n"
        "  config_rollback.py restore latest --yes\n"
        "  config_rollback.py verify --against latest\n"
        "  config_rollback.py cleanup 30 --keep 5",
    )
    sub = add_command(commands, "backup", cmd_backup, "snapshot CONFIG_DIR and ENV_FILE")
    add_backup_arguments(sub)

    sub = add_command(commands, "restore", cmd_restore, "make CONFIG_DIR and ENV_FILE exactly a backup",
                      "Checks the backup's checksums, saves the current state as a new backup, then makes\n"
                      "CONFIG_DIR and ENV_FILE exactly the backup (bytes and modes; files it lacks are\n"
                      "removed), replacing each file atomically once every file is written: a file that\n"
                      "cannot be written (a full disk) is named, and nothing is changed (exit 1).")
    add_backup_argument(sub)
    add_no_backup_argument(sub)

    sub = add_command(commands, "update", cmd_update, "merge-patch one YAML, JSON or .env file",
                      "Applies JSON as an RFC 7386 merge patch (objects merge, null deletes a key, anything\n"
                      "else replaces) and shows the diff. Lines the patch does not touch stay byte for byte.\n"
                      "Values of keys naming a secret are masked in the diff: a word of the key is pass, pwd,\n"
                      "pw, key(s), pin, private or apikey, or holds password, secret, token or credential\n"
                      "(DB_PASS, SESSION_KEY, apiToken; not KEYBOARD_LAYOUT).\n\n"
                      "A patch holding a secret goes in as - (read from standard input) or --patch-file,\n"
                      "never on the command line, where every user of the machine can see it; the audit log\n"
                      "never records the patch's content.\n\n"
                      "YAML is written so that YAML 1.1 and 1.2 readers read what the JSON meant: strings\n"
                      "they could take for booleans, numbers or null (yes, off, 12:30...) are quoted, floats\n"
                      "keep a dot (1.0e+300). Refused (exit 2): a file or patch nested deeper than 100\n"
                      "levels, YAML aliases adding more than 100,000 values, NaN, Infinity, numbers JSON\n"
                      "cannot hold.",
                      secret_args=("patch",))
    sub.add_argument("file", metavar="FILE", help="a file relative to CONFIG_DIR, or the ENV_FILE (not a folder: "
                                                  "no final /)")
    sub.add_argument("patch", metavar="JSON", nargs="?",
                     help="the merge patch, a JSON object; - reads it from standard input")
    sub.add_argument("--patch-file", metavar="PATH", help="read the merge patch from this file instead")
    add_no_backup_argument(sub)

    sub = add_verify_command(commands, cmd_verify, "check that the configuration parses and matches a backup",
                      "Every YAML/JSON/.env/TOML/INI file must parse within the bounds of update (see its\n"
                      "--help); ENV_FILE must not be readable by group or others and must have the keys of a\n"
                      ".env.example beside it; the newest backup's checksums must hold. Drift from the newest\n"
                      "backup is reported; with --against any drift from that backup is a problem. Problems\n"
                      "exit 3.")
    sub.add_argument("--against", metavar="BACKUP", help="fail (exit 3) on any drift from this backup")

    add_store_commands(commands, cmd_cleanup, cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run config_rollback.py."""
    return run(build_parser(), CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())

