#!/usr/bin/env python3
"""database_rollback.py: PostgreSQL backups (pg_dump), restores (pg_restore) and migration rollbacks.

The command line only: each command's work is in the database package."""

from __future__ import annotations

import sys

from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command
from common.cli import (
    Context,
    Result,
    add_backup_argument,
    add_backup_arguments,
    add_command,
    add_no_backup_argument,
    make_parser,
)
from common.components import DATABASE
from database.backups import backup_command, list_command
from database.changes import changes_command
from database.checks import verify_command
from database.cleanup import cleanup_command
from database.context import SCRIPT
from database.locks import locks_command
from database.migration_admin import baseline_command, force_command, repair_command
from database.migration_commands import SqlOption, migrate_command, rollback_command, status_command
from database.restore import restore_command

# -- the commands -----------------------------------------------------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: pg_dump DB_NAME into the store."""
    return backup_command(ctx)


def cmd_restore(ctx: Context) -> Result:
    """restore BACKUP: every check first, then a swap (or --in-place) restore that fails safe."""
    return restore_command(ctx)


def cmd_migrate(ctx: Context) -> Result:
    """migrate [TARGET]: apply pending migrations, after a backup."""
    return migrate_command(ctx)


def cmd_rollback(ctx: Context) -> Result:
    """rollback MIGRATION: undo every applied migration above it, in one transaction, after a backup."""
    return rollback_command(ctx)


def cmd_status(ctx: Context) -> Result:
    """status: applied and pending migrations, and applied files that changed since."""
    return status_command(ctx)


def cmd_baseline(ctx: Context) -> Result:
    """baseline VERSION: record VERSION and the migrations below it as applied, without running them."""
    return baseline_command(ctx)


def cmd_force(ctx: Context) -> Result:
    """force VERSION: set the recorded version and clear the dirty mark, without running anything."""
    return force_command(ctx)


def cmd_repair(ctx: Context) -> Result:
    """repair: re-record the checksums of applied files whose text changed."""
    return repair_command(ctx)


def cmd_verify(ctx: Context) -> Result:
    """verify [BACKUP]: the live database, and a backup's checksums and table of contents."""
    return verify_command(ctx)


def cmd_locks(ctx: Context) -> Result:
    """locks [--terminate PID]: blocked sessions and who blocks them, now."""
    return locks_command(ctx)


def cmd_changes(ctx: Context) -> Result:
    """changes BEFORE_DB: rows a kept database has that the live one lacks, or holds otherwise; --sql to copy them."""
    return changes_command(ctx)


