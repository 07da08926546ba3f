"""rollback.py restore: everything checked and every lock taken before the first change, then the ordered
restore (restore_points.restore) under those locks, and its report."""

from __future__ import annotations

from dataclasses import replace

from backup_store.manifest import Backup, load_backup
from backup_store.point_record import PointRecord
from backup_store.store import LOCK_FILE
from common.cli import Context, Result
from common.components import DATABASE, POINTS, Component
from common.errors import UsageError
from offsite.pull import open_store
from restore_points.command_setup import held_locks, points_store, runner_for
from restore_points.database_plan import DatabasePlan, plan_database
from restore_points.health import HealthReport, validate_url
from restore_points.health_options import check_health, health_url, thresholds_for
from restore_points.hooks import Hooks
from restore_points.plan import (
    absent_parts,
    check_parts,
    preview,
    restore_order,
    restore_plan,
    step_arguments,
    wanted_components,
)
from restore_points.restore import restore_point


def database_plan(ctx: Context, point: Backup, plan: list[Component]) -> DatabasePlan | None:
    """How the point's database part goes back (None when it is not restored): schema or dump, and why."""
    if DATABASE not in plan:
        return None
    backup = load_backup(open_store(ctx.settings, DATABASE).root / PointRecord.load(point).parts[DATABASE.name])
    return plan_database(ctx.settings, backup, ctx.args.restore_data)


def restore_command(ctx: Context) -> Result:
    """restore POINT: configuration, then code, then database, each verified, stopping at the first failure."""
    store = points_store(ctx.settings)
    # Settings first: bad input is refused at once, before any wait for a lock.
    wanted = wanted_components(ctx.args.only)
    url = health_url(ctx)
    if url:
        validate_url(url)
    thresholds, hooks = thresholds_for(ctx), Hooks.from_settings(ctx.settings)
    # Every lock the steps will need is taken before the first change and held to the last step, which
    # runs under it: a drill, a cleanup or a second restore cannot come between two steps.
    with held_locks(ctx, "restore") as locks:
        locks.take(store.root / LOCK_FILE)
        point = store.resolve(ctx.args.point)
        if point.component != POINTS.name:
            raise UsageError(f"{ctx.args.point} is a {point.component} backup, not a restore point")
        plan = restore_plan(point, wanted)
        if not ctx.dry_run:  # a dry run's steps take their own locks, each for its own look
            for component in plan:
                locks.take(open_store(ctx.settings, component).root / LOCK_FILE)
        # Everything that could stop the run part-way is checked before the first change.
        check_parts(ctx.settings, point, plan)
        absent, order = absent_parts(point, wanted), restore_order(point, plan)
        database = database_plan(ctx, point, plan)
        if ctx.dry_run:
            return preview(ctx, point, plan, order, absent, database)
        for line in database.lines() if database else []:  # before the question: what yes means for the rows
            ctx.info(line)
        ctx.confirm(f"Restore {order}?")

        def health(check_url: str | None, requests: int | None) -> HealthReport:
            return check_health(ctx, replace(thresholds, requests=requests or thresholds.requests), check_url)

        runner = replace(runner_for(ctx), locks=locks)
        outcome = restore_point(point, plan, ctx.settings, runner, hooks, health, url, ctx.info,
                                step_arguments(point, plan, database))
    outcome.notes[:0] = absent
    for report in outcome.rtos:
        if not report.met:
            ctx.warn(report.line())
    return Result({**outcome.to_json(), "database_plan": database.to_dict() if database else None},
                  outcome.lines(), exit_code=outcome.exit_code, report=True,
                  backup_ids=[point.id, *(s.restore.data["safety_backup"] for s in outcome.done
                                          if s.restore.data.get("safety_backup"))])
