#!/usr/bin/env python3
"""code_rollback.py: back up, restore and verify the deployed application code."""

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
from common.components import CODE
from deployed_code.backups import back_up, list_code_backups
from deployed_code.cleanup import clean_up
from deployed_code.history import show_history
from deployed_code.paths import SCRIPT
from deployed_code.restore import restore
from deployed_code.rollback import roll_back
from deployed_code.verify import verify

# -- the commands: each is done by the deployed_code package ----------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: snapshot the deployed tree."""
    return back_up(ctx)


def cmd_restore(ctx: Context) -> Result:
    """restore BACKUP: the tree built aside (every checksum checked) while the live one is saved, then switched in."""
    return restore(ctx)


def cmd_rollback(ctx: Context) -> Result:
    """rollback COMMIT: the commit's tree switched in (release folder) or checked out (in-place)."""
    return roll_back(ctx)


def cmd_verify(ctx: Context) -> Result:
    """verify [--compile]: the deployed tree against the last deploy's manifest; drift exits 3."""
    return verify(ctx)


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: backups, replaced trees and half-built trees of stopped runs."""
    return clean_up(ctx)


def cmd_list(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_code_backups(ctx)


def cmd_history(ctx: Context) -> Result:
    """history [--limit N]: the deploys and backups, newest first, with who ran each and when."""
    return show_history(ctx)


# -- the command line -------------------------------------------------------------------------------


def add_verify_all_argument(sub) -> None:
    """--verify-all: a kept release is hashed whole before it is switched back in."""
    sub.add_argument("--verify-all", action="store_true",
                     help="hash every file of a kept release before switching to it (default: those whose stat moved)")


def build_parser():
    """Every command of code_rollback.py."""
    parser, commands = make_parser(
        SCRIPT,
        "Back up, restore and verify the deployed code (DEPLOYMENT_DIR, or the git working copy REPO_PATH).",
        "settings (environment, then .env, then defaults):\n"
        "  REPO_PATH (a git repository)  DEPLOYMENT_DIR (the release folder, or a `current` symlink)\n"
        "  CODE_BACKUP_DIR=./code_backups  CODE_EXCLUDE (extra patterns; .git and __pycache__ always)\n"
        "  KEEP_RELEASES=5 (release folders kept beside `current`)  LINKED_PATHS (e.g. `.env storage/`: kept\n"
        "  in shared/, linked into every release)  BUILD_HOOK (run in a new release before its switch)\n"
        "  RESTART_HOOK (run after a switch)  HOOK_TIMEOUT_SECONDS=300\n"
        "A DEPLOYMENT_DIR that does not exist yet, or is empty, is created by restore and rollback (named\n"
        "`current`, or a symlink to nothing: as a symlink into a releases folder), with no safety backup.\n"
        "cleanup also removes the half-built .NAME.tmp-* trees of stopped restores and rollbacks.\n\n"
        "examples:\n"
        f"  {SCRIPT} backup --label release-1.4\n"
        f"  {SCRIPT} restore latest --yes\n"
        f"  {SCRIPT} verify --compile\n"
        f"  {SCRIPT} history --limit 10\n"
        f"  {SCRIPT} cleanup 30 --keep 5",
    )
    sub = add_command(commands, "backup", cmd_backup, "snapshot the deployed tree",
                      "Files unchanged since the previous backup are hard-linked to it (stored files are\n"
                      "read-only), so a backup of an unchanged tree costs almost no time or space; the\n"
                      "others are copied and hashed on every core.")
    add_backup_arguments(sub)

    sub = add_command(commands, "restore", cmd_restore, "make DEPLOYMENT_DIR exactly a backup",
                      "Builds the backup's tree beside DEPLOYMENT_DIR (.NAME.tmp-X, or in the releases\n"
                      "folder), checking every checksum as it copies, while it saves the current tree as a\n"
                      "backup; then switches it in: a `current` symlink is replaced atomically; a plain\n"
                      "folder is exchanged with the new tree in one rename, and the replaced folder is kept\n"
                      "beside it (.NAME.replaced-TIME-X) until cleanup. A run killed before the switch\n"
                      "leaves its .NAME.tmp-X tree: verify names it, cleanup removes it. A kept release\n"
                      "that is the backup's tree is checked against its manifest and switched in, no copy.\n"
                      "In-place checkout: the files are put back one by one, then HEAD goes back to the\n"
                      "backup's branch (if it still points at the backup's commit) or commit, the index to\n"
                      "HEAD, so git status shows only the backup's own local changes.")
    add_backup_argument(sub)
    add_no_backup_argument(sub, "the current tree")
    add_verify_all_argument(sub)

    sub = add_command(commands, "rollback", cmd_rollback, "put the code of a git commit in place",
                      "COMMIT is anything git rev-parse accepts (sha, tag, branch, HEAD~1). Release folder:\n"
                      "the commit's tree (git archive) is built beside DEPLOYMENT_DIR and switched in; paths\n"
                      "or symlinks leading out of the tree, devices and hard links are refused; a kept\n"
                      "release of the commit is checked and switched in instead (README: Releases).\n"
                      "In-place checkout: local changes stop the rollback unless --stash; the commit is\n"
                      "checked out detached. A backup is taken first; the output says how to undo (with\n"
                      "`git stash pop` after --stash).")
    sub.add_argument("commit", metavar="COMMIT", help="the commit to roll back to")
    sub.add_argument("--stash", action="store_true", help="in-place: stash local changes instead of stopping")
    add_no_backup_argument(sub, "the current tree")
    add_verify_all_argument(sub)

    sub = add_verify_command(commands, cmd_verify, "compare the deployed tree with the last restore's backup",
                      "Names every added, removed and changed file, checks the working copy's HEAD\n"
                      "against the backup's commit, and names the half-built trees and unfinished backups\n"
                      "of stopped runs. Any of these exits 3.")
    sub.add_argument("--compile", action="store_true", help="also byte-compile the Python files")

    sub = add_command(commands, "history", cmd_history, "the deploys and backups, newest first: commit, who, when",
                      "Each restore, rollback and backup with its commit's tags, author and subject (REPO_PATH),\n"
                      "who ran it and when (the audit log), the one live now (what verify compares with) and,\n"
                      "for `current -> releases/X`, whether its release folder is still kept.")
    sub.add_argument("--limit", type=int, metavar="N", help="only the newest N entries")

    add_store_commands(commands, cmd_cleanup, cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run code_rollback.py."""
    return run(build_parser(), CODE, argv)


if __name__ == "__main__":
    sys.exit(main())
