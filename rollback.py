#!/usr/bin/env python3
"""rollback.py: one restore point across configuration, code and database, rolled back in the runbook's order."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from backup_store.locks import HeldLocks
from backup_store.manifest import MANIFEST, Backup, check_backup, format_time, load_backup
from backup_store.store import BACKUP_ID, LOCK_FILE, BackupStore
from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command, cleanup_backups
from common.cli import Context, Result, add_backup_arguments, add_command, make_parser, push_wanted
from common.components import BY_NAME, PARTS, POINTS, Component
from common.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_VERIFY, LockBusy, ToolkitError, UsageError
from common.settings import Settings
from common.text import count, table
from database.server import DbServer
from offsite.commands import push_failed
from offsite.pull import open_store
from restore_points.drill import run_drill
from restore_points.health import HealthReport, Thresholds, run_health, validate_url
from restore_points.hooks import Hooks
from restore_points.record import PointRecord, describe
from restore_points.restore import restore_point
from restore_points.steps import ScriptRun, ScriptRunner

SCRIPT = "rollback.py"
DEFAULT_LOCK_WAIT_SECONDS = 30.0


def points_store(settings: Settings) -> BackupStore:
    """The store of restore points: one manifest per point naming its three backups."""
    return open_store(settings, POINTS)


def runner_for(ctx: Context) -> ScriptRunner:
    """Component scripts run with the same --env-file and --metrics-file as this run."""
    return ScriptRunner(env_file=ctx.args.env_file, metrics_file=ctx.args.metrics_file)


def _step_failed(what: str, step: ScriptRun, consequence: str) -> ToolkitError:
    error = LockBusy if step.exit_code == EXIT_LOCKED else ToolkitError
    return error(f"{what} failed: {step.error}; {consequence}")


# -- backup and list ----------------------------------------------------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: a configuration, a code and a database backup under one restore point id and label."""
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
        with store.lock(f"{SCRIPT} backup"), store.new_backup(ctx.args.label) as staging:
            label = f"{ctx.args.label + ' ' if ctx.args.label else ''}(restore point {staging.backup_id})"
            for component in configured:
                # Pushed below, once the point exists: a bucket out of reach must not cost the local restore point.
                step = runner.run(component, "backup", "--label", label, env={"REMOTE_AUTO_PUSH": "0"})
                if not step.ok:
                    taken = f" (the backups already taken are kept: {', '.join(parts.values())})" if parts else ""
                    raise _step_failed(f"{component.title} backup", step, f"no restore point was made{taken}")
                parts[component.name] = step.data["backup"]["id"]
                ctx.info(f"{component.title}: {parts[component.name]}")
            staging.extra = PointRecord(parts, [c.name for c in skipped]).dump()
    point = staging.backup
    lines = [f"restore point {point.id}: " + ", ".join(f"{BY_NAME[n].title} {i}" for n, i in parts.items()), *notes]
    result = Result({"point": describe(point)}, lines, backup_ids=[point.id, *parts.values()])
    if push_wanted(ctx):
        _push_parts(ctx, runner_for(ctx), parts, result)  # the point itself goes last, after the command (common.cli)
    return result


def _push_parts(ctx: Context, runner: ScriptRunner, parts: dict[str, str], result: Result) -> None:
    """Push a new point's three backups; a failure keeps the point, says so, and exits 1 (the point stays local)."""
    for name, backup_id in parts.items():
        step = runner.run(BY_NAME[name], "push", backup_id)
        if not step.ok:
            push_failed(ctx, result, f"restore point {result.backup_ids[0]} was made, but the push of its "
                                     f"{BY_NAME[name].title} backup failed: {step.error}; `{SCRIPT} push` and "
                                     "the scripts' `push --all` send it later")
            return
        ctx.info(f"{BY_NAME[name].title}: {backup_id} pushed")


