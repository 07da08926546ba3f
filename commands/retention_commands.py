"""cleanup, pin and unpin on a store: what every script has (see backup_store.retention for the rules)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from backup_store.manifest import Backup, format_time
from backup_store.pins import Pins
from backup_store.point_record import held_by_points, local_points
from backup_store.retention import RetentionPlan, RetentionPolicy, plan_retention
from backup_store.store import BackupStore
from common.cli import Context, Result
from common.components import POINTS
from common.errors import ToolkitError
from offsite.commands import cleanup_remote, remote_for
from offsite.pull import open_store

POINT_HOLD = "part of restore point"


def retention_holds(ctx: Context, store: BackupStore, extra: dict[str, list[str]] | None = None,
                    more_points: Iterable[Backup] = ()) -> dict[str, list[str]]:
    """What keeps a store's backups whatever the rules say: its pins, the restore points that name them (those
    in POINTS_DIR and `more_points`), and `extra` (what the live tree was restored from, say)."""
    holds: dict[str, list[str]] = {}
    sources = [Pins.load(store.root).holds(), extra or {}]
    if ctx.component.name != POINTS.name:
        points = [*local_points(ctx.settings), *more_points]
        sources.append(held_by_points(points, ctx.component.name))
    for source in sources:
        for backup_id, reasons in source.items():
            holds.setdefault(backup_id, []).extend(reasons)
    return holds


def plan_lines(plan: RetentionPlan, dry_run: bool) -> list[str]:
    """One line per backup: what goes, and why each kept one stays (a run lists only the points' holds)."""
    if dry_run:
        lines = [f"would remove {d.backup.id} ({format_time(d.backup.created_at)}): no rule keeps it"
                 for d in plan.decisions if not d.keep]
        return lines + [f"keep {d.backup.id}: {'; '.join(d.reasons)}" for d in plan.decisions if d.keep]
    return [f"removed {b.id}" for b in plan.remove] + [
        f"kept {d.backup.id}: {'; '.join(d.holds)}" for d in plan.held_only(POINT_HOLD)]


def cleanup_backups(ctx: Context, store: BackupStore, script: str, extra: dict[str, list[str]] | None = None
                    ) -> Result:
    """cleanup: remove the backups no rule or hold keeps, and unfinished leftovers; --dry-run lists what would
    go and why each kept backup stays."""
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)

    def planned() -> RetentionPlan:
        return plan_retention(store.scan(keep_entries=False)[0], policy, retention_holds(ctx, store, extra))

    if ctx.dry_run:
        plan, leftovers = planned(), store.leftovers()
        lines = [f"retention: {policy.describe()}", *plan_lines(plan, True)]
        lines += [f"would remove unfinished {name}" for name in leftovers]
        return Result({"dry_run": True, "retention": policy.describe(), "would_remove": [b.id for b in plan.remove],
                       "kept": [b.id for b in plan.keep], "decisions": [d.to_json() for d in plan.decisions],
                       "would_remove_leftovers": leftovers}, lines, report=True)
    with store.lock(f"{script} cleanup"):
        plan = planned()
        for backup in plan.remove:
            store.remove(backup)
        leftovers = store.remove_leftovers()
        objects = store.sweep_objects()  # the shared content only the removed backups had
    lines = plan_lines(plan, False) + [f"removed unfinished {name}" for name in leftovers]
    if objects:
        lines.append(f"removed {objects} stored files no remaining backup names")
    elif objects is None:
        lines.append("kept every stored file: a backup's manifest cannot be read (`list` names it)")
    lines.append(f"{len(plan.remove)} backups removed, {len(plan.keep)} kept ({policy.describe()})")
    return Result({"removed": [b.id for b in plan.remove], "kept": [b.id for b in plan.keep],
                   "kept_for_points": [d.backup.id for d in plan.held_only(POINT_HOLD)],
                   "leftovers_removed": leftovers, "objects_removed": objects}, lines)


def cleanup_remote_command(ctx: Context) -> Result:
    """cleanup --remote: the same rules and holds on REMOTE_URL's copies; the remote's restore points hold too, and
    so do this host's pins."""
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)
    store = BackupStore(ctx.component.store_path(ctx.settings), ctx.component.name)
    return cleanup_remote(ctx, policy, lambda remote_points: retention_holds(ctx, store, more_points=remote_points))


def change_pins(ctx: Context, store: BackupStore, change: Callable[[Pins], object]) -> Pins:
    """Apply `change` to the store's pins and save them (not with --dry-run; the caller holds the store's lock);
    with REMOTE_URL set, to the remote's pins of the component too, so that `cleanup --remote` from any host
    keeps them. A remote that cannot be written is a warning: the local pin holds, and this host's remote
    cleanups keep it."""
    pins = Pins.load(store.root)
    change(pins)
    if ctx.dry_run:
        return pins
    pins.save()
    if ctx.settings.text("REMOTE_URL"):
        try:
            remote = remote_for(ctx)
            shared = remote.pins(store.component)
            remote_pins = Pins.parse(shared, pins.path) if shared is not None else Pins(pins.path)
            change(remote_pins)
            remote.put_pins(store.component, remote_pins.text())
        except ToolkitError as exc:
            ctx.warn(f"the remote's copy of the pins was not updated ({exc}); this host's pins hold")
    return pins


def pin_command(ctx: Context) -> Result:
    """pin BACKUP [--reason TEXT]: no cleanup, local or remote, removes it until `unpin`."""
    store = open_store(ctx.settings, ctx.component)
    with store.lock(f"{ctx.script} pin"):
        backup = store.resolve(ctx.args.backup, lazy=True)
        pins = change_pins(ctx, store, lambda pins: pins.pin(backup.id, ctx.args.reason or ""))
    reason = pins.pins[backup.id].reason
    line = f"{'would pin' if ctx.dry_run else 'pinned'} {backup.id}" + (f": {reason}" if reason else "")
    return Result({"id": backup.id, "pinned": True, "reason": reason, "dry_run": ctx.dry_run}, [line])


def unpin_command(ctx: Context) -> Result:
    """unpin BACKUP: the retention rules apply to it again (unless a pinned restore point still holds it)."""
    store = open_store(ctx.settings, ctx.component)
    with store.lock(f"{ctx.script} unpin"):
        pins = Pins.load(store.root)
        backup_id = ctx.args.backup if ctx.args.backup in pins.pins else store.resolve(ctx.args.backup, lazy=True).id
        if backup_id not in pins.pins or not pins.pins[backup_id].direct:
            held = pins.pins.get(backup_id)
            why = f"; {held.describe()} (unpin that point with rollback.py)" if held else ""
            return Result({"id": backup_id, "pinned": held is not None}, [f"{backup_id} was not pinned{why}"])
        still = change_pins(ctx, store, lambda pins: pins.unpin(backup_id)).pins.get(backup_id)
    line = f"{'would unpin' if ctx.dry_run else 'unpinned'} {backup_id}"
    if still is not None:
        line += f"; still {still.describe()}"
    return Result({"id": backup_id, "pinned": still is not None, "dry_run": ctx.dry_run}, [line])


def pinned_label(store: BackupStore) -> dict[str, str]:
    """Each pinned backup's `list` text (`pinned: reason`)."""
    return {backup_id: pin.describe() for backup_id, pin in Pins.load(store.root).pins.items()}

