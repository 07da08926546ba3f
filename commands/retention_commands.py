"""cleanup, pin and unpin on a store: what every script has (see backup_store.retention for the rules)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

from backup_store.manifest import Backup
from backup_store.pins import Pin, Pins
from backup_store.point_record import held_by_points, local_points
from backup_store.retention import RetentionPlan, RetentionPolicy, plan_retention
from backup_store.store import BackupStore
from common.cli import Context, Result
from common.components import POINTS
from common.errors import ToolkitError
from offsite.commands import cleanup_remote, remote_for
from offsite.pull import open_store

POINT_HOLD = "part of restore point"


Holds = Callable[[], dict[str, list[str]]]


def retention_holds(ctx: Context, store: BackupStore, extra: Holds | None = None,
                    points: Iterable[Backup] | None = None) -> dict[str, list[str]]:
    """What keeps a store's backups whatever the rules say: its pins, the restore points that name them (`points`,
    else those in POINTS_DIR), and `extra`'s (what the live tree was restored from, say)."""
    holds: dict[str, list[str]] = {}
    sources = [Pins.load(store.root).holds(), extra() if extra else {}]
    if store.component != POINTS.name:
        sources.append(held_by_points(this_hosts_points(ctx) if points is None else points, store.component))
    for source in sources:
        for backup_id, reasons in source.items():
            holds.setdefault(backup_id, []).extend(reasons)
    return holds


def this_hosts_points(ctx: Context) -> list[Backup]:
    """The restore points in POINTS_DIR; a POINTS_DIR that is set but not a folder is warned about."""
    if ctx.settings.text("POINTS_DIR") and not POINTS.store_path(ctx.settings).is_dir():
        ctx.warn(f"POINTS_DIR {POINTS.store_path(ctx.settings)} is not a folder: no restore point holds a backup "
                 "in this cleanup (an unmounted volume?)")
    return local_points(ctx.settings)


def removed_lines(plan: RetentionPlan) -> list[str]:
    """What a run prints: each backup removed, and each kept only because a restore point names it."""
    return [f"removed {b.id}" for b in plan.remove] + [
        f"kept {d.backup.id}: {'; '.join(d.holds)}" for d in plan.held_only(POINT_HOLD)]


def cleanup_backups(ctx: Context, store: BackupStore, script: str, extra: Holds | None = None,
                    policy: RetentionPolicy | None = None) -> Result:
    """cleanup: remove the backups no rule or hold keeps (`extra` gives holds of the component's own, read under
    the store's lock), and unfinished leftovers; --dry-run lists what would go and why each kept backup stays.
    `policy` defaults to the command line's (a caller that needed it already passes it)."""
    policy = policy or RetentionPolicy.from_command(ctx.args, ctx.settings)

    def planned() -> RetentionPlan:
        return plan_retention(store.scan(headers=True)[0], policy, retention_holds(ctx, store, extra))

    if ctx.dry_run:
        plan, leftovers = planned(), store.leftovers()
        lines = [f"retention: {policy.describe()}", *plan.explained()]
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
    lines = removed_lines(plan) + [f"removed unfinished {name}" for name in leftovers]
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
    return cleanup_remote(ctx, policy, lambda remote_points: retention_holds(
        ctx, store, points=[*this_hosts_points(ctx), *remote_points]))


def change_pins(ctx: Context, store: BackupStore, backup_id: str, change: Callable[[Pins], object]) -> Pins:
    """Apply `change` (to `backup_id`'s pin) to the store's pins and save them (not with --dry-run; the caller
    holds the store's lock); with REMOTE_URL set, to the remote's pin of that backup too, so that `cleanup
    --remote` from any host keeps it. A remote that cannot be written is a warning: the local pin holds, and
    this host's remote cleanups keep it."""
    pins = Pins.load(store.root)
    change(pins)
    if ctx.dry_run:
        return pins
    pins.save()
    if ctx.settings.text("REMOTE_URL"):
        try:
            remote = remote_for(ctx)
            text = remote.pin(store.component, backup_id)
            one = Pins(pins.path, {backup_id: Pin.from_text(text, backup_id)} if text else {})
            change(one)
            remote.put_pin(store.component, backup_id, one.pins[backup_id].to_text() if backup_id in one.pins else None)
        except ToolkitError as exc:
            ctx.warn(f"the remote's pin of {backup_id} was not updated ({exc}); this host's pin holds")
    return pins


def locked_unless_dry_run(ctx: Context, store: BackupStore, command: str) -> AbstractContextManager:
    """The store's lock, except for a dry run, which changes nothing (and must not make the store's folder)."""
    return nullcontext() if ctx.dry_run else store.lock(f"{ctx.script} {command}")


def pin_command(ctx: Context) -> Result:
    """pin BACKUP [--reason TEXT]: no cleanup, local or remote, removes it until `unpin`."""
    store = open_store(ctx.settings, ctx.component)
    with locked_unless_dry_run(ctx, store, "pin"):
        backup = store.resolve(ctx.args.backup, lazy=True)
        pins = change_pins(ctx, store, backup.id, lambda pins: pins.pin(backup.id, ctx.args.reason or ""))
    reason = pins.pins[backup.id].reason
    line = f"{'would pin' if ctx.dry_run else 'pinned'} {backup.id}" + (f": {reason}" if reason else "")
    return Result({"id": backup.id, "pinned": True, "reason": reason, "dry_run": ctx.dry_run}, [line])


def unpin_command(ctx: Context) -> Result:
    """unpin BACKUP: the retention rules apply to it again (unless a pinned restore point still holds it)."""
    store = open_store(ctx.settings, ctx.component)
    with locked_unless_dry_run(ctx, store, "unpin"):
        pins = Pins.load(store.root)
        backup_id = ctx.args.backup if ctx.args.backup in pins.pins else store.resolve(ctx.args.backup, lazy=True).id
        if backup_id not in pins.pins or not pins.pins[backup_id].direct:
            held = pins.pins.get(backup_id)
            why = f"; {held.describe()} (unpin that point with rollback.py)" if held else ""
            return Result({"id": backup_id, "pinned": held is not None}, [f"{backup_id} was not pinned{why}"])
        still = change_pins(ctx, store, backup_id, lambda pins: pins.unpin(backup_id)).pins.get(backup_id)
    line = f"{'would unpin' if ctx.dry_run else 'unpinned'} {backup_id}"
    if still is not None:
        line += f"; still {still.describe()}"
    return Result({"id": backup_id, "pinned": still is not None, "dry_run": ctx.dry_run}, [line])


def pinned_label(store: BackupStore) -> dict[str, str]:
    """Each pinned backup's `list` text (`pinned: reason`); a pins file that cannot be read is said once, and
    `list` goes on (cleanup refuses to run until it is mended)."""
    try:
        return {backup_id: pin.describe() for backup_id, pin in Pins.load(store.root).pins.items()}
    except ToolkitError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        return {}

