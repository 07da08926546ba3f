"""Commands that work the same on every component's store: list and cleanup, and the helpers they print with."""

from __future__ import annotations

from collections.abc import Callable, Collection

from backup_store.manifest import Backup, check_backup, format_time
from backup_store.store import BackupStore
from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from common.text import printable


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
    lines = [f"removed {b.id}" for b in remove] + [f"removed unfinished {name}" for name in leftovers]
    lines.append(f"{len(remove)} backups removed, {len(keep)} kept")
    return Result({"removed": [b.id for b in remove], "kept": [b.id for b in keep], "leftovers_removed": leftovers},
                  lines)


def resolve_component(store: BackupStore, ref: str, match: Callable[[Backup], bool] | None = None) -> Backup:
    """store.resolve, refusing another component's backup."""
    backup = store.resolve(ref, match)
    if backup.component != store.component:
        raise UsageError(f"{ref} is a {backup.component} backup, not a {store.component} backup")
    return backup


def refuse_damaged(backup: Backup) -> None:
    """Stop before anything changes if the backup's payload does not match its manifest."""
    problems = check_backup(backup)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ToolkitError(f"backup {backup.id} is damaged: {problems[0]}{more}; refused, nothing changed")


def count(number: int, noun: str) -> str:
    """`1 problem`, `3 problems`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def human_size(size: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart; a cell's control characters (a label's newline, a terminal
    escape) are shown escaped, so each row is one line and prints as what it holds."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]
