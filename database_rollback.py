#!/usr/bin/env python3
"""database_rollback.py: PostgreSQL backups (pg_dump), restores (pg_restore) and migration rollbacks."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backup_store.manifest import Backup, check_backup
from backup_store.store import BackupStore, refuse_damaged, resolve_component
from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command, cleanup_backups, list_backups
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
from common.errors import ToolkitError, UsageError
from common.progress import Progress, bytes_under, no_progress
from common.settings import Settings
from common.text import count, human_size, table
from database import migrations as db_migrations
from database import sessions as db_sessions
from database.backup_info import DbBackupInfo
from database.checks import database_problems
from database.dumps import (
    PgTools,
    ServerInfo,
    check_client_version,
    dump_entries,
    dump_into,
    dump_path,
    dump_size,
    foreign_dump,
    restore_into,
    subscriptions_in,
    undo_hint,
    with_full_disk_named,
)
from database.migrate import migrate
from database.migration_rollback import MissingDownFile, plan_rollback, run_rollback
from database.properties import read_properties
from database.scratch import (
    CLAIMED,
    KEPT_ROLES,
    being_built,
    drop_database,
    drop_if_unclaimed,
    scratch_databases,
)
from database.server import MAINTENANCE_DB, DbServer
from database.space import SpaceCheck, refuse_if_short, restore_space
from database.subscriptions import refuse_in_place, undo_statements
from database.swap import SwapOutcome, SwapPlan, plan_swap, restore_into_fresh_database
from offsite.pull import open_store

SCRIPT = "database_rollback.py"


@dataclass
class DbContext:
    """The server, the store, the tools and the migrations folder, from the settings."""

    server: DbServer
    store: BackupStore
    tools: PgTools
    migrations_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> DbContext:
        """DB_*, BACKUP_DIR (./backups), MIGRATIONS_DIR (./migrations), PG_BINDIR (PATH if unset)."""
        return cls(
            server=DbServer.from_settings(settings),
            store=open_store(settings, DATABASE),
            tools=PgTools(settings.path("PG_BINDIR")),
            migrations_dir=settings.path("MIGRATIONS_DIR", "./migrations"),
        )

    def is_own(self, backup: Backup) -> bool:
        """Whether a backup is of DB_NAME (one BACKUP_DIR may hold backups of several databases)."""
        return DbBackupInfo.load(backup).database == self.server.name


# -- the work ---------------------------------------------------------------------------------------


def take_backup(db: DbContext, label: str | None, fmt: str = "custom", jobs: int = 1,
                compress: int | None = None, progress: Progress = no_progress, safety: bool = False) -> Backup:
    """pg_dump DB_NAME into a new store entry (the caller holds the lock); a failing pg_dump leaves none."""
    info = ServerInfo.read(db.server)
    client = check_client_version(db.tools, info.major)
    with db.store.new_backup(label, name=db.server.name, safety=safety) as staging:
        staging.source, staging.extra = DbBackupInfo(
            host=socket.gethostname(), db_host=db.server.host, db_port=db.server.port, database=db.server.name,
            user=db.server.user, dump_format=fmt, server_version=info.version, pg_dump_version=client,
            database_size=info.database_size, migration_version=current_migration(db)).dump()
        with progress(f"dumping {db.server.name}", lambda: bytes_under(staging.path), None):
            dump_into(staging, db.server, db.tools, fmt, jobs, compress)
    return staging.backup


def current_migration(db: DbContext) -> str | None:
    """The newest applied migration's id, or None (no tracking table yet)."""
    with db.server.session() as conn:
        return db_migrations.current_id(db_migrations.applied(conn))


def applied_migrations(db: DbContext) -> list:
    """The rows of public.schema_migrations (empty before the first migrate)."""
    with db.server.session() as conn:
        return db_migrations.applied(conn)


def backup_before(db: DbContext, version: int) -> Backup | None:
    """The newest backup taken when the database was below migration `version`: the way back past it."""
    for backup in db.store.backups():
        if not db.is_own(backup):
            continue
        number = DbBackupInfo.load(backup).migration_number
        if number is None or number < version:
            return backup
    return None


