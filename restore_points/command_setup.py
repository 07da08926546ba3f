"""What rollback.py's commands set up alike: the store of restore points, the runner of the component
scripts, and the store locks a run holds."""

from __future__ import annotations

from backup_store.locks import HeldLocks
from backup_store.store import BackupStore
from common.cli import Context
from common.components import POINTS
from common.errors import EXIT_LOCKED, LockBusy, ToolkitError
from common.settings import Settings
from offsite.pull import open_store
from restore_points.steps import ScriptRun, ScriptRunner

DEFAULT_LOCK_WAIT_SECONDS = 30.0


def points_store(settings: Settings) -> BackupStore:
    """The store of restore points: one manifest per point naming its three backups."""
    return open_store(settings, POINTS)


def runner_for(ctx: Context) -> ScriptRunner:
    """Component scripts run with the same --env-file and --metrics-file as this run."""
    return ScriptRunner(env_file=ctx.args.env_file, metrics_file=ctx.args.metrics_file)


def held_locks(ctx: Context, command: str) -> HeldLocks:
    """Locks for this run and the scripts it runs, each waited for up to LOCK_WAIT_SECONDS in all (then exit 75)."""
    wait = ctx.settings.number("LOCK_WAIT_SECONDS", DEFAULT_LOCK_WAIT_SECONDS, minimum=0)
    return HeldLocks(f"{POINTS.script} {command}", wait, ctx.info)


def step_failed(what: str, step: ScriptRun, consequence: str) -> ToolkitError:
    """The error for a failed script run: exit 75 when the script found its store locked, else exit 1."""
    error = LockBusy if step.exit_code == EXIT_LOCKED else ToolkitError
    return error(f"{what} failed: {step.error}; {consequence}")