def cmd_list(ctx: Context) -> Result:
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


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: remove restore points (not their backups) older than DAYS, keeping the newest --keep."""
    return cleanup_backups(ctx, points_store(ctx.settings), SCRIPT)


# -- restore --------------------------------------------------------------------------------------------


def cmd_restore(ctx: Context) -> Result:
    """restore POINT: configuration, then code, then database, each verified, stopping at the first failure."""
    store = points_store(ctx.settings)
    # Settings first: bad input is refused at once, before any wait for a lock.
    wanted = _only(ctx.args.only)
    url = _health_url(ctx)
    if url:
        validate_url(url)
    thresholds, hooks = _thresholds(ctx), Hooks.from_settings(ctx.settings)
    # Every lock the steps will need is taken before the first change and held to the last step, which
    # runs under it: a drill, a cleanup or a second restore cannot come between two steps.
    with held_locks(ctx, "restore") as locks:
        locks.take(store.root / LOCK_FILE)
        point = store.resolve(ctx.args.point)
        if point.component != POINTS.name:
            raise UsageError(f"{ctx.args.point} is a {point.component} backup, not a restore point")
        parts = PointRecord.load(point).parts
        plan = [c for c in PARTS if c.name in parts and c.name in wanted]
        if not plan:
            raise UsageError(f"restore point {point.id} holds none of {', '.join(sorted(wanted))}")
        if not ctx.dry_run:  # a dry run's steps take their own locks, each for its own look
            for component in plan:
                locks.take(open_store(ctx.settings, component).root / LOCK_FILE)
        # Everything that could stop the run part-way is checked before the first change.
        _check_parts(ctx.settings, point, plan)
        absent = [f"not in this restore point: {c.title}" for c in PARTS
                  if c.name in wanted and c.name not in parts]
        order = " -> ".join(f"{c.title} {parts[c.name]}" for c in plan)
        if ctx.dry_run:
            return _preview(ctx, point, plan, order, absent)
        ctx.confirm(f"Restore {order}?")

        def health(check_url: str | None, requests: int | None) -> HealthReport:
            return _health(ctx, replace(thresholds, requests=requests or thresholds.requests), check_url)

        runner = replace(runner_for(ctx), locks=locks)
        outcome = restore_point(point, plan, ctx.settings, runner, hooks, health, url, ctx.info)
    outcome.notes[:0] = absent
    for report in outcome.rtos:
        if not report.met:
            ctx.warn(report.line())
    return Result(outcome.to_json(), outcome.lines(), exit_code=outcome.exit_code, report=True,
                  backup_ids=[point.id, *(s.restore.data["safety_backup"] for s in outcome.done
                                          if s.restore.data.get("safety_backup"))])


def held_locks(ctx: Context, command: str) -> HeldLocks:
    """Locks for this run and the scripts it runs, each waited for up to LOCK_WAIT_SECONDS in all (then exit 75)."""
    wait = ctx.settings.number("LOCK_WAIT_SECONDS", DEFAULT_LOCK_WAIT_SECONDS, minimum=0)
    return HeldLocks(f"{SCRIPT} {command}", wait, ctx.info)


def _preview(ctx: Context, point: Backup, plan: list[Component], order: str, absent: list[str]) -> Result:
    """restore --dry-run: the order, and what each step's own `restore --dry-run` says it would change."""
    runner, parts = runner_for(ctx), PointRecord.load(point).parts
    steps, lines, exit_code = [], [f"would restore, in this order: {order}"], 0
    for component in plan:
        code, said = runner.preview(component, parts[component.name])
        steps.append({"component": component.name, "backup": parts[component.name], "exit_code": code,
                      "would": said})
        lines.append(f"{component.title} ({parts[component.name]}):")
        lines += [f"  {line}" for line in said]
        exit_code = exit_code or code
    return Result({"dry_run": True, "point": describe(point), "plan": [c.name for c in plan], "steps": steps},
                  lines + absent, exit_code=exit_code, report=True)


def _check_parts(settings: Settings, point: Backup, plan: list[Component]) -> None:
    """Refuse the point unless every part's backup is here (a part found only off-host, with REMOTE_URL set,
    is pulled now) and whole: its manifest sound and every checksum holding. Nothing has changed yet."""
    parts, missing, damaged = PointRecord.load(point).parts, [], []
    for component in plan:
        store = open_store(settings, component)
        backup_id = parts[component.name]
        if not isinstance(backup_id, str) or not BACKUP_ID.fullmatch(backup_id):
            raise ToolkitError(f"restore point {point.id} names {backup_id!r} as its {component.title} backup, "
                               "which is not a backup id: refused, nothing changed")
        here = (store.root / backup_id / MANIFEST).is_file()
        if not here and not (store.fetch is not None and store.fetch(backup_id)):
            missing.append(f"the {component.title} backup {backup_id} is no longer in {store.root}"
                           + (" nor on the remote" if store.fetch is not None else ""))
            continue
        try:
            problems = check_backup(load_backup(store.root / backup_id))
        except ToolkitError as exc:
            problems = [str(exc)]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            damaged.append(f"the {component.title} backup {backup_id} is damaged: {problems[0]}{more}")
    if missing:
        raise UsageError(f"restore point {point.id} cannot be restored: {'; '.join(missing + damaged)}; "
                         "nothing changed")
    if damaged:
        raise ToolkitError(f"restore point {point.id} cannot be restored: {'; '.join(damaged)}; nothing changed")


