"""The monthly drill: the restore procedures tried for real, away from production, and timed against the RTOs.

The newest database backup is restored into a scratch database by database_rollback.py itself and
verified there; the newest configuration and code backups have every checksum checked. Each step's
time is set against its component's recovery time objective, and the scratch database is always dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backup_store.manifest import Backup, check_backup
from backup_store.store import BackupStore
from commands.rto import rto_for
from common.components import BY_NAME, PARTS, Component
from common.errors import EXIT_FAILED, EXIT_VERIFY
from common.settings import Settings
from database.backup_info import DbBackupInfo
from database.scratch import DRILLING, claimed, drop_database, scratch_name
from database.server import DbServer
from offsite.pull import open_store
from restore_points.steps import ScriptRunner

NO_METRICS = {"METRICS_FILE": ""}


@dataclass
class DrillStep:
    """One step of the drill and how long it took against its RTO."""

    component: str
    what: str
    seconds: float
    objective: float
    problems: list[str] = field(default_factory=list)
    failed: bool = False  # the step could not be done at all (as opposed to finding problems)

    @property
    def met(self) -> bool:
        """Within the RTO."""
        return self.seconds <= self.objective

    def to_json(self) -> dict:
        """For --json."""
        return {"component": self.component, "what": self.what, "seconds": round(self.seconds, 3),
                "rto_seconds": self.objective, "rto_met": self.met, "problems": self.problems,
                "failed": self.failed}


@dataclass
class DrillReport:
    """Every step, what was skipped, and the verdict."""

    steps: list[DrillStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when a step could not be done, 3 when one found a problem or missed its RTO, else 0."""
        if any(step.failed for step in self.steps):
            return EXIT_FAILED
        return EXIT_VERIFY if any(step.problems or not step.met for step in self.steps) else 0

    def to_json(self) -> dict:
        """For --json."""
        return {"steps": [step.to_json() for step in self.steps], "notes": self.notes,
                "rto_met": all(step.met for step in self.steps)}

    def lines(self) -> list[str]:
        """The drill's table and verdict, for people."""
        verdict = {0: "drill passed", EXIT_VERIFY: "drill FAILED: a check found a problem or an RTO was missed",
                   EXIT_FAILED: "drill FAILED: a step could not be done"}[self.exit_code]
        lines = [verdict]
        for step in self.steps:
            mark = "ok  " if step.met and not step.problems and not step.failed else "FAIL"
            lines.append(f"  {mark} {step.component:<8} {step.seconds:8.2f} s  (RTO {step.objective:g} s"
                         f"{', missed' if not step.met else ''})  {step.what}")
            lines += [f"         {problem}" for problem in step.problems]
        return lines + self.notes


def run_drill(settings: Settings, runner: ScriptRunner, info: Callable[[str], None]) -> DrillReport:
    """Run every step of the drill for the configured components."""
    report = DrillReport()
    for component in PARTS:
        if not component.configured(settings):
            report.notes.append(f"{component.title} skipped: none of {', '.join(component.configured_by)} is set")
            continue
        store = open_store(settings, component)
        objective = rto_for(settings, component.name)
        if component.name == "db":
            step = _database_step(settings, runner, store, objective, info)
        else:
            step = _checksum_step(component, store, objective)
        info(f"{component.title}: {step.what}: {step.seconds:.2f} s" + (f" ({step.problems[0]})" if step.problems
                                                                         else ""))
        report.steps.append(step)
    return report


def _checksum_step(component: Component, store: BackupStore, objective: float) -> DrillStep:
    started = time.monotonic()
    backup = store.latest()
    if backup is None:
        return DrillStep(component.name, "checksums of the newest backup", 0.0, objective,
                         [f"no {component.title} backups in {store.root}"], failed=True)
    problems = check_backup(backup)
    return DrillStep(component.name, f"checksums of {backup.id}", time.monotonic() - started, objective, problems)


def _database_step(settings: Settings, runner: ScriptRunner, store: BackupStore, objective: float,
                   info: Callable[[str], None]) -> DrillStep:
    server = DbServer.from_settings(settings)
    backup: Backup | None = store.latest(match=lambda b: DbBackupInfo.load(b).database == server.name)
    if backup is None:
        return DrillStep("db", "restore of the newest backup", 0.0, objective,
                         [f"no backups of {server.name} in {store.root}"], failed=True)
    scratch = scratch_name(server.name, DRILLING)
    db = BY_NAME["db"]
    what = f"restore of {backup.id} into {scratch}"
    info(f"database: restoring {backup.id} into the scratch database {scratch}")
    started = time.monotonic()
    # Claimed throughout: a drill killed part-way leaves databases that verify names and cleanup drops.
    with claimed(server, scratch):
        try:
            # METRICS_FILE emptied: a scratch restore must not pass for a restore of production in the metrics.
            restored = runner.run(db, "restore", backup.id, "--target-db", scratch, "--yes", env=NO_METRICS)
            if not restored.ok:
                return DrillStep("db", f"{what}, failed", time.monotonic() - started, objective,
                                 [f"restore failed: {restored.error}"], failed=True)
            verified = runner.run(db, "verify", env={**NO_METRICS, "DB_NAME": scratch})
            seconds = time.monotonic() - started
            problems = [p.strip() for p in verified.data.get("problems", [])]
            if not verified.ok and not problems:
                return DrillStep("db", f"{what}, verify failed", seconds, objective,
                                 [f"verify failed: {verified.error}"], failed=True)
            return DrillStep("db", f"{what}, {'verify found problems' if problems else 'verified'}", seconds,
                             objective, problems)
        finally:
            drop_database(server, scratch)
