#!/usr/bin/env python3
"""rollback.py: one restore point across configuration, code and database, rolled back in the runbook's order."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

from common.cli import Context, Result, add_command, add_label_argument, add_store_commands, make_parser, run
from common.commands import cleanup_backups, count, table
from common.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_VERIFY, LockBusy, ToolkitError, UsageError
from common.proc import run_tool
from common.settings import Settings
from common.store import Backup, BackupStore, format_time
from point_steps import BY_NAME, COMPONENTS, Component, ScriptRun, ScriptRunner, undo_commands

COMPONENT = "point"
STORE_SETTING = ("POINTS_DIR", "./restore_points")  # where the restore points (small manifests) live
SCRIPT = "rollback.py"


def points_store(settings: Settings) -> BackupStore:
    """The store of restore points: one manifest per point naming its three backups."""
    return BackupStore(settings.path(*STORE_SETTING), COMPONENT)


def runner_for(ctx: Context) -> ScriptRunner:
    """Component scripts run with the same --env-file and metrics file as this run."""
    return ScriptRunner(env_file=ctx.args.env_file)


def _step_failed(what: str, step: ScriptRun, consequence: str) -> ToolkitError:
    error = LockBusy if step.exit_code == EXIT_LOCKED else ToolkitError
    return error(f"{what} failed: {step.error}; {consequence}")


# -- backup and list ----------------------------------------------------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: a configuration, a code and a database backup under one restore point id and label."""
    configured = [c for c in COMPONENTS if c.configured(ctx.settings)]
    skipped = [c for c in COMPONENTS if c not in configured]
    if not configured:
        raise UsageError("none of CONFIG_DIR, DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set: nothing to back up")
    notes = [f"{c.title} skipped: none of {', '.join(c.settings)} is set" for c in skipped]
    if ctx.dry_run:
        return Result({"dry_run": True, "components": [c.name for c in configured]},
                      [f"would back up {', '.join(c.title for c in configured)}", *notes], report=True)
    runner, store = runner_for(ctx), points_store(ctx.settings)
    parts: dict[str, str] = {}
    with store.lock(f"{SCRIPT} backup"), store.new_backup(ctx.args.label) as staging:
        label = f"{ctx.args.label + ' ' if ctx.args.label else ''}(restore point {staging.backup_id})"
        for component in configured:
            step = runner.run(component, "backup", "--label", label)
            if not step.ok:
                taken = f" (the backups already taken are kept: {', '.join(parts.values())})" if parts else ""
                raise _step_failed(f"{component.title} backup", step, f"no restore point was made{taken}")
            parts[component.name] = step.data["backup"]["id"]
            ctx.info(f"{component.title}: {parts[component.name]}")
        staging.extra = {"parts": parts, "skipped": [c.name for c in skipped]}
    point = staging.backup
    lines = [f"restore point {point.id}: " + ", ".join(f"{BY_NAME[n].title} {i}" for n, i in parts.items()), *notes]
    return Result({"point": _describe(point)}, lines, backup_ids=[point.id, *parts.values()])


def _describe(point: Backup) -> dict:
    return {"id": point.id, "created_at": format_time(point.created_at), "label": point.label,
            "parts": point.extra.get("parts", {}), "skipped": point.extra.get("skipped", [])}


def cmd_list(ctx: Context) -> Result:
    """list: the restore points, newest first, with their three backups."""
    points = points_store(ctx.settings).backups()
    rows = [(p.id, format_time(p.created_at), *(p.extra.get("parts", {}).get(c.name, "-") for c in COMPONENTS),
             p.label or "") for p in points]
    lines = table(("POINT", "TIME (UTC)", "CONFIG", "CODE", "DATABASE", "LABEL"), rows) if rows else [
        f"no restore points in {points_store(ctx.settings).root}"]
    return Result({"points": [_describe(p) for p in points]}, lines, report=True)


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: remove restore points (not their backups) older than DAYS, keeping the newest --keep."""
    return cleanup_backups(ctx, points_store(ctx.settings), SCRIPT)


# -- restore --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One component put back: its restore, its verify, and the time both took against the RTO."""

    component: Component
    backup_id: str
    restore: ScriptRun
    verify: ScriptRun | None = None
    health: object | None = None  # the HealthReport taken after the step

    @property
    def seconds(self) -> float:
        """Restore plus verify: the time until the component is known to be back."""
        return self.restore.seconds + (self.verify.seconds if self.verify else 0.0)


