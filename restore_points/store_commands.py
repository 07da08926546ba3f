"""The store of restore points' own list and cleanup (push, pull and the --remote forms are every script's)."""

from __future__ import annotations

from contextlib import ExitStack

from backup_store.manifest import MANIFEST, Backup, format_time
from backup_store.pins import Pins
from backup_store.point_record import PointRecord, describe
from backup_store.retention import RetentionPolicy, plan_retention
from backup_store.store import BackupStore
from commands.retention_commands import change_pins, cleanup_backups, retention_holds
from commands.retention_commands import locked_unless_dry_run as _locked
from common.cli import Context, Result
from common.components import BY_NAME, CODE, PARTS, POINTS, Component
from common.errors import ToolkitError
from common.text import table
from deployed_code.backups import deployed_hold
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
    points, unreadable = store.scan(headers=True)
    if unreadable:  # its parts are not known: one of them could be a part a remaining point shares
        raise ToolkitError(f"restore point {unreadable[0][0]} cannot be read ({unreadable[0][1]}): nothing is "
                           "removed until it is mended or moved out of POINTS_DIR")
    before = {point.id: PointRecord.load(point).parts for point in points}
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)
    with ExitStack() as held:
        # Every component store's lock before any point goes: a store busy now stops the cleanup with nothing
        # removed (exit 75), instead of after the points went, leaving their parts to the next cleanup.
        stores = {component.name: open_store(ctx.settings, component) for component in PARTS}
        stores = {name: part_store for name, part_store in stores.items() if part_store.root.is_dir()}
        for part_store in stores.values():
            held.enter_context(_locked(ctx, part_store, "cleanup"))
        result = cleanup_backups(ctx, store, POINTS.script, policy=policy)
        gone = set(result.data["would_remove" if ctx.dry_run else "removed"])
        for component in PARTS:
            freed = {parts[component.name] for point_id, parts in before.items()
                     if point_id in gone and component.name in parts}
            if freed and component.name in stores:
                removed = _remove_freed(ctx, stores[component.name], component, freed, policy,
                                        [p for p in points if p.id not in gone])
                result.data.setdefault("would_remove_parts" if ctx.dry_run else "removed_parts", {})[
                    component.name] = removed
                verb = "would remove" if ctx.dry_run else "removed"
                result.lines += [f"{verb} {component.name} backup {backup_id} (only removed points held it)"
                                 for backup_id in removed]
    return result


def pin_command(ctx: Context) -> Result:
    """pin POINT [--reason TEXT]: the point and its three backups stay through every cleanup until `unpin`."""
    store = points_store(ctx.settings)
    with _locked(ctx, store, "pin"):
        point = store.resolve(ctx.args.backup, lazy=True)
        reason = ctx.args.reason or ""
        # The point first: a part that cannot be pinned (its store busy) leaves a pin that `unpin POINT` undoes.
        change_pins(ctx, store, point.id, lambda pins: pins.pin(point.id, reason))
        lines = [_pin_part(ctx, name, backup_id, point.id, reason) for name, backup_id in
                 PointRecord.load(point).parts.items()]
    verb = "would pin" if ctx.dry_run else "pinned"
    return Result({"id": point.id, "pinned": True, "reason": reason, "parts": PointRecord.load(point).parts,
                   "dry_run": ctx.dry_run}, [f"{verb} restore point {point.id}" + (f": {reason}" if reason else ""),
                                            *lines])


def unpin_command(ctx: Context) -> Result:
    """unpin POINT: the point, and the backups pinned only through it, follow the retention rules again."""
    store = points_store(ctx.settings)
    with _locked(ctx, store, "unpin"):
        point = store.resolve(ctx.args.backup, lazy=True)
        pinned = point.id in Pins.load(store.root).pins
        if pinned:
            change_pins(ctx, store, point.id, lambda pins: pins.unpin(point.id))
        # Its parts always: a pin stopped part-way may have pinned some of them through the point.
        lines = [_unpin_part(ctx, name, backup_id, point.id) for name, backup_id in
                 PointRecord.load(point).parts.items()]
    verb = "would unpin" if ctx.dry_run else "unpinned"
    first = f"{verb} restore point {point.id}" if pinned else f"restore point {point.id} was not pinned"
    return Result({"id": point.id, "pinned": False, "dry_run": ctx.dry_run}, [first, *lines])


def _pin_part(ctx: Context, name: str, backup_id: str, point_id: str, reason: str) -> str:
    store = open_store(ctx.settings, BY_NAME[name])
    with _locked(ctx, store, "pin"):
        change_pins(ctx, store, backup_id, lambda pins: pins.pin(backup_id, reason, point=point_id))
    gone = "" if (store.root / backup_id / MANIFEST).is_file() else " (its backup is gone from the store)"
    return f"  {name}: {backup_id}{gone}"


def _unpin_part(ctx: Context, name: str, backup_id: str, point_id: str) -> str:
    store = open_store(ctx.settings, BY_NAME[name])
    with _locked(ctx, store, "unpin"):
        held = Pins.load(store.root).pins.get(backup_id)
        if held is None or point_id not in held.points:
            return f"  {name}: {backup_id}" + (f" (still {held.describe()})" if held else "")
        still = change_pins(ctx, store, backup_id, lambda pins: pins.unpin(backup_id, point=point_id)
                            ).pins.get(backup_id)
    return f"  {name}: {backup_id}" + (f" (still {still.describe()})" if still else "")


def _remove_freed(ctx: Context, store: BackupStore, component: Component, freed: set[str],
                  policy: RetentionPolicy, remaining: list[Backup]) -> list[str]:
    """Remove, from a component's store (its lock held, unless a dry run), the backups of `freed` that no rule,
    pin or point keeps (a run reads the points again; a dry run counts only the points it would leave)."""
    live_origin = (lambda: deployed_hold(store.root)) if component.name == CODE.name else None
    holds = retention_holds(ctx, store, live_origin, remaining if ctx.dry_run else None)
    plan = plan_retention(store.scan(headers=True)[0], policy, holds)
    doomed = [backup for backup in plan.remove if backup.id in freed]
    if not ctx.dry_run:
        for backup in doomed:
            store.remove(backup)
        if doomed:
            store.sweep_objects()
    return [backup.id for backup in doomed]
