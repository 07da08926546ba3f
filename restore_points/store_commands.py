"""The store of restore points' own list and cleanup (push, pull and the --remote forms are every script's)."""

from __future__ import annotations

from backup_store.manifest import MANIFEST, Backup, format_time
from backup_store.pins import Pins
from backup_store.point_record import PointRecord, describe
from backup_store.retention import RetentionPolicy, plan_retention
from commands.retention_commands import change_pins, cleanup_backups
from common.cli import Context, Result
from common.components import BY_NAME, CODE, PARTS, POINTS, Component
from common.text import table
from deployed_code.backups import deployed_id_in
from offsite.pull import open_store
from restore_points.command_setup import points_store


def list_command(ctx: Context) -> Result:
    """list: the restore points, newest first, with their three backups (a part whose backup is gone is marked)."""
    points = points_store(ctx.settings).backups()
    roots = {c.name: open_store(ctx.settings, c).root for c in PARTS}

    def part(point: Backup, name: str) -> str:
        backup_id = PointRecord.load(point).parts.get(name)
        if backup_id is None:
            return "-"
        return backup_id if (roots[name] / backup_id / MANIFEST).is_file() else f"{backup_id} (gone)"

    pinned = Pins.load(points_store(ctx.settings).root).pins
    rows = [(p.id, format_time(p.created_at), *(part(p, c.name) for c in PARTS),
             " ".join(t for t in (f"({pinned[p.id].describe()})" if p.id in pinned else "", p.label or "") if t))
            for p in points]
    lines = table(("POINT", "TIME (UTC)", "CONFIG", "CODE", "DATABASE", "LABEL"), rows) if rows else [
        f"no restore points in {points_store(ctx.settings).root}"]
    described = [{**describe(p), "pinned": pinned[p.id].describe() if p.id in pinned else None,
                  "gone": [c.name for c in PARTS if part(p, c.name).endswith("(gone)")]}
                 for p in points]
    return Result({"points": described}, lines, report=True)


def cleanup_command(ctx: Context) -> Result:
    """cleanup: remove the restore points no retention rule keeps, then the backups only those points held
    that their own store's retention (the same rules) would not keep either."""
    store = points_store(ctx.settings)
    before = {point.id: PointRecord.load(point).parts for point in store.scan(keep_entries=False)[0]}
    result = cleanup_backups(ctx, store, POINTS.script)
    gone = set(result.data["would_remove" if ctx.dry_run else "removed"])
    remaining = [parts for point_id, parts in before.items() if point_id not in gone]
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)
    for component in PARTS:
        freed = {parts[component.name] for point_id, parts in before.items()
                 if point_id in gone and component.name in parts} - {
                 parts[component.name] for parts in remaining if component.name in parts}
        if freed:
            removed = _remove_freed(ctx, component, freed, policy, remaining)
            result.data.setdefault("would_remove_parts" if ctx.dry_run else "removed_parts", {})[
                component.name] = removed
            verb = "would remove" if ctx.dry_run else "removed"
            result.lines += [f"{verb} {component.name} backup {backup_id} (only removed points held it)"
                             for backup_id in removed]
    return result


def pin_command(ctx: Context) -> Result:
    """pin POINT [--reason TEXT]: the point and its three backups stay through every cleanup until `unpin`."""
    store = points_store(ctx.settings)
    with store.lock(f"{POINTS.script} pin"):
        point = store.resolve(ctx.args.backup, lazy=True)
        reason = ctx.args.reason or ""
        lines = [_pin_part(ctx, name, backup_id, point.id, reason) for name, backup_id in
                 PointRecord.load(point).parts.items()]
        change_pins(ctx, store, lambda pins: pins.pin(point.id, reason))
    verb = "would pin" if ctx.dry_run else "pinned"
    return Result({"id": point.id, "pinned": True, "reason": reason, "parts": PointRecord.load(point).parts,
                   "dry_run": ctx.dry_run}, [f"{verb} restore point {point.id}" + (f": {reason}" if reason else ""),
                                            *lines])


def unpin_command(ctx: Context) -> Result:
    """unpin POINT: the point, and the backups pinned only through it, follow the retention rules again."""
    store = points_store(ctx.settings)
    with store.lock(f"{POINTS.script} unpin"):
        pins = Pins.load(store.root)
        point = store.resolve(ctx.args.backup, lazy=True)
        if point.id not in pins.pins:
            return Result({"id": point.id, "pinned": False}, [f"restore point {point.id} was not pinned"])
        change_pins(ctx, store, lambda pins: pins.unpin(point.id))
        lines = [_unpin_part(ctx, name, backup_id, point.id) for name, backup_id in
                 PointRecord.load(point).parts.items()]
    verb = "would unpin" if ctx.dry_run else "unpinned"
    return Result({"id": point.id, "pinned": False, "dry_run": ctx.dry_run},
                  [f"{verb} restore point {point.id}", *lines])


def _pin_part(ctx: Context, name: str, backup_id: str, point_id: str, reason: str) -> str:
    store = open_store(ctx.settings, BY_NAME[name])
    with store.lock(f"{POINTS.script} pin"):
        change_pins(ctx, store, lambda pins: pins.pin(backup_id, reason, point=point_id))
    gone = "" if (store.root / backup_id / MANIFEST).is_file() else " (its backup is gone from the store)"
    return f"  {name}: {backup_id}{gone}"


def _unpin_part(ctx: Context, name: str, backup_id: str, point_id: str) -> str:
    store = open_store(ctx.settings, BY_NAME[name])
    with store.lock(f"{POINTS.script} unpin"):
        still = change_pins(ctx, store, lambda pins: pins.unpin(backup_id, point=point_id)).pins.get(backup_id)
    return f"  {name}: {backup_id}" + (f" (still {still.describe()})" if still else "")


def _remove_freed(ctx: Context, component: Component, freed: set[str], policy: RetentionPolicy,
                  remaining: list[dict[str, str]]) -> list[str]:
    """Remove, from a component's store, the backups of `freed` that no rule, pin or remaining point keeps."""
    store = open_store(ctx.settings, component)
    if not store.root.is_dir():
        return []
    with store.lock(f"{POINTS.script} cleanup"):
        holds = Pins.load(store.root).holds()
        for parts in remaining:
            if component.name in parts:
                holds.setdefault(parts[component.name], []).append("part of a remaining restore point")
        live = deployed_id_in(store.root) if component.name == CODE.name else None
        if live:
            holds.setdefault(live, []).append("what the live tree was restored from")
        plan = plan_retention(store.scan(keep_entries=False)[0], policy, holds)
        doomed = [backup for backup in plan.remove if backup.id in freed]
        if not ctx.dry_run:
            for backup in doomed:
                store.remove(backup)
            if doomed:
                store.sweep_objects()
    return [backup.id for backup in doomed]