def cmd_restore(ctx: Context) -> Result:
    """restore POINT: configuration, then code, then database, each verified, stopping at the first failure."""
    from common.rto import RtoReport, rto_for

    store = points_store(ctx.settings)
    point = store.resolve(ctx.args.point)
    if point.component != COMPONENT:
        raise UsageError(f"{ctx.args.point} is a {point.component} backup, not a restore point")
    parts = point.extra.get("parts", {})
    wanted = _only(ctx.args.only)
    plan = [c for c in COMPONENTS if c.name in parts and c.name in wanted]
    if not plan:
        raise UsageError(f"restore point {point.id} holds none of {', '.join(sorted(wanted))}")
    order = " -> ".join(f"{c.title} {parts[c.name]}" for c in plan)
    if ctx.dry_run:
        return Result({"dry_run": True, "point": _describe(point), "plan": [c.name for c in plan]},
                      [f"would restore, in this order: {order}"], report=True)
    ctx.confirm(f"Restore {order}?")
    runner, hooks = runner_for(ctx), Hooks.from_settings(ctx.settings)
    thresholds = _thresholds(ctx)
    hooks.run("PRE_RESTORE_HOOK", "nothing was restored")
    done: list[Step] = []
    failure: tuple[str, int] | None = None  # (what failed, exit code)
    for component in plan:
        backup_id = parts[component.name]
        step = Step(component, backup_id, runner.run(component, "restore", backup_id, "--yes"))
        if not step.restore.ok:
            failure = (f"{component.title} restore failed: {step.restore.error}", step.restore.exit_code)
            break
        done.append(step)
        step.verify = runner.run(component, *component.verify_args(backup_id))
        if not step.verify.ok:
            failure = (f"{component.title} verify after the restore: {step.verify.error}", step.verify.exit_code)
            break
        # Health after each step is reported, not obeyed: the application is expected to be unwell until
        # every step is done (that is why it is being rolled back), and stopped while a pre-restore hook
        # holds it down. The check after the last step and the post-restore hook decides.
        step.health = _health(ctx, thresholds, url=None if hooks.pre else _health_url(ctx))
        ctx.info(f"{component.title}: restored and verified in {step.seconds:.1f} s; health "
                 + ("ok" if step.health.ok else "not yet ok"))
    health = None
    if failure is None:
        try:
            hooks.run("POST_RESTORE_HOOK", "everything was restored; the application may not be running")
        except ToolkitError as exc:
            failure = (str(exc), EXIT_FAILED)
        else:
            health = _health(ctx, thresholds, url=_health_url(ctx))
            if not health.ok:
                failure = ("every step is done, but the health check fails: "
                           + "; ".join(c.line().strip() for c in health.checks if not c.ok), EXIT_VERIFY)
    rtos = [RtoReport(s.component.name, "restore", s.seconds, rto_for(ctx.settings, s.component.name)) for s in done]
    return _restore_report(point, plan, done, failure, rtos, health, runner)