# -- the commands -----------------------------------------------------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: pg_dump DB_NAME into the store."""
    db = DbContext.from_settings(ctx.settings)
    args = ctx.args
    if args.format == "custom" and args.jobs > 1:
        raise UsageError("--jobs needs --format directory (pg_dump dumps in parallel only into a folder)")
    if ctx.dry_run:
        return Result({"dry_run": True, "database": db.server.name},
                      [f"would pg_dump {db.server.name} ({args.format} format) into {db.store.root}"], report=True)
    with db.store.lock(f"{SCRIPT} backup"):
        backup = take_backup(db, args.label, args.format, args.jobs, args.compress, ctx.progress)
    return Result({"backup": backup.summary()},
                  [f"backup {backup.id}: {human_size(backup.size)}, migration "
                   f"{DbBackupInfo.load(backup).migration_version or '-'}, in {backup.path}"], backup_ids=[backup.id])


def cmd_restore(ctx: Context) -> Result:
    """restore BACKUP: checksums, the dump's table of contents, privileges, properties, subscriptions and free
    space first, then a restore that fails safe."""
    db = DbContext.from_settings(ctx.settings)
    args = ctx.args
    own_database = db.is_own  # `latest` means the newest backup of DB_NAME, also with --target-db
    if args.target_db:
        db = replace(db, server=replace(db.server, name=args.target_db))
    mode = "in place" if args.in_place else "into a fresh database, then switched in"
    if ctx.dry_run:
        backup, dump, entries = _restore_source(ctx, db, own_database)
        plan, space = _preflight(db, backup, dump, args)
        source = backup.id if backup else str(dump)
        return Result({"source": source, "database": db.server.name, "dump_entries": len(entries), "dry_run": True,
                       "mode": "in-place" if args.in_place else "swap", "space": space.to_dict(),
                       "subscriptions": [s.name for s in plan.subscriptions] if plan else []},
                      [f"would restore {source} ({len(entries)} entries) over {db.server.name}, {mode}",
                       *space.lines()], report=True)
    lines = []
    # From resolving the backup to the switch, under the lock: a cleanup cannot remove it meanwhile.
    with db.store.lock(f"{SCRIPT} restore"):
        backup, dump, entries = _restore_source(ctx, db, own_database)
        plan, space = _preflight(db, backup, dump, args)  # before the first change: refused, nothing changed
        for line in space.lines():
            (ctx.warn if space.unchecked else ctx.info)(line)
        source = backup.id if backup else str(dump)
        data = {"source": source, "database": db.server.name, "mode": "in-place" if args.in_place else "swap",
                "dump_entries": len(entries), "space": space.to_dict()}
        ids = [backup.id] if backup else []
        ctx.confirm(f"Replace database {db.server.name} with {source}?")
        if args.in_place:
            if not args.no_backup:
                safety = take_backup(db, f"before restore of {source}", progress=ctx.progress, safety=True)
                ids.append(safety.id)
                lines.append(f"saved the current database as {safety.id}; to undo: {SCRIPT} restore {safety.id}")
            with ctx.progress(f"restoring {db.server.name} in place", lambda: -1, None):
                try:
                    restore_into(db.server, db.tools, dump, db.server.name, 1, single_transaction=True, clean=True)
                except ToolkitError as exc:
                    raise with_full_disk_named(exc, space.full_now() or "the server's disk") from None
            data["safety_backup"] = ids[-1] if not args.no_backup else None
        else:
            expected = DbBackupInfo.load(backup).database_size if backup else None
            outcome = restore_into_fresh_database(db.server, db.tools, plan, dump, args.jobs, expected, space,
                                                  ctx.progress)
            data.update(previous_database=outcome.before, outage_seconds=round(outcome.outage, 3),
                        sessions_ended=outcome.sessions_ended, transactions_ended=outcome.transactions_ended,
                        subscriptions_handed_over=outcome.subscriptions)
            if outcome.subscriptions:
                first, then = undo_statements(db.server.name, plan.subscriptions)
                data["undo_subscriptions"] = {"before_renames": first, "after_renames": then}
            lines += _swap_lines(db.server, outcome, data.get("undo_subscriptions"))
            for warning in outcome.warnings:
                ctx.warn(warning)
        skipped = subscriptions_in(entries)
        if skipped:
            lines.append(f"the dump's subscriptions ({', '.join(skipped)}) were not restored: they name the live "
                         "database's replication slot (a swap hands the live database's own over)")
    lines.insert(0, f"restored {source} into {db.server.name} ({mode})")
    return Result({**data, "restored": True}, lines, backup_ids=ids)