def cmd_list(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_command(ctx)


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: old backups, and the databases restores and drills left behind."""
    return cleanup_command(ctx)


# -- the command line -------------------------------------------------------------------------------


def build_parser():
    """Every command of database_rollback.py."""
    parser, commands = make_parser(
        SCRIPT,
        "Back up, restore and roll back the PostgreSQL database DB_NAME.",
        "settings (environment, then .env, then defaults):\n"
        "  DB_HOST=localhost (a host, an address or a socket folder)  DB_PORT=5432  DB_NAME=ariesone\n"
        "  DB_USER=postgres  DB_PASSWORD  BACKUP_DIR=./backups  MIGRATIONS_DIR=./migrations\n"
        "  DB_LOCK_TIMEOUT=10 (seconds)  PG_BINDIR (folder of pg_dump/pg_restore; default: PATH)\n\n"
        "examples:\n"
        f"  {SCRIPT} backup --label before-release-1.4\n"
        f"  {SCRIPT} restore latest --yes\n"
        f"  {SCRIPT} restore /path/to/backup.dump --in-place --yes\n"
        f"  {SCRIPT} migrate\n"
        f"  {SCRIPT} migrate --sql > migrate.sql\n"
        f"  {SCRIPT} rollback 001_initial_schema --yes\n"
        f"  {SCRIPT} rollback --all --dry-run\n"
        f"  {SCRIPT} locks\n"
        f"  {SCRIPT} changes ariesone__before_20261123230501_1a2b3c --sql > salvage.sql\n"
        f"  {SCRIPT} cleanup 30 --keep 5",
    )
    sub = add_command(commands, "backup", cmd_backup, "pg_dump DB_NAME into the backup store",
                      "pg_dump DB_NAME, and pg_dumpall --globals-only (roles, memberships, their settings,\n"
                      "tablespaces; without passwords unless --with-role-passwords) into globals.sql beside it.\n"
                      "With DB_ENGINE=pgbackrest: a mark instead, whatever the size: `pgbackrest check` (refused,\n"
                      "nothing changed, when WAL archiving does not work), a pgBackRest backup when there is none\n"
                      "or the newest is older than PGBACKREST_MAX_AGE_HOURS (or with --full/--incremental), then\n"
                      "a named restore point recorded with its LSN, time and migration.")
    sub.add_argument("--format", choices=("custom", "directory"), default="custom",
                     help="custom (default): one .dump file plain pg_restore reads; directory: parallel dumps")
    sub.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel dump jobs (directory format)")
    sub.add_argument("--compress", type=int, choices=range(10), metavar="N", help="compression level 0-9")
    sub.add_argument("--with-role-passwords", action="store_true",
                     help="keep the roles' password hashes in globals.sql (mode 0600, as every backup file)")
    kind = sub.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true",
                      help="DB_ENGINE=pgbackrest: also take a full pgBackRest backup before the mark")
    kind.add_argument("--incremental", action="store_true",
                      help="DB_ENGINE=pgbackrest: also take an incremental pgBackRest backup before the mark")
    add_backup_arguments(sub)

    sub = add_command(
        commands, "restore", cmd_restore, "restore a backup or a plain pg_dump file",
        "Before anything is touched (a failed check is exit 1, nothing changed): the backup's checksums and\n"
        "`pg_restore --list`; DB_USER's privileges for the switch (CREATEDB, membership in the owner's\n"
        "role, ending the sessions on the live database); the live database's properties and subscriptions;\n"
        "and free space: the database's size (recorded with the backup, else the live one's, at least the\n"
        "dump's) on its tablespace's filesystem, and as much WAL (up to max_wal_size) on pg_wal's. Without\n"
        "the privileges to look, or run on another host than the server, the check is skipped with a warning.\n"
        "By default the dump is restored into a fresh database <name>__restore_<stamp>_<random>, given the\n"
        "live one's tablespace, locale, owner, grants, settings, connection limit, comment and template flag,\n"
        "then names are switched in one short step (new connections refused, sessions ended and counted,\n"
        "live renamed to <name>__before_<stamp>_<random>, restored renamed to live): the live name is out of\n"
        "service for well under a second, and the previous database is kept whole for an instant undo.\n"
        "Subscriptions are handed over: the restored database's copy takes up the same slot, the kept one lets\n"
        "go of it. The dump's own subscriptions are never restored. A failure before the switch drops what was\n"
        "built and names its first cause; a restore killed before the switch leaves its __restore_ database:\n"
        "`verify` names it, `cleanup` drops it. --in-place (for users without CREATEDB) first takes a backup,\n"
        "then runs pg_restore --clean --single-transaction; it needs as much space at its peak, and is refused\n"
        "for a database with subscriptions. Either way a failure leaves the live database as it was.\n"
        "A role the dump needs (an owner, a grantee) missing here is refused; --with-globals creates it.\n"
        "With DB_ENGINE=pgbackrest, BACKUP is a mark: the whole cluster goes back to it (every database in\n"
        "it): the server is stopped, PGDATA moved aside whole, pgBackRest restores to the mark's restore point\n"
        "and the server is started and promoted there; the output prints how to put the old PGDATA back.")
    add_backup_argument(sub, ", or a pg_dump archive made elsewhere (custom, directory or tar format; "
                             "a plain SQL dump is refused: restore it with psql)")
    sub.add_argument("--target-db", metavar="NAME",
                     help="restore into this database instead of DB_NAME (created if missing, else replaced)")
    sub.add_argument("--in-place", action="store_true", help="restore into the live database in one transaction")
    sub.add_argument("--with-globals", action="store_true",
                     help="first create the backup's roles, memberships and tablespaces missing here (superuser)")
    sub.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel pg_restore jobs (fresh database)")
    add_no_backup_argument(sub, "the database (--in-place)")

    sub = add_command(commands, "migrate", cmd_migrate, "apply pending migrations from MIGRATIONS_DIR",
                      "Applies <version>_<name>.up.sql files in version order, each in its own transaction with\n"
                      "its row in public.schema_migrations, after a backup (unless --no-backup). A file whose first\n"
                      "line is `-- rollback: no-transaction` runs alone, outside any transaction, its row marked\n"
                      "dirty until it has run. An advisory lock keeps two migrators apart.")
    sub.add_argument("target", metavar="TARGET", nargs="?", help="stop after this migration (id or version)")
    sub.add_argument("--allow-out-of-order", action="store_true",
                     help="also apply pending files older than the newest applied one")
    sub.add_argument("--sql", action=SqlOption, help="print the SQL as a psql script; change nothing")
    add_no_backup_argument(sub, "the database")

    sub = add_command(
        commands, "rollback", cmd_rollback, "roll back to a migration with the down scripts",
        "Runs the down scripts of every applied migration above MIGRATION (0 or --all: of every\n"
        "applied migration), newest first, and their tracking-table deletes in ONE transaction under\n"
        "lock_timeout, after a backup. On a lock timeout nothing changes and the blocking sessions are\n"
        "named. A down file whose first line is `-- rollback: no-transaction` runs on its own (the plan\n"
        "warns), its row marked dirty until it has run. A migration without a down file stops the rollback\n"
        "before anything changes, naming the backup to restore instead.")
    sub.add_argument("migration", metavar="MIGRATION", nargs="?",
                     help="an applied migration: id (001_initial_schema) or version; 0 for none (every one undone)")
    sub.add_argument("--all", action="store_true", help="roll back every applied migration (the same as 0)")
    sub.add_argument("--lock-timeout", type=int, metavar="SECONDS", help="lock_timeout (default DB_LOCK_TIMEOUT)")
    sub.add_argument("--terminate-blockers", action="store_true",
                     help="on a lock timeout, end the blocking sessions and try once more")
    sub.add_argument("--sql", action=SqlOption, help="print the SQL as a psql script; change nothing")
    add_no_backup_argument(sub, "the database")

    add_command(commands, "status", cmd_status, "applied and pending migrations, and changed files")
    sub = add_command(commands, "baseline", cmd_baseline, "adopt a database made without the toolkit",
                      "Records VERSION and every migration below it as applied, with their checksums, without\n"
                      "running them. Refused if anything is recorded already.")
    sub.add_argument("version", metavar="VERSION", help="the migration the schema is at (id or version)")
    sub = add_command(commands, "force", cmd_force, "set the recorded version after a failed migration",
                      "For a migration that failed part-way outside a transaction: after finishing or undoing it\n"
                      "by hand, records VERSION as current (rows above it removed) and clears the dirty mark.")
    sub.add_argument("version", metavar="VERSION", help="the migration the schema is at (id or version; 0: none)")
    add_command(commands, "repair", cmd_repair, "re-record the checksums of applied files that changed")

    sub = add_verify_command(commands, cmd_verify, "check the database and a backup (problems exit 3)",
                      "Connects and reports the server version; applied migrations must have unchanged files\n"
                      "and no dirty mark; no invalid indexes; no <name>__restore_ database left by a killed\n"
                      "restore (one a running restore is building is only noted); no enabled subscription in a\n"
                      "database a restore set aside; long transactions and lock waits are warned of; the newest\n"
                      "backup (or BACKUP) must pass its checksums and pg_restore --list.")
    sub.add_argument("backup", metavar="BACKUP", nargs="?", help="the backup to check (default: the newest)")

    sub = add_command(commands, "locks", cmd_locks, "blocked sessions and who blocks them")
    sub.add_argument("--terminate", type=int, metavar="PID", help="end this session")

    sub = add_command(commands, "changes", cmd_changes, "rows that differ from a database a restore kept",
                      "Compares BEFORE_DB (e.g. the <name>__before_... database a swap restore kept) with DB_NAME\n"
                      "table by table on the primary key, read only: counts, then rows only in either and rows that\n"
                      "differ. --sql prints INSERTs and UPDATEs that put the kept rows back (DELETEs commented out).")
    sub.add_argument("before_db", metavar="BEFORE_DB", help="the database to compare with the live one")
    sub.add_argument("--table", action="append", metavar="T",
                     help="only this table (schema.table or table; repeat it or give a comma list)")
    sub.add_argument("--sql", action="store_true", help="print the statements for psql instead of the rows")

    add_store_commands(commands, cmd_cleanup, cmd_list)
    commands.choices["cleanup"].description = (
        "Removes backups older than DAYS, keeping the newest --keep; drops <name>__before_ databases older\n"
        "than DAYS beyond the newest --keep; and drops every <name>__restore_ database a restore left when it\n"
        "was killed, but never one that a restore running now is still building. The subscriptions of a\n"
        "database it drops are dropped first, without touching their slots on the publisher (another\n"
        "subscription may stream from them); the report says whether one here still does.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run database_rollback.py."""
    return run(build_parser(), DATABASE, argv)


if __name__ == "__main__":
    sys.exit(main())