def _restore_report(point: Backup, plan: list[Component], done: list[Step], failure: tuple[str, int] | None,
                    rtos: list, health, runner: ScriptRunner) -> Result:
    restored = [s.component for s in done]
    not_restored = [c for c in plan if c not in restored]
    undo = [line for s in reversed(done) for line in undo_commands(s.restore, runner)]
    lines = [f"{s.component.title}: restored {s.backup_id}, "
             + ("verified" if s.verify and s.verify.ok else "NOT verified") for s in done]
    lines += [f"  {report.line()}" for report in rtos]
    if health is not None:
        lines += health.lines()
    if failure:
        lines.insert(0, f"STOPPED: {failure[0]}")
        lines.append("not restored: " + (", ".join(c.title for c in not_restored) or "nothing left"))
        if undo:
            lines.append("to undo the steps already taken, in this order:")
            lines += [f"  {command}" for command in undo]
    else:
        lines.insert(0, f"restore point {point.id} restored: " + ", ".join(c.title for c in restored))
    data = {
        "point": point.id,
        "restored": [c.name for c in restored],
        "not_restored": [c.name for c in not_restored],
        "failure": failure[0] if failure else None,
        "undo": undo,
        "rto": [report.to_json() for report in rtos],
        "steps": [{"component": s.component.name, "backup": s.backup_id, "restore": s.restore.data,
                   "verify": s.verify.data if s.verify else None, "seconds": round(s.seconds, 3),
                   "health": s.health.to_json() if s.health is not None else None} for s in done],
        "health": health.to_json() if health is not None else None,
    }
    return Result(data, lines, exit_code=failure[1] if failure else 0,
                  backup_ids=[point.id, *(s.restore.data.get("safety_backup") for s in done
                                          if s.restore.data.get("safety_backup"))])


def _only(text: str | None) -> set[str]:
    if not text:
        return set(BY_NAME)
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(BY_NAME)
    if unknown:
        raise UsageError(f"--only: unknown component {', '.join(sorted(unknown))}; use config, code, db")
    return names


@dataclass
class Hooks:
    """PRE_RESTORE_HOOK and POST_RESTORE_HOOK: commands (no shell) around a restore, e.g. stop and start the app."""

    pre: list[str] | None
    post: list[str] | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Hooks:
        """Each hook is split like a shell would split it, but never run by one."""
        def split(name: str) -> list[str] | None:
            value = settings.text(name)
            if value is None:
                return None
            try:
                return shlex.split(value) or None
            except ValueError as exc:
                raise UsageError(f"{name} cannot be split into a command: {exc}") from None

        return cls(split("PRE_RESTORE_HOOK"), split("POST_RESTORE_HOOK"))

    def run(self, name: str, consequence: str) -> None:
        """Run one hook; a failure stops the rollback with a line saying where it stands."""
        argv = self.pre if name == "PRE_RESTORE_HOOK" else self.post
        if argv is None:
            return
        done = run_tool(argv, name, check=False)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise ToolkitError(f"{name} ({shlex.join(argv)}) failed: {tail[0]}; {consequence}")


# -- health -----------------------------------------------------------------------------------------------


def _thresholds(ctx: Context):
    from common.health import Thresholds

    args = ctx.args
    return Thresholds.from_settings(ctx.settings, max_error_rate_percent=args.max_error_rate,
                                    max_p95_ms=args.max_p95_ms, max_cpu_percent=args.max_cpu,
                                    max_memory_percent=args.max_memory, requests=args.health_requests)


def _health_url(ctx: Context) -> str | None:
    return ctx.args.health_url or ctx.settings.text("HEALTHCHECK_URL")


def _health(ctx: Context, thresholds, url: str | None):
    from common.health import run_health

    server = None
    if BY_NAME["db"].configured(ctx.settings):
        from db_server import DbServer

        server = DbServer.from_settings(ctx.settings)
    return run_health(thresholds, url=url, server=server, system=True)


# -- verify and drill ---------------------------------------------------------------------------------------


def cmd_verify(ctx: Context) -> Result:
    """verify: the three verifies and the health check, one report, one exit code."""
    runner = runner_for(ctx)
    configured = [c for c in COMPONENTS if c.configured(ctx.settings)]
    if not configured:
        raise UsageError("none of CONFIG_DIR, DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set: nothing to verify")
    lines, data, codes = [], {}, []
    for component in configured:
        step = runner.run(component, "verify")
        codes.append(step.exit_code)
        problems = step.data.get("problems", [])
        verdict = "OK" if step.ok else (count(len(problems), "problem") if step.exit_code == EXIT_VERIFY
                                        else f"could not verify: {step.error}")
        lines.append(f"{component.title}: {verdict}")
        lines += [f"  {problem.strip()}" for problem in problems]
        data[component.name] = {"exit_code": step.exit_code, "problems": problems}
    health = _health(ctx, _thresholds(ctx), url=_health_url(ctx))
    lines += health.lines()
    data["health"] = health.to_json()
    code = EXIT_FAILED if any(c not in (0, EXIT_VERIFY) for c in codes) else (
        EXIT_VERIFY if any(codes) or not health.ok else 0)
    lines.insert(0, "verify: " + ("OK" if code == 0 else "problems found" if code == EXIT_VERIFY else "failed"))
    return Result(data, lines, exit_code=code, report=True)


