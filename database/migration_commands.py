"""The `migrate`, `rollback` and `status` commands: the migrations of MIGRATIONS_DIR against DB_NAME, each
change after a safety backup, or printed as a psql script with --sql."""

from __future__ import annotations

import argparse

from common.cli import Context, Result
from common.errors import UsageError
from database.backups import backup_before, take_backup
from database.context import SCRIPT, DbContext
from database.migrate import migrate, out_of_order, pending, refuse_drift
from database.migration_rollback import MissingDownFile, plan_rollback, run_rollback
from database.migration_sql import migrate_script, rollback_script
from database.migrations import discover, display_id, find, read_applied, refuse_dirty, status


class SqlOption(argparse.Action):
    """--sql: print the SQL instead of running it; it implies --dry-run, so the run records no metrics or RTO."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, True)
        namespace.dry_run = True


def migrate_command(ctx: Context) -> Result:
    """migrate [TARGET]: apply pending migrations, after a backup tagged with the current version."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    if ctx.args.target is not None:
        find(migrations, [], ctx.args.target)  # a malformed or unknown target: exit 2
    rows = read_applied(db.server)
    refuse_dirty(rows, migrations, db.server.name)
    todo = pending(migrations, rows, ctx.args.target, ctx.args.allow_out_of_order)
    if ctx.args.sql:
        refuse_drift(migrations, rows)
        script = migrate_script(db.server.name, migrations, rows, todo, db.server.lock_timeout)
        return Result({"sql": script}, [script.rstrip("\n")], report=True)
    current = status(migrations, rows)["current"]
    if not todo:
        return Result({"applied": [], "current": current},
                      [f"nothing to apply: {db.server.name} is at {current or 'no migration'}"])
    late = {m.id for m in out_of_order(migrations, rows)}
    for ident in [m.id for m in todo if m.id in late]:
        ctx.warn(f"{ident} is older than the current version {current}: applied out of order, it is undone only by "
                 "a rollback to a version below it")
    if ctx.dry_run:
        return Result({"dry_run": True, "pending": [m.id for m in todo]}, [f"would apply {m.id}" for m in todo],
                      report=True)
    ids = []
    with db.store.lock(f"{SCRIPT} migrate"):
        if not ctx.args.no_backup:
            ids.append(take_backup(db, f"before migrate to {todo[-1].id}", progress=ctx.progress, safety=True,
                                   warn=ctx.warn).id)
        done = migrate(db.server, migrations, ctx.args.target, progress=ctx.info,
                       allow_out_of_order=ctx.args.allow_out_of_order)
    newest = max([*rows, *(m for m in todo if m.id in done)], key=lambda item: item.version, default=None)
    lines = [f"applied {ident}" for ident in done] + [f"backup before migrating: {i}" for i in ids]
    return Result({"applied": done, "current": display_id(newest.id, migrations) if newest else None,
                   "safety_backup": ids[0] if ids else None}, lines, backup_ids=ids)


def rollback_command(ctx: Context) -> Result:
    """rollback MIGRATION: undo every applied migration above it, in one transaction, after a backup."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    rows = read_applied(db.server)
    refuse_dirty(rows, migrations, db.server.name)
    lock_timeout = db.server.lock_timeout if ctx.args.lock_timeout is None else ctx.args.lock_timeout
    try:
        plan = plan_rollback(migrations, rows, _rollback_ref(ctx.args))
    except MissingDownFile as missing:
        way_back = backup_before(db, min(missing.versions))
        hint = (f"; restore the backup taken before it: {SCRIPT} restore {way_back.id}" if way_back
                else "; no backup from before it is in the store")
        raise MissingDownFile(str(missing) + hint, []) from None
    if ctx.args.sql:
        script = rollback_script(db.server.name, rows, plan, lock_timeout)
        return Result({"sql": script}, [script.rstrip("\n")], report=True)
    if not plan.steps:
        return Result({"rolled_back": [], "current": plan.target_id}, [plan.render()])
    for warning in plan.warnings:
        ctx.warn(warning)
    if ctx.dry_run:
        return Result({"dry_run": True, "plan": plan.to_dict()}, [plan.render()], report=True)
    ctx.confirm(f"Roll {db.server.name} back from {plan.current_id} to {plan.target_label}?")
    ids = []
    with db.store.lock(f"{SCRIPT} rollback"):
        if not ctx.args.no_backup:
            ids.append(take_backup(db, f"before rollback to {plan.target_label}", progress=ctx.progress,
                                   safety=True, warn=ctx.warn).id)
        outcome = run_rollback(db.server, plan, lock_timeout, ctx.args.terminate_blockers, progress=ctx.info)
    lines = [f"rolled back {ident}" for ident in outcome.rolled_back]
    lines += [f"ended blocking session {s['pid']} ({s.get('user')}, {s.get('application')})"
              for s in outcome.terminated]
    lines.append(f"{db.server.name} is now at {plan.target_label}")
    if ids:
        lines.append(f"to undo: {SCRIPT} restore {ids[0]} --yes")
    return Result({"rolled_back": outcome.rolled_back, "current": plan.target_id,
                   "terminated": [s["pid"] for s in outcome.terminated], "safety_backup": ids[0] if ids else None},
                  lines, backup_ids=ids)


def status_command(ctx: Context) -> Result:
    """status: applied and pending migrations, and applied files that changed since."""
    db = DbContext.from_settings(ctx.settings)
    state = status(discover(db.migrations_dir), read_applied(db.server))
    lines = [f"{db.server.name} is at {state['current'] or 'no migration'}"]
    dirty = "  DIRTY: ran outside a transaction and did not finish (see `force`)"
    lines += [f"  applied  {row['id']}  ({row['applied_at']}){dirty if row['dirty'] else ''}"
              for row in state["applied"]]
    late = "  older than the current version: migrate --allow-out-of-order applies it"
    lines += [f"  pending  {ident}{late if ident in state['out_of_order'] else ''}" for ident in state["pending"]]
    lines += [f"  {d['problem']:8} {d['id']}: {d['detail']}" for d in state["drift"]]
    return Result(state, lines, report=True)


def _rollback_ref(args: argparse.Namespace) -> str | None:
    """The migration `rollback` goes back to; None for every one (--all)."""
    if args.all and args.migration is not None:
        raise UsageError("give MIGRATION or --all, not both")
    if not args.all and args.migration is None:
        raise UsageError("name the migration to roll back to (id or version), or 0 or --all to roll back every one")
    return None if args.all else args.migration

