"""The `migrate`, `rollback` and `status` commands: the migrations of MIGRATIONS_DIR against DB_NAME, each
change after a safety backup."""

from __future__ import annotations

import argparse

from common.cli import Context, Result
from common.errors import UsageError
from database.backups import backup_before, take_backup
from database.context import SCRIPT, DbContext
from database.migrate import migrate
from database.migration_rollback import MissingDownFile, plan_rollback, run_rollback
from database.migrations import discover, find, read_applied, status


def migrate_command(ctx: Context) -> Result:
    """migrate [TARGET]: apply pending migrations, after a backup tagged with the current version."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    state = status(migrations, read_applied(db.server))
    pending = [ident for ident in state["pending"]
               if ctx.args.target is None or _version(ident) <= _version(ctx.args.target)]
    if ctx.args.target is not None:
        find(migrations, [], ctx.args.target)  # a malformed or unknown target: exit 2
    if not pending:
        return Result({"applied": [], "current": state["current"]},
                      [f"nothing to apply: {db.server.name} is at {state['current'] or 'no migration'}"])
    if ctx.dry_run:
        return Result({"dry_run": True, "pending": pending}, [f"would apply {ident}" for ident in pending],
                      report=True)
    ids = []
    with db.store.lock(f"{SCRIPT} migrate"):
        if not ctx.args.no_backup:
            ids.append(take_backup(db, f"before migrate to {pending[-1]}", progress=ctx.progress, safety=True).id)
        done = migrate(db.server, migrations, ctx.args.target, progress=ctx.info)
    lines = [f"applied {ident}" for ident in done] + [f"backup before migrating: {i}" for i in ids]
    return Result({"applied": done, "current": done[-1] if done else state["current"],
                   "safety_backup": ids[0] if ids else None}, lines, backup_ids=ids)


def rollback_command(ctx: Context) -> Result:
    """rollback MIGRATION: undo every applied migration above it, in one transaction, after a backup."""
    db = DbContext.from_settings(ctx.settings)
    migrations = discover(db.migrations_dir)
    try:
        plan = plan_rollback(migrations, read_applied(db.server), _rollback_ref(ctx.args))
    except MissingDownFile as missing:
        way_back = backup_before(db, min(missing.versions))
        hint = (f"; restore the backup taken before it: {SCRIPT} restore {way_back.id}" if way_back
                else "; no backup from before it is in the store")
        raise MissingDownFile(str(missing) + hint, []) from None
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
                                   safety=True).id)
        lock_timeout = db.server.lock_timeout if ctx.args.lock_timeout is None else ctx.args.lock_timeout
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
    lines += [f"  applied  {row['id']}  ({row['applied_at']})" for row in state["applied"]]
    lines += [f"  pending  {ident}" for ident in state["pending"]]
    lines += [f"  {d['problem']:8} {d['id']}: {d['detail']}" for d in state["drift"]]
    return Result(state, lines, report=True)


def _rollback_ref(args: argparse.Namespace) -> str | None:
    """The migration `rollback` goes back to; None for every one (--all)."""
    if args.all and args.migration is not None:
        raise UsageError("give MIGRATION or --all, not both")
    if not args.all and args.migration is None:
        raise UsageError("name the migration to roll back to (id or version), or 0 or --all to roll back every one")
    return None if args.all else args.migration


def _version(ident: str) -> int:
    """The version number a migration id or version starts with."""
    head = ident.split("_", 1)[0]
    if not head.isdigit():
        raise UsageError(f"{ident!r} is not a migration id or version (e.g. 001_initial_schema or 1)")
    return int(head)