def cmd_drill(ctx: Context) -> Result:
    """drill: the monthly test: restore the newest database backup aside, check the rest, time each against its RTO."""
    from drill import run_drill

    report = run_drill(ctx.settings, runner_for(ctx), ctx.info)
    return Result(report.to_json(), report.lines(), exit_code=report.exit_code, report=True)


# -- the command line ---------------------------------------------------------------------------------------


def add_health_arguments(sub: argparse.ArgumentParser) -> None:
    """The health check's URL and thresholds (defaults: HEALTH_* settings, else the runbook's)."""
    group = sub.add_argument_group("health check (defaults from HEALTHCHECK_URL and HEALTH_* settings)")
    group.add_argument("--health-url", metavar="URL", help="send requests here and check errors and p95 time")
    group.add_argument("--max-error-rate", type=float, metavar="PCT", help="failed requests, percent (1)")
    group.add_argument("--max-p95-ms", type=float, metavar="MS", help="95th percentile response time (500)")
    group.add_argument("--max-cpu", type=float, metavar="PCT", help="CPU use, percent (80)")
    group.add_argument("--max-memory", type=float, metavar="PCT", help="memory use, percent (80)")
    group.add_argument("--health-requests", type=int, metavar="N", help="requests to send (20)")


def build_parser() -> argparse.ArgumentParser:
    """Every command of rollback.py."""
    parser, commands = make_parser(
        SCRIPT,
        "One restore point for configuration, code and database; rolled back in the runbook's order\n"
        "(configuration -> code -> database), each step verified.",
        "settings: those of the three scripts (a component is part of a point when CONFIG_DIR,\n"
        "  DEPLOYMENT_DIR/REPO_PATH or DB_NAME is set), and POINTS_DIR=./restore_points,\n"
        "  PRE_RESTORE_HOOK, POST_RESTORE_HOOK (commands run without a shell, e.g. stop/start the app),\n"
        "  HEALTHCHECK_URL and HEALTH_* thresholds, RTO_CONFIG_SECONDS=300, RTO_CODE_SECONDS=900,\n"
        "  RTO_DATABASE_SECONDS=1800\n\n"
        "examples:\n"
        f"  {SCRIPT} backup --label release-1.4\n"
        f"  {SCRIPT} restore latest --yes --health-url http://127.0.0.1:8080/health\n"
        f"  {SCRIPT} restore latest --only config,code --yes\n"
        f"  {SCRIPT} drill",
    )
    sub = add_command(commands, "backup", cmd_backup, "take a restore point of every configured component")
    add_label_argument(sub)
    sub = add_command(commands, "restore", cmd_restore, "restore a point: configuration, then code, then database",
                      "Runs PRE_RESTORE_HOOK, restores each component with its script (which saves what it\n"
                      "replaces first), verifies it, checks health, and stops at the first failure with the\n"
                      "commands that undo the steps already taken; then POST_RESTORE_HOOK and a last health\n"
                      "check. Each step's time is reported against its RTO.")
    sub.add_argument("point", metavar="POINT", help="a restore point id or `latest`")
    sub.add_argument("--only", metavar="LIST", help="a comma-separated subset of config,code,db")
    add_health_arguments(sub)
    sub = add_command(commands, "verify", cmd_verify, "the three verifies and the health check, one exit code")
    add_health_arguments(sub)
    add_command(commands, "drill", cmd_drill, "the monthly test of the procedures, timed against the RTOs",
                "Restores the newest database backup into a scratch database and verifies it, checks the\n"
                "newest configuration and code backups' checksums, drops the scratch database, and fails\n"
                "(exit 3) when a step misses its RTO.")
    add_store_commands(commands, cmd_cleanup, cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run rollback.py."""
    return run(build_parser(), COMPONENT, STORE_SETTING, argv)


if __name__ == "__main__":
    sys.exit(main())
