"""The store of restore points' own list and cleanup (push, pull and the --remote forms are every script's)."""

from __future__ import annotations

from backup_store.manifest import MANIFEST, Backup, format_time
from commands.store_commands import cleanup_backups
from common.cli import Context, Result
from common.components import PARTS, POINTS
from common.text import table
from offsite.pull import open_store
from restore_points.command_setup import points_store
from restore_points.record import PointRecord, describe


def list_command(ctx: Context) -> Result:
    """list: the restore points, newest first, with their three backups (a part whose backup is gone is marked)."""
    points = points_store(ctx.settings).backups()
    roots = {c.name: open_store(ctx.settings, c).root for c in PARTS}

    def part(point: Backup, name: str) -> str:
        backup_id = PointRecord.load(point).parts.get(name)
        if backup_id is None:
            return "-"
        return backup_id if (roots[name] / backup_id / MANIFEST).is_file() else f"{backup_id} (gone)"

    rows = [(p.id, format_time(p.created_at), *(part(p, c.name) for c in PARTS), p.label or "") for p in points]
    lines = table(("POINT", "TIME (UTC)", "CONFIG", "CODE", "DATABASE", "LABEL"), rows) if rows else [
        f"no restore points in {points_store(ctx.settings).root}"]
    described = [{**describe(p), "gone": [c.name for c in PARTS if part(p, c.name).endswith("(gone)")]}
                 for p in points]
    return Result({"points": described}, lines, report=True)


def cleanup_command(ctx: Context) -> Result:
    """cleanup DAYS: remove restore points (not their backups) older than DAYS, keeping the newest --keep."""
    return cleanup_backups(ctx, points_store(ctx.settings), POINTS.script)
