"""The checks rollback.py runs on demand: verify (what is live now) and the drill (what is kept, restored aside)."""

from __future__ import annotations

from backup_store.store import LOCK_FILE
from common.cli import Context, Result
from common.components import DATABASE, PARTS
from common.errors import EXIT_FAILED, EXIT_VERIFY, UsageError
from common.text import count
from offsite.pull import open_store
from restore_points.command_setup import held_locks, runner_for
from restore_points.drill import run_drill
from restore_points.health_options import check_health, health_url, thresholds_for
from restore_points.steps import ScriptRunner


def verify_command(ctx: Context) -> Result:
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
    health = check_health(ctx, thresholds_for(ctx), url=health_url(ctx))
    lines += health.lines()
    data["health"] = health.to_json()
    code = EXIT_FAILED if any(c not in (0, EXIT_VERIFY) for c in codes) else (
        EXIT_VERIFY if any(codes) or not health.ok else 0)
    lines.insert(0, "verify: " + ("OK" if code == 0 else "problems found" if code == EXIT_VERIFY else "failed"))
    return Result(data, lines, exit_code=code, report=True)


def drill_command(ctx: Context) -> Result:
    """drill: the newest database backup restored aside, the rest checked, each timed against its RTO."""
    configured = [c.title for c in PARTS if c.configured(ctx.settings)]
    if ctx.dry_run:
        return Result({"dry_run": True, "components": configured},
                      [f"would drill: {', '.join(configured) or 'nothing (no component is configured)'}"], report=True)
    # The children get no --metrics-file: what a drill does to a scratch database is not production's state.
    with held_locks(ctx, "drill") as locks:
        if DATABASE.configured(ctx.settings):  # taken first: the drill waits for a restore, or a restore for it
            locks.take(open_store(ctx.settings, DATABASE).root / LOCK_FILE)
        report = run_drill(ctx.settings, ScriptRunner(env_file=ctx.args.env_file, locks=locks), ctx.info)
    return Result(report.to_json(), report.lines(), exit_code=report.exit_code, report=True)