def _only(text: str | None) -> set[str]:
    if not text:
        return set(BY_NAME)
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(BY_NAME)
    if unknown:
        raise UsageError(f"--only: unknown component {', '.join(sorted(unknown))}; use config, code, db")
    return names


# -- health -----------------------------------------------------------------------------------------------


def _thresholds(ctx: Context) -> Thresholds:
    args = ctx.args
    return Thresholds.from_settings(ctx.settings, max_error_rate_percent=args.max_error_rate,
                                    max_p95_ms=args.max_p95_ms, max_cpu_percent=args.max_cpu,
                                    max_memory_percent=args.max_memory, requests=args.health_requests)


def _health_url(ctx: Context) -> str | None:
    return ctx.args.health_url or ctx.settings.text("HEALTHCHECK_URL")


def _health(ctx: Context, thresholds: Thresholds, url: str | None) -> HealthReport:
    """HTTP (when a URL is given), this host's CPU and memory (unless --no-system-check), the database's sessions."""
    server = None
    if BY_NAME["db"].configured(ctx.settings):

        server = DbServer.from_settings(ctx.settings)
    return run_health(thresholds, url=url, server=server, system=not ctx.args.no_system_check)


# -- verify and drill ---------------------------------------------------------------------------------------


def cmd_verify(ctx: Context) -> Result:
    """verify: the three verifies and the health check, one report, one exit code."""
    runner = runner_for(ctx)
    configured = [c for c in PARTS if c.configured(ctx.settings)]
    if not configured:
        raise UsageError("none of CONFIG_DIR, DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set: nothing to verify")
    lines, data, codes = [], {}, []
    for component in configured:
        step = runner.run(component, "verify")
        codes.append(step.exit_code)
        problems = step.problems
        verdict = "OK" if step.ok else (count(len(problems), "problem") if step.exit_code == EXIT_VERIFY
                                        else f"could not verify: {step.error}")
        lines.append(f"{component.title}: {verdict}")
        lines += [f"  {problem}" for problem in problems]
        data[component.name] = {"exit_code": step.exit_code, "problems": step.data.get("problems", [])}
    health = _health(ctx, _thresholds(ctx), url=_health_url(ctx))
    lines += health.lines()
    data["health"] = health.to_json()
    code = EXIT_FAILED if any(c not in (0, EXIT_VERIFY) for c in codes) else (
        EXIT_VERIFY if any(codes) or not health.ok else 0)
    lines.insert(0, "verify: " + ("OK" if code == 0 else "problems found" if code == EXIT_VERIFY else "failed"))
    return Result(data, lines, exit_code=code, report=True)


def cmd_drill(ctx: Context) -> Result:
    """drill: the monthly test: restore the newest database backup aside, check the rest, time each against its RTO."""
    configured = [c.title for c in PARTS if c.configured(ctx.settings)]
    if ctx.dry_run:
        return Result({"dry_run": True, "components": configured},
                      [f"would drill: {', '.join(configured) or 'nothing (no component is configured)'}"], report=True)
    # The children get no --metrics-file: what a drill does to a scratch database is not production's state.
    with held_locks(ctx, "drill") as locks:
        database = BY_NAME["db"]
        if database.configured(ctx.settings):  # taken first: the drill waits for a restore, or a restore for it
            locks.take(open_store(ctx.settings, database).root / LOCK_FILE)
        report = run_drill(ctx.settings, ScriptRunner(env_file=ctx.args.env_file, locks=locks), ctx.info)
    return Result(report.to_json(), report.lines(), exit_code=report.exit_code, report=True)


# -- the command line ---------------------------------------------------------------------------------------