def _preflight(db: DbContext, backup: Backup | None, dump: Path, args) -> tuple[SwapPlan | None, SpaceCheck]:
    """What must hold before a restore's first change, checked in that order: the swap's privileges,
    properties and subscriptions (or, in place, no subscriptions), then free space. Any failure refuses."""
    if args.in_place:
        plan = None
        refuse_in_place(db.server, db.server.name)
        live = read_properties(db.server, db.server.name)
    else:
        plan = plan_swap(db.server)
        live = plan.live
    dump_bytes = dump_size(dump)
    recorded = DbBackupInfo.load(backup).database_size if backup else None
    safety_folder = db.store.root if args.in_place and not args.no_backup else None
    space = restore_space(db.server, db.server.name, live.tablespace if live else "pg_default", recorded,
                          dump_bytes, safety_folder)
    refuse_if_short(db.server, space, args.in_place, dump_bytes)
    return plan, space


def _swap_lines(server: DbServer, outcome: SwapOutcome, undo_subscriptions: dict | None) -> list[str]:
    """What a swap did, and how to undo it, for the report."""
    if outcome.before is None:
        return [f"{server.name} did not exist: it was created (no database was replaced, so none is kept)"]
    if not outcome.sessions_ended:
        sessions = "no session was connected to it"
    elif outcome.transactions_ended:
        sessions = (f"ended {count(outcome.sessions_ended, 'session')} on it, {outcome.transactions_ended} of them "
                    "in an open transaction (rolled back)")
    else:
        sessions = f"ended {count(outcome.sessions_ended, 'session')} on it, none in an open transaction"
    lines = [f"the previous database is kept as {outcome.before} ({server.name} was out of service for "
             f"{outcome.outage * 1000:.0f} ms); {sessions}"]
    if outcome.subscriptions:
        lines.append(f"handed the subscriptions {', '.join(outcome.subscriptions)} over to the restored database: "
                     "they go on from their slots where the replaced database's stopped (what they received "
                     "since the backup was taken is not in the restored data)")
    lines.append(undo_hint(server, outcome.before))
    if undo_subscriptions:
        lines.append(f"with the undo, hand the subscriptions back: connected to {server.name}, before the renames: "
                     + "; ".join(undo_subscriptions["before_renames"]) + f"; connected to {server.name} again after "
                     "them: " + "; ".join(undo_subscriptions["after_renames"]) + ";")
    return lines


def _restore_source(ctx: Context, db: DbContext, own_database) -> tuple[Backup | None, Path, list[str]]:
    """The backup (None for a dump made outside the toolkit), its dump, and the dump's entries, all checked."""
    ref = ctx.args.backup
    # `latest` and backup ids are the store's, even if a file of that name happens to be in the folder.
    in_store = ref == "latest" or ("/" not in ref and (db.store.root / ref).exists())
    dump = None if in_store else foreign_dump(ref)
    backup = None
    if dump is None:
        backup = resolve_component(db.store, ctx.args.backup, match=own_database)
        if not own_database(backup) and not ctx.args.target_db:
            raise UsageError(f"backup {backup.id} is of database {DbBackupInfo.load(backup).database!r}, not "
                             f"{db.server.name!r}: pass --target-db {db.server.name} to restore it there anyway")
        refuse_damaged(backup)
        dump = dump_path(backup)
    else:
        ctx.warn(f"{dump} was not made by this toolkit: there is no checksum to check")
    return backup, dump, dump_entries(db.server, db.tools, dump)


