"""Taking a restore point: a configuration, a code and a database backup under one point id and label."""

from __future__ import annotations

from dataclasses import replace

from backup_store.point_record import PointRecord, describe
from backup_store.store import LOCK_FILE
from common.cli import Context, Result, push_wanted
from common.components import BY_NAME, PARTS, POINTS
from common.errors import UsageError
from offsite.commands import push_failed
from offsite.pull import open_store
from restore_points.command_setup import held_locks, points_store, runner_for, step_failed
from restore_points.steps import ScriptRunner


def backup_command(ctx: Context) -> Result:
    """backup: each configured component's script takes its backup; the point's manifest names them all."""
    configured = [c for c in PARTS if c.configured(ctx.settings)]
    skipped = [c for c in PARTS if c not in configured]
    if not configured:
        raise UsageError("none of CONFIG_DIR, DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set: nothing to back up")
    notes = [f"{c.title} skipped: none of {', '.join(c.configured_by)} is set" for c in skipped]
    if ctx.dry_run:
        return Result({"dry_run": True, "components": [c.name for c in configured]},
                      [f"would back up {', '.join(c.title for c in configured)}", *notes], report=True)
    store, parts = points_store(ctx.settings), {}
    with held_locks(ctx, "backup") as locks:
        # All taken first: a drill or a restore holding one store must not cost a point half its backups.
        for lock in [store.root, *(open_store(ctx.settings, c).root for c in configured)]:
            locks.take(lock / LOCK_FILE)
        runner = replace(runner_for(ctx), locks=locks)
        with store.lock(f"{POINTS.script} backup"), store.new_backup(ctx.args.label) as staging:
            label = f"{ctx.args.label + ' ' if ctx.args.label else ''}(restore point {staging.backup_id})"
            for component in configured:
                # Pushed below, once the point exists: a bucket out of reach must not cost the local restore point.
                step = runner.run(component, "backup", "--label", label, env={"REMOTE_AUTO_PUSH": "0"})
                if not step.ok:
                    taken = f" (the backups already taken are kept: {', '.join(parts.values())})" if parts else ""
                    raise step_failed(f"{component.title} backup", step, f"no restore point was made{taken}")
                parts[component.name] = step.data["backup"]["id"]
                ctx.info(f"{component.title}: {parts[component.name]}")
            staging.extra = PointRecord(parts, [c.name for c in skipped]).dump()
    point = staging.backup
    lines = [f"restore point {point.id}: " + ", ".join(f"{BY_NAME[n].title} {i}" for n, i in parts.items()), *notes]
    result = Result({"point": describe(point)}, lines, backup_ids=[point.id, *parts.values()])
    if push_wanted(ctx):
        push_parts(ctx, runner_for(ctx), parts, result)  # the point itself goes last, after the command (commands.run)
    return result


def push_parts(ctx: Context, runner: ScriptRunner, parts: dict[str, str], result: Result) -> None:
    """Push a new point's three backups; a failure keeps the point, says so, and exits 1 (the point stays local)."""
    for name, backup_id in parts.items():
        step = runner.run(BY_NAME[name], "push", backup_id)
        if not step.ok:
            push_failed(ctx, result, f"restore point {result.backup_ids[0]} was made, but the push of its "
                                     f"{BY_NAME[name].title} backup failed: {step.error}; `{POINTS.script} push` "
                                     "and the scripts' `push --all` send it later")
            return
        ctx.info(f"{BY_NAME[name].title}: {backup_id} pushed")
