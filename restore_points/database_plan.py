"""How a restore point's database part is put back: by rolling the schema back with the down migrations,
which keeps every row written since the point, or by restoring the point's dump (or, for a mark of the
pgbackrest engine, the whole cluster to it), which does not.

The schema rollback is the default whenever it is possible: the point recorded a migration version, that
version is applied, and every migration above it has a down file. The dump is restored only with
--restore-data or when no such path exists, and the plan then says how many rows it throws away.
"""

from __future__ import annotations

from dataclasses import dataclass

from backup_store.manifest import Backup
from common.errors import ToolkitError
from common.settings import Settings
from database.backup_info import DbBackupInfo
from database.context import DbContext
from database.marks import MarkInfo
from database.migration_rollback import plan_rollback
from database.migrations import current_id, discover, read_applied, refuse_dirty
from database.properties import read_properties
from database.restore import writes_lost
from database.row_counters import WritesReport

SCHEMA_ROLLBACK, DUMP_RESTORE, MARK_RESTORE = "schema rollback", "dump restore", "mark restore"


@dataclass
class DatabasePlan:
    """Which of the two the database step does, and why; for a dump restore, what it loses."""

    action: str  # SCHEMA_ROLLBACK, DUMP_RESTORE or MARK_RESTORE (the whole cluster, by pgBackRest)
    reason: str
    backup_id: str
    target: str | None  # the migration the point recorded (None: it recorded none)
    current: str | None  # the live database's migration now
    undone: list[str]  # the migrations a schema rollback undoes, newest first
    writes: WritesReport | None = None  # a dump restore's loss

    def step_args(self) -> list[str]:
        """What the database script is run with (plus --yes, or --dry-run for a preview)."""
        if self.action == SCHEMA_ROLLBACK:
            return ["rollback", self.target or "0"]
        return ["restore", self.backup_id]

    def lines(self) -> list[str]:
        """The plan for people, printed before anything changes."""
        if self.action == SCHEMA_ROLLBACK:
            what = (f"roll the schema back from {self.current} to {self.target} with the down migrations of "
                    + ", ".join(self.undone) if self.undone else f"the schema is already at {self.target}")
            return [f"database: {what}; every row written since the point is kept ({self.reason})"]
        if self.action == MARK_RESTORE:
            return [f"database: restore the whole cluster, every database in it, to the mark {self.backup_id} "
                    f"({self.reason}); its data directory now is set aside whole"]
        lines = [f"database: restore the dump of {self.backup_id} ({self.reason})"]
        return lines + (self.writes.lines() if self.writes else [])

    def to_dict(self) -> dict:
        """For --json."""
        return {"action": self.action, "reason": self.reason, "backup": self.backup_id, "target": self.target,
                "current": self.current, "undone": self.undone,
                "writes_since_backup": self.writes.to_dict() if self.writes else None}


def plan_database(settings: Settings, backup: Backup, restore_data: bool) -> DatabasePlan:
    """Choose between a schema rollback and a dump restore for the point's database backup."""
    db = DbContext.from_settings(settings)
    target = DbBackupInfo.load(backup).migration_version
    if read_properties(db.server, db.server.name) is None:
        return DatabasePlan(DUMP_RESTORE, f"{db.server.name} does not exist: nothing to roll back, nothing lost",
                            backup.id, target, None, [])
    try:
        applied = read_applied(db.server)  # refused when public.schema_migrations is another tool's
    except ToolkitError as unreadable:
        return _dump_restore(db, backup, f"no migration path back: {unreadable}", target, None)
    current = current_id(applied)
    if restore_data:
        return _dump_restore(db, backup, "--restore-data", target, current)
    if target is None:
        return _dump_restore(db, backup, "the point recorded no migration version, so no down migration leads "
                                         "back to it", target, current)
    try:
        migrations = discover(db.migrations_dir)
        refuse_dirty(applied, migrations, db.server.name)  # a half-run migration: no down file knows that schema
        plan = plan_rollback(migrations, applied, target)
    except ToolkitError as no_path:  # MissingDownFile, an unknown target, a dirty mark, no MIGRATIONS_DIR
        return _dump_restore(db, backup, f"no migration path back: {no_path}", target, current)
    reason = "--restore-data restores the dump instead"
    return DatabasePlan(SCHEMA_ROLLBACK, reason, backup.id, plan.target_id, plan.current_id,
                        [step.id for step in plan.steps])


def _dump_restore(db: DbContext, backup: Backup, reason: str, target: str | None, current: str | None
                  ) -> DatabasePlan:
    if MarkInfo.load(backup) is not None:  # pgBackRest takes the whole cluster back; no row counters to compare
        return DatabasePlan(MARK_RESTORE, reason, backup.id, target, current, [])
    return DatabasePlan(DUMP_RESTORE, reason, backup.id, target, current, [], writes_lost(db, backup))