def add_health_arguments(sub: argparse.ArgumentParser) -> None:
    """The health check's URL and thresholds (defaults: HEALTH_* settings, else the runbook's)."""
    group = sub.add_argument_group("health check (defaults from HEALTHCHECK_URL and HEALTH_* settings)")
    group.add_argument("--health-url", metavar="URL",
                       help="send requests here and check errors and p95 time (http://user:password@... sends "
                            "basic authentication; the password is masked in the audit log)")
    group.add_argument("--max-error-rate", type=float, metavar="PCT", help="failed requests, percent (1)")
    group.add_argument("--max-p95-ms", type=float, metavar="MS", help="95th percentile response time (500)")
    group.add_argument("--max-cpu", type=float, metavar="PCT", help="CPU use, percent (80)")
    group.add_argument("--max-memory", type=float, metavar="PCT", help="memory use, percent (80)")
    group.add_argument("--health-requests", type=int, metavar="N", help="requests to send (20)")
    group.add_argument("--no-system-check", action="store_true",
                       help="leave out this host's CPU and memory (e.g. when it is not the application's host)")


def build_parser() -> argparse.ArgumentParser:
    """Every command of rollback.py."""
    parser, commands = make_parser(
        SCRIPT,
        "One restore point for configuration, code and database; rolled back in the runbook's order\n"
        "(configuration -> code -> database), each step verified.",
        "settings: those of the three scripts (a component is part of a point when CONFIG_DIR,\n"
        "  DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set), and POINTS_DIR=./restore_points,\n"
        "  PRE_RESTORE_HOOK, POST_RESTORE_HOOK (commands run without a shell, e.g. stop/start the app;\n"
        "  done when their process exits; stopped with all they started after HOOK_TIMEOUT_SECONDS=300),\n"
        "  LOCK_WAIT_SECONDS=30 (how long backup, restore and drill wait for the store locks they need),\n"
        "  HEALTHCHECK_URL and HEALTH_* thresholds, RTO_CONFIG_SECONDS=300, RTO_CODE_SECONDS=900,\n"
        "  RTO_DATABASE_SECONDS=1800\n\n"
        "examples:\n"
        f"  {SCRIPT} backup --label release-1.4\n"
        f"  {SCRIPT} restore latest --yes --health-url http://127.0.0.1:8080/health\n"
        f"  {SCRIPT} restore latest --only config,code --yes\n"
        f"  {SCRIPT} drill",
    )
    sub = add_command(commands, "backup", cmd_backup, "take a restore point of every configured component")
    add_backup_arguments(sub)
    sub = add_command(commands, "restore", cmd_restore, "restore a point: configuration, then code, then database",
                      "Changes nothing until it has checked the health URL, the thresholds and that each hook is\n"
                      "an executable file (else exit 2); taken every lock its steps need, the restore points' and\n"
                      "each component store's (waiting up to LOCK_WAIT_SECONDS, else exit 75), held to the last\n"
                      "step; and checked that every part is here (pulled if only off-host) and whole (checksums).\n"
                      "Runs PRE_RESTORE_HOOK, restores each component with its script (which saves what it\n"
                      "replaces first), verifies it, checks health, and stops at the first failure with the\n"
                      "commands that undo the steps already taken; then POST_RESTORE_HOOK and a last health\n"
                      "check. Each step's time is reported against its RTO.")
    sub.add_argument("point", metavar="POINT", help="a restore point id or `latest`")
    sub.add_argument("--only", metavar="LIST", help="a comma-separated subset of config,code,db")
    add_health_arguments(sub)
    sub = add_verify_command(commands, cmd_verify, "the three verifies and the health check, one exit code",
                             "Runs each configured component's verify and the health check: one report, exit 3\n"
                             "on any problem. --remote checks the restore points' copies on REMOTE_URL.")
    add_health_arguments(sub)
    add_command(commands, "drill", cmd_drill, "the monthly test of the procedures, timed against the RTOs",
                "Takes the database store's lock (waiting up to LOCK_WAIT_SECONDS, else exit 75), restores\n"
                "the newest database backup into a scratch database and verifies it, checks the\n"
                "newest configuration and code backups' checksums, drops the scratch database, and fails\n"
                "(exit 3) when a step misses its RTO.")
    add_store_commands(commands, cmd_cleanup, cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run rollback.py."""
    return run(build_parser(), POINTS, argv)


if __name__ == "__main__":
    sys.exit(main())
