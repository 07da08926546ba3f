"""Marks: the pre-deploy restore point of the pgbackrest engine (DB_ENGINE=pgbackrest).

A mark is a named restore point in the WAL (pg_create_restore_point), recorded as a store entry with its
LSN, its time and the schema version: it costs the same whatever the database's size, and pgBackRest can
bring the whole cluster back to exactly that point from a backup taken before it and the archived WAL. A
mark is made only once `pgbackrest check` says WAL reaches the repository, and after a new pgBackRest backup
when the newest is older than PGBACKREST_MAX_AGE_HOURS (or when asked for one).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields

from backup_store.manifest import Backup
from common.cli import Context, Result
from database.backup_info import DbBackupInfo
from database.context import SCRIPT, DbContext
from database.migrations import read_current
from database.pgbackrest import MAX_AGE_HOURS, ArchivingBroken, BackupSet, PgBackRest

MARK_ENGINE = "pgbackrest"  # a store entry's `engine`: a mark, not a dump


@dataclass(frozen=True)
class MarkInfo:
    """What a mark's store entry records (its manifest's keys beside the common ones)."""

    engine: str
    database: str  # DB_NAME when the mark was made; the restore brings back the whole cluster
    restore_point: str  # the name given to pg_create_restore_point: the entry's id
    lsn: str  # where the restore point is in the WAL
    marked_at: str  # the server's clock at the mark (ISO 8601)
    timeline: int
    stanza: str
    migration_version: str | None  # the newest applied migration's id, None before the first migrate
    pgbackrest_backup: str | None  # the label of the newest pgBackRest backup when the mark was made

    @classmethod
    def load(cls, backup: Backup) -> MarkInfo | None:
        """The mark a store entry records, None when it is a dump."""
        if backup.extra.get("engine") != MARK_ENGINE:
            return None
        return cls(**{field.name: backup.extra.get(field.name) for field in fields(cls)})

    def dump(self) -> dict:
        """The manifest keys of a new mark."""
        return asdict(self)


def backup_kind(backups: list[BackupSet], asked: str | None, max_age_hours: float = MAX_AGE_HOURS) -> str | None:
    """The pgBackRest backup to take before a mark, given the stanza's `backups`: `asked`, else full when there
    is none, else incremental when the newest is older than `max_age_hours`, else none."""
    if asked is not None:
        return asked
    if not backups:
        return "full"
    return "incr" if time.time() - backups[-1].stopped > max_age_hours * 3600 else None


def backup_set_gone(pgbackrest: PgBackRest, mark: MarkInfo) -> str | None:
    """Why the mark has no backup to restore from (the set it follows expired), None while it has one."""
    if mark.pgbackrest_backup in {backup.label for backup in pgbackrest.backups()}:
        return None
    return (f"the pgBackRest backup mark {mark.restore_point} follows, {mark.pgbackrest_backup}, is no longer in "
            "the repository (expired?): it cannot be restored")


def mark_problems(pgbackrest: PgBackRest, mark: MarkInfo) -> list[str]:
    """Why a mark could not be restored now: the pgBackRest backup it follows is gone (expired), or WAL does not
    reach the repository; none when it can."""
    gone = backup_set_gone(pgbackrest, mark)
    problems = [gone] if gone else []
    try:
        pgbackrest.check()
    except ArchivingBroken as exc:
        problems.append(str(exc))
    return problems


def take_mark(db: DbContext, pgbackrest: PgBackRest, label: str | None, kind: str | None,
              max_age_hours: float = MAX_AGE_HOURS) -> tuple[Backup, MarkInfo]:
    """Check archiving, take the pgBackRest backup wanted (see backup_kind), then the mark and its store entry
    (the caller holds the store's lock). Nothing is made when archiving is broken (ArchivingBroken)."""
    pgbackrest.check()
    backups = pgbackrest.backups()
    wanted = backup_kind(backups, kind, max_age_hours)
    if wanted is not None:
        pgbackrest.back_up(wanted)
        backups = pgbackrest.backups()  # the one just taken is the set the mark follows
    with db.store.new_backup(label, name=db.server.name) as staging:
        with db.server.session(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_create_restore_point(%s)::text, now()::text,"
                        " (SELECT timeline_id FROM pg_control_checkpoint())", (staging.backup_id,))
            lsn, marked_at, timeline = cur.fetchone()
            # The mark's WAL segment goes to the repository now, not when it fills: restorable at once.
            cur.execute("SELECT pg_switch_wal()")
        staging.source = DbBackupInfo(host=os.uname().nodename, db_host=db.server.host, db_port=db.server.port,
                                      database=db.server.name, user=db.server.user).dump()[0]
        info = MarkInfo(MARK_ENGINE, db.server.name, staging.backup_id, lsn, marked_at, timeline, pgbackrest.stanza,
                        read_current(db.server), backups[-1].label if backups else None)
        staging.extra = info.dump()
    return staging.backup, info


def mark_command(ctx: Context) -> Result:
    """backup, with DB_ENGINE=pgbackrest: a mark (and a pgBackRest backup when one is due or asked for)."""
    db = DbContext.from_settings(ctx.settings)
    pgbackrest = PgBackRest.from_settings(ctx.settings)
    kind = "full" if ctx.args.full else "incr" if ctx.args.incremental else None
    max_age = ctx.settings.number("PGBACKREST_MAX_AGE_HOURS", MAX_AGE_HOURS, minimum=0)
    if ctx.dry_run:
        return Result({"dry_run": True, "database": db.server.name, "engine": MARK_ENGINE},
                      [f"would run pgbackrest check, then mark {db.server.name}'s cluster with a restore point "
                       f"(stanza {pgbackrest.stanza})"], report=True)
    with db.store.lock(f"{SCRIPT} backup"):
        mark, info = take_mark(db, pgbackrest, ctx.args.label, kind, max_age)
    return Result({"backup": mark.summary(), "mark": info.dump()},
                  [f"mark {mark.id}: restore point at {info.lsn} ({info.marked_at}), migration "
                   f"{info.migration_version or '-'}, after pgBackRest backup {info.pgbackrest_backup}"],
                  backup_ids=[mark.id])

