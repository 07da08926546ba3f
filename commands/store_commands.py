"""The commands every script has on its store: list and cleanup, push and pull, and the --remote forms."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from backup_store.manifest import Backup, format_time
from backup_store.store import BackupStore
from commands.retention_commands import cleanup_remote_command, pin_command, pinned_label, unpin_command
from common.cli import Context, Result, add_cleanup_arguments, add_command
from common.errors import UsageError
from common.text import human_size, printable, table
from offsite.commands import list_remote, pull_command, push_command, verify_remote

Handler = Callable[[Context], Result]
CLEANUP_HELP = (
    "Keeps every backup taken with `backup` that a rule keeps: younger than DAYS, the newest --keep N\n"
    "(default 3 beside DAYS), or the newest of each of the last --keep-daily/-weekly/-monthly/-yearly\n"
    "days, weeks, months or years that have one (UTC). Without DAYS, --keep and --keep-*, RETENTION\n"
    "decides (e.g. last=5,daily=7,weekly=4,monthly=12). Safety backups (what a restore replaced) are\n"
    "their own class: kept SAFETY_KEEP_DAYS (default 7, or DAYS when longer), and always those since the\n"
    "newest backup; never counted in the rules. Whatever the rules say, the newest backup, pinned\n"
    "backups and every backup a restore point names stay; so does what the live code was restored from.\n"
    "--dry-run lists what would go and why each kept backup stays.")


def add_store_commands(commands: argparse._SubParsersAction, cleanup: Handler, listing: Handler,
                       pin: Handler = pin_command, unpin: Handler = unpin_command, item: str = "backup") -> None:
    """`cleanup [DAYS] [--keep N] [--keep-*] [--remote]`, `list [--remote]`, `pin`, `unpin`, `push` and `pull`,
    which every script has."""
    sub = add_command(commands, "cleanup", _local_or_remote(cleanup, cleanup_remote_command),
                      f"remove the {item}s no retention rule keeps (--remote: on the remote)", CLEANUP_HELP + (
                          "" if item == "backup" else "\nThe points go first, then, in each component's store, the "
                          "backups only they held,\nby the same rules (a pin or another point still keeps one)."))
    add_cleanup_arguments(sub)
    sub.add_argument("--remote", action="store_true",
                     help="apply the same rules to the copies on REMOTE_URL (while a remote manifest cannot be "
                          "read, it is kept and no object is removed)")
    sub = add_command(commands, "pin", pin, f"keep a {item} whatever the retention says, until `unpin`",
                      f"A pinned {item} is never removed by any cleanup, local or remote; `list` shows the pin\n"
                      "and its reason. Pinning again replaces the reason."
                      + ("\nPinning a restore point pins its three backups too." if item != "backup" else ""))
    sub.add_argument("backup", metavar=item.split()[-1].upper(), help=f"a {item} id or `latest`")
    sub.add_argument("--reason", metavar="TEXT", help="why it is kept (shown by list)")
    sub = add_command(commands, "unpin", unpin, f"let the retention rules apply to a pinned {item} again")
    sub.add_argument("backup", metavar=item.split()[-1].upper(), help=f"a pinned {item}'s id")
    sub = add_command(commands, "list", _local_or_remote(listing, list_remote),
                      "list the backups, newest first (--remote: those on REMOTE_URL)")
    sub.add_argument("--remote", action="store_true",
                     help="the backups on REMOTE_URL instead (a manifest that cannot be read is named in a warning)")
    sub = add_command(commands, "push", push_command, "copy backups to REMOTE_URL (only what is new)",
                      "Uploads each payload file the remote does not have yet, then the manifest, last: a push\n"
                      "cut off at any moment leaves nothing `list --remote` shows, and the next one resumes.\n"
                      "A backup already there has its objects checked: what is missing, cut short or known\n"
                      "to be damaged (found by `verify --remote --deep` or a pull) is sent again.\n"
                      "An id the remote holds for other content (another host's backup) is refused (exit 1),\n"
                      "and the remote copy is left as it is.")
    sub.add_argument("backup", metavar="BACKUP", nargs="?", help="a backup id or `latest` (the default)")
    sub.add_argument("--all", action="store_true", help="every backup of the store")
    sub.add_argument("--repair", action="store_true",
                     help="also read back and hash every object the backups rely on, and send again what is "
                          "damaged (a damaged remote manifest of the backup too)")
    sub = add_command(commands, "pull", pull_command, "bring a backup from REMOTE_URL into the store",
                      "Every byte's sha256 is checked while downloading; a missing or changed object refuses\n"
                      "the pull and leaves the local store as it was. `restore ID` pulls by itself.")
    sub.add_argument("backup", metavar="BACKUP", help="the id of a backup on the remote")


def add_verify_command(commands: argparse._SubParsersAction, handler: Handler, summary: str,
                       description: str) -> argparse.ArgumentParser:
    """A script's `verify`, with `--remote [--deep]` checking the copies on REMOTE_URL instead."""
    sub = add_command(commands, "verify", _local_or_remote(handler, verify_remote), summary, description)
    sub.add_argument("--remote", action="store_true",
                     help="check that every remote manifest reads and every object it names exists with its size")
    sub.add_argument("--deep", action="store_true", help="with --remote: download each object and check its sha256")
    sub.add_argument("--repair", action="store_true",
                     help="with --remote: send each missing or damaged object (or manifest) again from the "
                          "local store")
    return sub


def _local_or_remote(local: Handler, remote: Handler) -> Handler:
    def handler(ctx: Context) -> Result:
        if getattr(ctx.args, "remote", False):
            return remote(ctx)
        for flag in ("deep", "repair"):
            if getattr(ctx.args, flag, False):
                raise UsageError(f"--{flag} goes with --remote")
        return local(ctx)

    return handler


def list_backups(store: BackupStore, extra: dict[str, Callable[[Backup], str]] | None = None) -> Result:
    """list: id, time, files, size, any component-specific columns, label; newest first."""
    backups, unreadable = store.scan()
    pinned = pinned_label(store)
    extra = extra or {}
    header = ("ID", "TIME (UTC)", "FILES", "SIZE", *extra, "LABEL")
    rows = [(b.id, format_time(b.created_at), str(len(b.files)), human_size(b.size),
             *(column(b) for column in extra.values()), " ".join(text for text in (
                 "(safety)" if b.is_safety else "", f"({pinned[b.id]})" if b.id in pinned else "", b.label or "")
                 if text))
            for b in backups]
    lines = table(header, rows) if rows else [f"no backups in {store.root}"]
    lines += [printable(f"cannot read backup {name}: {why}") for name, why in unreadable]
    return Result({"backups": [{**b.summary(), "pinned": pinned.get(b.id)} for b in backups],
                   "unreadable": [{"id": name, "problem": why} for name, why in unreadable]}, lines, report=True)