def cmd_list(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_backups(DbContext.from_settings(ctx.settings).store,
                        {"MIGRATION": lambda b: DbBackupInfo.load(b).migration_version or "-"})


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: remove backups older than DAYS, old `__before_` databases beyond the newest --keep, and
    the `__restore_` and `__drill_` databases of runs that did not finish (not those of a run going on now)."""
    db = DbContext.from_settings(ctx.settings)
    # The server first: if it cannot be reached, nothing is removed and the next run tries again.
    cutoff = datetime.now(UTC) - timedelta(days=ctx.args.days)
    with db.server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        scratch = scratch_databases(cur, db.server.name)
        building = being_built(cur, [s.name for s in scratch if s.role in CLAIMED])
    kept = sorted((s for s in scratch if s.role in KEPT_ROLES), key=lambda s: s.made, reverse=True)
    old = [s.name for s in kept[max(ctx.args.keep, 1):] if s.made < cutoff]
    leftovers = [s.name for s in scratch if s.role in CLAIMED and s.name not in building]
    result = cleanup_backups(ctx, db.store, SCRIPT)
    result.lines += [f"kept database {name}: a run going on now is building it" for name in sorted(building)]
    if ctx.dry_run:
        result.data["would_drop_databases"] = old + leftovers
        result.lines += [f"would drop database {name}" for name in old + leftovers]
        return result
    notes: list[str] = []
    with db.store.lock(f"{SCRIPT} cleanup"):
        for name in old:
            notes += drop_database(db.server, name)
        dropped_leftovers = []
        for name in leftovers:
            dropped = drop_if_unclaimed(db.server, name)
            if dropped is not None:
                dropped_leftovers.append(name)
                notes += dropped
    result.data["dropped_databases"] = old + dropped_leftovers
    result.data["subscriptions_dropped"] = notes
    result.lines += [f"dropped database {name} (kept by an earlier restore)" for name in old]
    result.lines += [f"dropped database {name} (left by a restore or drill that did not finish)"
                     for name in dropped_leftovers]
    result.lines += notes
    return result


def cmd_migrate(ctx: Context) -> Result:
    """migrate [TARGET]: apply pending migrations, after a backup tagged with the current version."""
    db = DbContext.from_settings(ctx.settings)
    migrations = db_migrations.discover(db.migrations_dir)
    state = db_migrations.status(migrations, applied_migrations(db))
    pending = [ident for ident in state["pending"]
               if ctx.args.target is None or _version(ident) <= _version(ctx.args.target)]
    if ctx.args.target is not None:
        db_migrations.find(migrations, [], ctx.args.target)  # a malformed or unknown target: exit 2
    if not pending:
        return Result({"applied": [], "current": state["current"]},
                      [f"nothing to apply: {db.server.name} is at {state['current'] or 'no migration'}"])
    if ctx.dry_run:
        return Result({"dry_run": True, "pending": pending}, [f"would apply {ident}" for ident in pending],
                      report=True)
    ids = []
    with db.store.lock(f"{SCRIPT} migrate"):
        if not ctx.args.no_backup:
            ids.append(take_backup(db, f"before migrate to {pending[-1]}", progress=ctx.progress, safety=True).id)
        done = migrate(db.server, migrations, ctx.args.target, progress=ctx.info)
    lines = [f"applied {ident}" for ident in done] + [f"backup before migrating: {i}" for i in ids]
    return Result({"applied": done, "current": done[-1] if done else state["current"],
                   "safety_backup": ids[0] if ids else None}, lines, backup_ids=ids)


def cmd_rollback(ctx: Context) -> Result:
    """rollback MIGRATION: undo every applied migration above it, in one transaction, after a backup."""
    db = DbContext.from_settings(ctx.settings)
    migrations = db_migrations.discover(db.migrations_dir)
    try:
        plan = plan_rollback(migrations, applied_migrations(db), _rollback_ref(ctx.args))
    except MissingDownFile as missing:
        way_back = backup_before(db, min(missing.versions))
        hint = (f"; restore the backup taken before it: {SCRIPT} restore {way_back.id}" if way_back
                else "; no backup from before it is in the store")
        raise MissingDownFile(str(missing) + hint, []) from None
    if not plan.steps:
        return Result({"rolled_back": [], "current": plan.target_id}, [plan.render()])
    for warning in plan.warnings:
        ctx.warn(warning)
    if ctx.dry_run:
        return Result({"dry_run": True, "plan": plan.to_dict()}, [plan.render()], report=True)
    ctx.confirm(f"Roll {db.server.name} back from {plan.current_id} to {plan.target_label}?")
    ids = []
    with db.store.lock(f"{SCRIPT} rollback"):
        if not ctx.args.no_backup:
            ids.append(take_backup(db, f"before rollback to {plan.target_label}", progress=ctx.progress,
                                   safety=True).id)
        lock_timeout = db.server.lock_timeout if ctx.args.lock_timeout is None else ctx.args.lock_timeout
        outcome = run_rollback(db.server, plan, lock_timeout, ctx.args.terminate_blockers,
                                             progress=ctx.info)
    lines = [f"rolled back {ident}" for ident in outcome.rolled_back]
    lines += [f"ended blocking session {s['pid']} ({s.get('user')}, {s.get('application')})"
              for s in outcome.terminated]
    lines.append(f"{db.server.name} is now at {plan.target_label}")
    if ids:
        lines.append(f"to undo: {SCRIPT} restore {ids[0]} --yes")
    return Result({"rolled_back": outcome.rolled_back, "current": plan.target_id,
                   "terminated": [s["pid"] for s in outcome.terminated], "safety_backup": ids[0] if ids else None},
                  lines, backup_ids=ids)


def cmd_status(ctx: Context) -> Result:
    """status: applied and pending migrations, and applied files that changed since."""
    db = DbContext.from_settings(ctx.settings)
    state = db_migrations.status(db_migrations.discover(db.migrations_dir), applied_migrations(db))
    lines = [f"{db.server.name} is at {state['current'] or 'no migration'}"]
    lines += [f"  applied  {row['id']}  ({row['applied_at']})" for row in state["applied"]]
    lines += [f"  pending  {ident}" for ident in state["pending"]]
    lines += [f"  {d['problem']:8} {d['id']}: {d['detail']}" for d in state["drift"]]
    return Result(state, lines, report=True)


def cmd_verify(ctx: Context) -> Result:
    """verify [BACKUP]: server, migrations, indexes, sessions, and a backup's checksums and table of contents."""
    db = DbContext.from_settings(ctx.settings)
    problems, notes = database_problems(db.server, db.migrations_dir)
    backup = (resolve_component(db.store, ctx.args.backup) if ctx.args.backup
              else db.store.latest(match=db.is_own))
    if backup is None:
        notes.append(f"no backups in {db.store.root} yet")
    else:
        backup_problems = check_backup(backup)
        if not backup_problems:
            try:
                entries = len(dump_entries(db.server, db.tools, dump_path(backup)))
                notes.append(f"backup {backup.id}: checksums hold, {entries} entries in its table of contents")
            except ToolkitError as exc:
                backup_problems.append(str(exc))
        problems += [f"backup {backup.id}: {p}" for p in backup_problems]
    lines = [f"verify {db.server.name}: " + (count(len(problems), "problem") if problems else "OK")]
    lines += [f"  problem: {p}" for p in problems] + [f"  {n}" for n in notes]
    return Result({"problems": problems, "notes": notes, "backup": backup.id if backup else None}, lines,
                  exit_code=3 if problems else 0, report=True)


def cmd_locks(ctx: Context) -> Result:
    """locks [--terminate PID]: blocked sessions and who blocks them, now."""
    db = DbContext.from_settings(ctx.settings)
    conn = db.server.connect(autocommit=True)
    try:
        if ctx.args.terminate is not None:
            if ctx.dry_run:
                return Result({"dry_run": True, "terminate": ctx.args.terminate},
                              [f"would end session {ctx.args.terminate}"], report=True)
            ctx.confirm(f"End session {ctx.args.terminate} on {db.server.name}?")
            if not db_sessions.terminate(conn, ctx.args.terminate):
                raise UsageError(f"no session with pid {ctx.args.terminate}")
            return Result({"terminated": ctx.args.terminate}, [f"ended session {ctx.args.terminate}"])
        sessions = db_sessions.blocking_report(conn, db.server.name)
    finally:
        conn.close()
    rows = [(str(s["pid"]), str(s["user"]), str(s["application"] or ""), str(s["state"] or ""),
             str(s["since"] or ""), ",".join(map(str, s["blocked_by"])) or "-", (s["query"] or "")[:60])
            for s in sessions]
    lines = (table(("PID", "USER", "APPLICATION", "STATE", "SINCE", "BLOCKED BY", "QUERY"), rows) if rows
             else [f"no blocked sessions on {db.server.name}"])
    return Result({"sessions": sessions}, lines, report=True)


def _rollback_ref(args) -> str | None:
    """The migration `rollback` goes back to; None for every one (--all)."""
    if args.all and args.migration is not None:
        raise UsageError("give MIGRATION or --all, not both")
    if not args.all and args.migration is None:
        raise UsageError("name the migration to roll back to (id or version), or 0 or --all to roll back every one")
    return None if args.all else args.migration


def _version(ident: str) -> int:
    head = ident.split("_", 1)[0]
    if not head.isdigit():
        raise UsageError(f"{ident!r} is not a migration id or version (e.g. 001_initial_schema or 1)")
    return int(head)


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
        f"  {SCRIPT} rollback 001_initial_schema --yes\n"
        f"  {SCRIPT} rollback --all --dry-run\n"
        f"  {SCRIPT} locks\n"
        f"  {SCRIPT} cleanup 30 --keep 5",
    )
    sub = add_command(commands, "backup", cmd_backup, "pg_dump DB_NAME into the backup store")
    sub.add_argument("--format", choices=("custom", "directory"), default="custom",
                     help="custom (default): one .dump file plain pg_restore reads; directory: parallel dumps")
    sub.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel dump jobs (directory format)")
    sub.add_argument("--compress", type=int, choices=range(10), metavar="N", help="compression level 0-9")
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
        "for a database with subscriptions. Either way a failure leaves the live database as it was.")
    add_backup_argument(sub, ", or a pg_dump archive made elsewhere (custom, directory or tar format; "
                             "a plain SQL dump is refused: restore it with psql)")
    sub.add_argument("--target-db", metavar="NAME",
                     help="restore into this database instead of DB_NAME (created if missing, else replaced)")
    sub.add_argument("--in-place", action="store_true", help="restore into the live database in one transaction")
    sub.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel pg_restore jobs (fresh database)")
    add_no_backup_argument(sub, "the database (--in-place)")

    sub = add_command(commands, "migrate", cmd_migrate, "apply pending migrations from MIGRATIONS_DIR",
                      "Applies <version>_<name>.up.sql files in version order, each in its own transaction with\n"
                      "its row in public.schema_migrations, after a backup (unless --no-backup). An advisory\n"
                      "lock keeps two migrators apart.")
    sub.add_argument("target", metavar="TARGET", nargs="?", help="stop after this migration (id or version)")
    add_no_backup_argument(sub, "the database")

    sub = add_command(
        commands, "rollback", cmd_rollback, "roll back to a migration with the down scripts",
        "Runs the down scripts of every applied migration above MIGRATION (0 or --all: of every\n"
        "applied migration), newest first, and their tracking-table deletes in ONE transaction under\n"
        "lock_timeout, after a backup. On a lock timeout nothing changes and the blocking sessions are\n"
        "named. A down file whose first line is `-- rollback: no-transaction` runs on its own (the plan\n"
        "warns). A migration without a down file stops the rollback before anything changes, naming the\n"
        "backup to restore instead.")
    sub.add_argument("migration", metavar="MIGRATION", nargs="?",
                     help="an applied migration: id (001_initial_schema) or version; 0 for none (every one undone)")
    sub.add_argument("--all", action="store_true", help="roll back every applied migration (the same as 0)")
    sub.add_argument("--lock-timeout", type=int, metavar="SECONDS", help="lock_timeout (default DB_LOCK_TIMEOUT)")
    sub.add_argument("--terminate-blockers", action="store_true",
                     help="on a lock timeout, end the blocking sessions and try once more")
    add_no_backup_argument(sub, "the database")

    add_command(commands, "status", cmd_status, "applied and pending migrations, and changed files")

    sub = add_verify_command(commands, cmd_verify, "check the database and a backup (problems exit 3)",
                      "Connects and reports the server version; applied migrations must have unchanged files;\n"
                      "no invalid indexes; no <name>__restore_ database left by a killed restore (one a running\n"
                      "restore is building is only noted); no enabled subscription in a database a restore set\n"
                      "aside; long transactions and lock waits are warned of; the newest backup (or BACKUP) must\n"
                      "pass its checksums and pg_restore --list.")
    sub.add_argument("backup", metavar="BACKUP", nargs="?", help="the backup to check (default: the newest)")

    sub = add_command(commands, "locks", cmd_locks, "blocked sessions and who blocks them")
    sub.add_argument("--terminate", type=int, metavar="PID", help="end this session")

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
