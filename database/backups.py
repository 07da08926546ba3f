"""Database backups: pg_dump into the store (the `backup` command, and the safety backup a destructive
command takes first), the `list` command, and the backup that leads back past a migration."""

from __future__ import annotations

import os
from collections.abc import Callable

from backup_store.manifest import Backup
from commands.store_commands import list_backups
from common.cli import Context, Result
from common.errors import UsageError
from common.progress import Progress, bytes_under, no_progress
from common.text import human_size
from database.backup_info import DbBackupInfo
from database.cluster_globals import globals_summary, keep_globals
from database.context import SCRIPT, DbContext
from database.dumps import ServerInfo, check_client_version, dump_into
from database.marks import mark_command
from database.migrations import read_current
from database.pgbackrest import engine
from database.row_counters import record_counters


def take_backup(db: DbContext, label: str | None, fmt: str = "custom", jobs: int = 1,
                compress: int | None = None, progress: Progress = no_progress, safety: bool = False,
                role_passwords: bool = False, *, warn: Callable[[str], None]) -> Backup:
    """pg_dump DB_NAME into a new store entry, with the cluster's roles and tablespaces (the caller holds the
    lock); a failing pg_dump leaves none."""
    info = ServerInfo.read(db.server)
    client = check_client_version(db.tools, info.major)
    with db.store.new_backup(label, name=db.server.name, safety=safety) as staging:
        staging.source, staging.extra = DbBackupInfo(
            host=os.uname().nodename, db_host=db.server.host, db_port=db.server.port, database=db.server.name,
            user=db.server.user, dump_format=fmt, server_version=info.version, pg_dump_version=client,
            database_size=info.database_size, migration_version=read_current(db.server)).dump()
        record_counters(staging, db.server)  # before the dump: what a restore later compares with
        with progress(f"dumping {db.server.name}", lambda: bytes_under(staging.path), None):
            dump_into(staging, db.server, db.tools, fmt, jobs, compress)
        keep_globals(staging, db.server, db.tools, role_passwords, warn)  # pg_dumpall --globals-only beside the dump
    return staging.backup


def backup_before(db: DbContext, version: int) -> Backup | None:
    """The newest backup taken when the database was below migration `version`: the way back past it."""
    for backup in db.store.backups():
        if not db.is_own(backup):
            continue
        number = DbBackupInfo.load(backup).migration_number
        if number is None or number < version:
            return backup
    return None


def backup_command(ctx: Context) -> Result:
    """backup: pg_dump DB_NAME into the store (--format, --jobs, --compress, --label); with DB_ENGINE=pgbackrest,
    a mark instead (database.marks)."""
    if engine(ctx.settings) == "pgbackrest":
        return mark_command(ctx)
    db = DbContext.from_settings(ctx.settings)
    args = ctx.args
    if args.full or args.incremental:
        raise UsageError("--full and --incremental take a pgBackRest backup: they need DB_ENGINE=pgbackrest")
    if args.format == "custom" and args.jobs > 1:
        raise UsageError("--jobs needs --format directory (pg_dump dumps in parallel only into a folder)")
    if ctx.dry_run:
        return Result({"dry_run": True, "database": db.server.name},
                      [f"would pg_dump {db.server.name} ({args.format} format) and pg_dumpall --globals-only "
                       f"({'with' if args.with_role_passwords else 'without'} role passwords) into {db.store.root}"],
                      report=True)
    with db.store.lock(f"{SCRIPT} backup"):
        backup = take_backup(db, args.label, args.format, args.jobs, args.compress, ctx.progress,
                             role_passwords=args.with_role_passwords, warn=ctx.warn)
    info = DbBackupInfo.load(backup)
    kept = {"kept": info.has_globals, "role_passwords": info.role_passwords}
    return Result({"backup": backup.summary(), "globals": kept},
                  [f"backup {backup.id}: {human_size(backup.size)}, migration "
                   f"{info.migration_version or '-'}, in {backup.path}", globals_summary(backup)],
                  backup_ids=[backup.id])


def list_command(ctx: Context) -> Result:
    """list: the backups, newest first, with the migration each was taken at."""
    return list_backups(DbContext.from_settings(ctx.settings).store,
                        {"MIGRATION": lambda b: DbBackupInfo.load(b).migration_version or "-"})
