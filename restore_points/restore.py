"""Restoring a restore point: configuration, then code, then database, each verified, stopping at the first failure.

Whatever stops the run (a failed step, a failed verify, a hook, an error of the health check itself, SIGINT
or SIGTERM), the outcome says what was restored, what was not, and the commands that undo the steps
already taken, newest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backup_store.manifest import Backup
from backup_store.point_record import PointRecord
from commands.rto import RtoReport, rto_for
from common.components import Component
from common.errors import EXIT_FAILED, EXIT_VERIFY, Interrupted, ToolkitError
from common.hooks import HookFailed, HookRun
from common.settings import Settings
from common.text import count
from restore_points.health import HealthReport
from restore_points.hooks import Hooks
from restore_points.steps import ScriptRun, ScriptRunner, undo_commands, verify_args

# Between steps the application is expected to be unwell, so the check there is short: a few requests.
REQUESTS_BETWEEN_STEPS = 3


@dataclass
class Step:
    """One component put back: its restore, its verify, the health seen afterwards."""

    component: Component
    backup_id: str
    restore: ScriptRun
    verify: ScriptRun | None = None
    health: HealthReport | None = None

    @property
    def done_what(self) -> str:
        """What the step did, for the report."""
        if self.restore.args[:1] == ["rollback"]:
            if not self.restore.data.get("rolled_back"):
                return f"schema already at {self.restore.args[1]}, nothing to roll back, every row kept"
            return f"schema rolled back to {self.restore.args[1]} with the down migrations, every row kept"
        return f"restored {self.backup_id}"

    @property
    def seconds(self) -> float:
        """Restore plus verify: the time until the component is known to be back."""
        return self.restore.seconds + (self.verify.seconds if self.verify else 0.0)


@dataclass
class Outcome:
    """Everything the report needs."""

    point: Backup
    plan: list[Component]
    done: list[Step] = field(default_factory=list)
    failure: str | None = None
    exit_code: int = 0
    rtos: list[RtoReport] = field(default_factory=list)
    health: HealthReport | None = None
    undo: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hooks: list[HookRun] = field(default_factory=list)
    cut_off: Component | None = None  # stopped while its script ran: restored or not, nobody can say here
    failed_undo: list[str] = field(default_factory=list)  # what undoes the part of its step a failed step did

    def stop(self, what: str, exit_code: int) -> None:
        """Record why the run stopped. Once a step is done, exit 2 ("nothing changed") or 75 would be wrong."""
        self.failure = what
        self.exit_code = exit_code if not self.done or exit_code == EXIT_VERIFY else EXIT_FAILED

    def to_json(self) -> dict:
        """For --json."""
        restored = [s.component.name for s in self.done]
        return {
            "point": self.point.id,
            "restored": restored,
            "not_restored": [c.name for c in self.plan if c.name not in restored and c != self.cut_off],
            "cut_off": self.cut_off.name if self.cut_off else None,
            "failure": self.failure,
            "undo": self.undo,
            "rto": [report.to_json() for report in self.rtos],
            "steps": [{"component": s.component.name, "backup": s.backup_id, "restore": s.restore.data,
                       "verify": s.verify.data if s.verify else None, "seconds": round(s.seconds, 3),
                       "health": s.health.to_json() if s.health else None} for s in self.done],
            "health": self.health.to_json() if self.health else None,
            "hooks": [hook.to_json() for hook in self.hooks],
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """The report for people: the verdict first, the undo commands last."""
        restored = [s.component for s in self.done]
        if self.failure:
            lines = [f"STOPPED: {self.failure}"]
        else:
            lines = [f"restore point {self.point.id} restored: " + ", ".join(c.title for c in restored)]
        for step in self.done:
            lines.append(f"{step.component.title}: {step.done_what}, "
                         + ("verified" if step.verify and step.verify.ok else "NOT verified"))
            lines += [f"  problem: {problem}" for problem in (step.verify.problems if step.verify else [])]
        lines += [f"  {report.line()}" for report in self.rtos]
        lines += [hook.line() for hook in self.hooks]
        if self.health:
            lines += self.health.lines()
        if self.failure:
            lines.append("not restored: " + (", ".join(c.title for c in self.plan
                                                       if c not in restored and c != self.cut_off) or "nothing left"))
        lines += self.notes
        if self.undo:
            lines.append("to undo the steps already taken, in this order:" if self.failure
                         else "to undo this restore, in this order:")
            lines += [f"  {command}" for command in self.undo]
        return lines


def restore_point(point: Backup, plan: list[Component], settings: Settings, runner: ScriptRunner, hooks: Hooks,
                  health: Callable[[str | None, int | None], HealthReport], url: str | None,
                  info: Callable[[str], None], step_args: dict[str, list[str]]) -> Outcome:
    """Run PRE_RESTORE_HOOK, each component's step and verify in order, POST_RESTORE_HOOK, a last health check.

    `step_args` holds each component's script arguments (`restore BACKUP`, or the database's `rollback
    MIGRATION`). `health(url, requests)` runs the health check (url None: no HTTP part; requests None: the
    configured number). PRE_RESTORE_HOOK's failure is raised (nothing was restored); everything later is recorded.
    """
    outcome = Outcome(point, plan)
    pre = hooks.run("PRE_RESTORE_HOOK", "nothing was restored")
    outcome.hooks += [pre] if pre else []
    parts = PointRecord.load(point).parts
    current, finishing = plan[0], False
    try:
        for current in plan:
            # While a pre-restore hook holds the application down, its URL is only asked at the end.
            if not _restore_one(current, parts[current.name], step_args[current.name], runner, outcome, health,
                                None if hooks.pre else url, info):
                break
        else:
            finishing = True
            _finish(hooks, health, url, outcome)
    except (ToolkitError, KeyboardInterrupt) as exc:
        reason = str(exc) if isinstance(exc, ToolkitError) else str(Interrupted("interrupted by SIGINT"))
        outcome.stop(f"during the {current.title} step: {reason}", EXIT_FAILED)
        if current not in (s.component for s in outcome.done):
            _cut_off(outcome, current, parts[current.name], runner)
    outcome.rtos = [RtoReport(s.component.name, "restore", s.seconds, rto_for(settings, s.component.name))
                    for s in outcome.done]
    outcome.undo = outcome.failed_undo + [line for s in reversed(outcome.done)
                                          for line in undo_commands(s.restore, runner, settings)]
    if outcome.failure and hooks.pre and not finishing:
        outcome.notes.append("the application PRE_RESTORE_HOOK stopped has not been started again: "
                             + (f"POST_RESTORE_HOOK ({' '.join(hooks.post)}) did not run" if hooks.post
                                else "no POST_RESTORE_HOOK is set"))
    return outcome


def _cut_off(outcome: Outcome, component: Component, backup_id: str, runner: ScriptRunner) -> None:
    """A step stopped while its script ran may have finished its restore (its report was lost with it)."""
    outcome.cut_off = component
    check = runner.shell_line(component, *verify_args(component, backup_id))
    outcome.notes.append(f"the {component.title} step was cut off while its script ran: it may have been restored "
                         f"or not. `{check}` says which, and "
                         f"`{runner.shell_line(component, 'list')}` shows the safety backup it took, if it "
                         "took one (restore that to undo it)")


def _restore_one(component: Component, backup_id: str, args: list[str], runner: ScriptRunner, outcome: Outcome,
                 health: Callable[[str | None, int | None], HealthReport], url: str | None,
                 info: Callable[[str], None]) -> bool:
    """Restore and verify one component; False when the run must stop."""
    step = Step(component, backup_id, runner.run(component, *args, "--yes"))
    if not step.restore.ok:
        outcome.stop(f"{component.title} restore failed: {step.restore.error}", step.restore.exit_code)
        outcome.failed_undo = list(step.restore.data.get("undo_commands") or [])
        return False
    outcome.done.append(step)
    step.verify = runner.run(component, *verify_args(component, backup_id))
    if not step.verify.ok:
        problems = step.verify.problems
        found = (f"found {count(len(problems), 'problem')}: {problems[0]}"
                 + (" (all listed below)" if len(problems) > 1 else "")) if problems \
            else f"failed: {step.verify.error}"
        outcome.stop(f"{component.title} verify after the restore {found}", step.verify.exit_code)
        return False
    # Reported, not obeyed: the application is expected to be unwell until every step is done (that is
    # why it is being rolled back). The check after the last step and the post-restore hook decides.
    step.health = health(url, REQUESTS_BETWEEN_STEPS)
    info(f"{component.title}: restored and verified in {step.seconds:.1f} s; health "
         + ("ok" if step.health.ok else "not yet ok"))
    return True


def _finish(hooks: Hooks, health: Callable[[str | None, int | None], HealthReport], url: str | None,
            outcome: Outcome) -> None:
    try:
        post = hooks.run("POST_RESTORE_HOOK", "everything was restored; the application may not be running")
    except HookFailed as exc:
        outcome.hooks.append(exc.hook)
        outcome.stop(str(exc), EXIT_FAILED)
        return
    except ToolkitError as exc:
        outcome.stop(str(exc), EXIT_FAILED)
        return
    outcome.hooks += [post] if post else []
    outcome.health = health(url, None)
    if not outcome.health.ok:
        failed = "; ".join(check.line().strip() for check in outcome.health.checks if not check.ok)
        outcome.stop(f"every step is done, but the health check fails: {failed}", EXIT_VERIFY)
