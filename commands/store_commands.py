"""The commands every script has on its store: list and cleanup, push and pull, and the --remote forms."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection

from backup_store.manifest import Backup, format_time
from backup_store.store import BackupStore
from common.cli import Context, Result, add_cleanup_arguments, add_command
from common.errors import UsageError
from common.text import human_size, printable, table
from offsite.commands import cleanup_remote, list_remote, pull_command, push_command, verify_remote

Handler = Callable[[Context], Result]


def add_store_commands(commands: argparse._SubParsersAction, cleanup: Handler, listing: Handler) -> None:
    """`cleanup DAYS [--keep N] [--remote]`, `list [--remote]`, `push` and `pull`, which every script has."""
    sub = add_command(commands, "cleanup", _local_or_remote(cleanup, cleanup_remote),
                      "remove old backups, keeping the newest N (--remote: on the remote)")
    add_cleanup_arguments(sub)
    sub.add_argument("--remote", action="store_true",
                     help="apply the same rules to the copies on REMOTE_URL (while a remote manifest cannot be "
                          "read, it is kept and no object is removed)")
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
    extra = extra or {}
    header = ("ID", "TIME (UTC)", "FILES", "SIZE", *extra, "LABEL")
    rows = [(b.id, format_time(b.created_at), str(len(b.files)), human_size(b.size),
             *(column(b) for column in extra.values()), ("(safety) " if b.is_safety else "") + (b.label or ""))
            for b in backups]
    lines = table(header, rows) if rows else [f"no backups in {store.root}"]
    lines += [printable(f"cannot read backup {name}: {why}") for name, why in unreadable]
    return Result({"backups": [b.summary() for b in backups],
                   "unreadable": [{"id": name, "problem": why} for name, why in unreadable]}, lines, report=True)


def cleanup_backups(ctx: Context, store: BackupStore, script: str, protected: Collection[str] = ()) -> Result:
    """cleanup DAYS --keep N: remove old backups and unfinished leftovers; --dry-run only lists them."""
    remove, keep = store.retention_plan(ctx.args.days, ctx.args.keep, protected)
    if ctx.dry_run:
        leftovers = store.leftovers()
        lines = [f"would remove {b.id} ({format_time(b.created_at)})" for b in remove]
        lines += [f"would remove unfinished {name}" for name in leftovers]
        return Result({"dry_run": True, "would_remove": [b.id for b in remove], "kept": [b.id for b in keep],
                       "would_remove_leftovers": leftovers}, lines or ["no backups to remove"], report=True)
    with store.lock(f"{script} cleanup"):
        remove, keep = store.retention_plan(ctx.args.days, ctx.args.keep, protected)
        for backup in remove:
            store.remove(backup)
        leftovers = store.remove_leftovers()
        objects = store.sweep_objects()  # the shared content only the removed backups had
    lines = [f"removed {b.id}" for b in remove] + [f"removed unfinished {name}" for name in leftovers]
    if objects:
        lines.append(f"removed {objects} stored files no remaining backup names")
    elif objects is None:
        lines.append("kept every stored file: a backup's manifest cannot be read (`list` names it)")
    lines.append(f"{len(remove)} backups removed, {len(keep)} kept")
    return Result({"removed": [b.id for b in remove], "kept": [b.id for b in keep], "leftovers_removed": leftovers,
                   "objects_removed": objects}, lines)
