"""The database restore, start to finish: which dump, the checks before the first change, the restore in
place or by a swap, and the report with the way back. It leads; the modules below it do each step: dumps
(pg_restore), properties, subscriptions and space (the checks), swap (the fresh database and the switch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from backup_store.manifest import Backup
from backup_store.store import refuse_damaged, resolve_component
from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from common.text import count
from database.backup_info import DbBackupInfo
from database.backups import take_backup
from database.cluster_globals import create_globals, drop_created_globals
from database.context import SCRIPT, DbContext
from database.dump_roles import RoleCheck, check_roles
from database.dumps import (
    dump_entries,
    dump_path,
    dump_size,
    foreign_dump,
    rename_back_statements,
    restore_into,
    subscriptions_in,
    with_full_disk_named,
)
from database.mark_restore import mark_restore_command, names_a_mark
from database.properties import read_properties
from database.row_counters import WritesReport, read_counters, recorded_counters, writes_since
from database.server import MAINTENANCE_DB, DbServer
from database.space import SpaceCheck, refuse_if_short, restore_space
from database.subscriptions import refuse_in_place, undo_statements
from database.swap import SwapOutcome, SwapPlan, plan_swap, restore_into_fresh_database


@dataclass
class RestoreSource:
    """The dump to restore: a backup's (its checksums checked) or one made elsewhere (`backup` None)."""

    backup: Backup | None
    dump: Path
    entries: list[str]  # its table of contents, as pg_restore --list reads it
    roles: RoleCheck | None = None  # the roles it needs, as preflight found them

    @property
    def name(self) -> str:
        """The backup's id, or the dump's path."""
        return self.backup.id if self.backup else str(self.dump)

    @property
    def recorded_size(self) -> int | None:
        """The database's size when the backup was taken (None for a dump made elsewhere, or not recorded)."""
        return DbBackupInfo.load(self.backup).database_size if self.backup else None


def restore_command(ctx: Context) -> Result:
    """restore BACKUP: checksums, the dump's table of contents, privileges, properties, subscriptions and free
    space first, then a restore that fails safe. A mark (DB_ENGINE=pgbackrest) goes back by pgBackRest."""
    if names_a_mark(ctx):
        return mark_restore_command(ctx)
    db = DbContext.from_settings(ctx.settings)
    args = ctx.args
    own_database = db.is_own  # `latest` means the newest backup of DB_NAME, also with --target-db
    if args.target_db:
        db = replace(db, server=replace(db.server, name=args.target_db))
    mode = "in place" if args.in_place else "into a fresh database, then switched in"
    if ctx.dry_run:
        return _dry_run(ctx, db, own_database, mode)
    # From resolving the backup to the switch, under the lock: a cleanup cannot remove it meanwhile.
    with db.store.lock(f"{SCRIPT} restore"):
        source = find_source(ctx, db, own_database)
        plan, space = preflight(db, source, args)  # before the first change: refused, nothing changed
        for line in space.lines():
            (ctx.warn if space.unchecked else ctx.info)(line)
        data = {"source": source.name, "database": db.server.name, "mode": "in-place" if args.in_place else "swap",
                "dump_entries": len(source.entries), "space": space.to_dict()}
        writes = writes_report(db, source, plan)
        if writes:
            for line in writes.lines():  # before the question: what answering yes throws away
                ctx.info(line)
            data["writes_since_backup"] = writes.to_dict()
        ids = [source.backup.id] if source.backup else []
        ctx.confirm(f"Replace database {db.server.name} with {source.name}?")
        data["globals"], globals_lines = made_globals(ctx, db, source)  # --with-globals: before pg_restore
        try:
            if args.in_place:
                safety_ids, lines = restore_in_place(ctx, db, source, space)
                ids += safety_ids
                data["safety_backup"] = safety_ids[0] if safety_ids else None
            else:
                done, lines = restore_by_swap(ctx, db, plan, source, space)
                data.update(done)
        except BaseException:
            undo_globals(ctx, db, source)  # the restore changed nothing: neither do its roles stay
            raise
        if writes:
            lines.append(writes.lines()[0])
        skipped = subscriptions_in(source.entries)
        if skipped:
            lines.append(f"the dump's subscriptions ({', '.join(skipped)}) were not restored: they name the live "
                         "database's replication slot (a swap hands the live database's own over)")
    lines[:0] = [f"restored {source.name} into {db.server.name} ({mode})", *globals_lines]
    return Result({**data, "restored": True}, lines, backup_ids=ids)


def _dry_run(ctx: Context, db: DbContext, own_database: Callable[[Backup], bool], mode: str) -> Result:
    """restore --dry-run: every check a restore makes first, and what it would do."""
    source = find_source(ctx, db, own_database)
    plan, space = preflight(db, source, ctx.args)
    writes = writes_report(db, source, plan)
    roles = source.roles
    for warning in roles.plan.warnings if roles.plan else []:
        ctx.warn(warning)
    return Result({"source": source.name, "database": db.server.name, "dump_entries": len(source.entries),
                   "dry_run": True, "mode": "in-place" if ctx.args.in_place else "swap", "space": space.to_dict(),
                   "subscriptions": [s.name for s in plan.subscriptions] if plan else [],
                   "globals": roles.plan.to_dict() if roles.plan else None,
                   "writes_since_backup": writes.to_dict() if writes else None},
                  [f"would restore {source.name} ({len(source.entries)} entries) over {db.server.name}, {mode}",
                   *(roles.plan.lines(done=False) if roles.plan else []), *roles.notes, *space.lines(),
                   *(writes.lines() if writes else [])], report=True)


def find_source(ctx: Context, db: DbContext, own_database: Callable[[Backup], bool]) -> RestoreSource:
    """The backup (None for a dump made outside the toolkit), its dump, and the dump's entries, all checked."""
    ref = ctx.args.backup
    # `latest` and backup ids are the store's, even if a file of that name happens to be in the folder.
    in_store = ref == "latest" or ("/" not in ref and (db.store.root / ref).exists())
    dump = None if in_store else foreign_dump(ref)
    backup = None
    if dump is None:
        backup = resolve_component(db.store, ref, match=own_database)
        if not own_database(backup) and not ctx.args.target_db:
            raise UsageError(f"backup {backup.id} is of database {DbBackupInfo.load(backup).database!r}, not "
                             f"{db.server.name!r}: pass --target-db {db.server.name} to restore it there anyway")
        refuse_damaged(backup)
        dump = dump_path(backup)
    else:
        ctx.warn(f"{dump} was not made by this toolkit: there is no checksum to check")
    return RestoreSource(backup, dump, dump_entries(db.server, db.tools, dump))


def writes_report(db: DbContext, source: RestoreSource, plan: SwapPlan | None) -> WritesReport | None:
    """The rows written to the database being replaced since the backup; None when there is none to replace
    (a swap into a new name)."""
    if plan is not None and plan.live is None:
        return None
    return writes_lost(db, source.backup)


def writes_lost(db: DbContext, backup: Backup | None) -> WritesReport:
    """The rows written to DB_NAME since `backup` (None: a dump made elsewhere), which restoring it loses."""
    recorded = None
    if backup:
        taken_from = DbBackupInfo.load(backup).database
        if taken_from != db.server.name:
            return WritesReport(db.server.name, f"the backup is of database {taken_from!r}")
        try:
            recorded = recorded_counters(backup)
        except ToolkitError as exc:
            return WritesReport(db.server.name, str(exc))
    try:
        now = read_counters(db.server)
    except ToolkitError as exc:  # e.g. a switch killed half-way left it refusing connections: the swap reopens it
        return WritesReport(db.server.name, f"its counters could not be read: {exc}")
    return writes_since(db.server.name, recorded, now)


def preflight(db: DbContext, source: RestoreSource, args: argparse.Namespace) -> tuple[SwapPlan | None, SpaceCheck]:
    """What must hold before a restore's first change, checked in that order: the swap's privileges,
    properties and subscriptions (or, in place, no subscriptions), the roles the dump needs (kept in
    `source.roles`), then free space. Any failure refuses."""
    if args.in_place:
        plan = None
        refuse_in_place(db.server, db.server.name)
        live = read_properties(db.server, db.server.name)
    else:
        plan = plan_swap(db.server)
        live = plan.live
    source.roles = check_roles(db.server, db.tools, source.dump, source.entries, source.backup, args.with_globals,
                               new_database=live is None and not args.in_place)
    if plan is not None:
        plan.owner = source.roles.database_owner
    dump_bytes = dump_size(source.dump)
    safety_folder = db.store.root if args.in_place and not args.no_backup else None
    space = restore_space(db.server, db.server.name, live.tablespace if live else "pg_default", source.recorded_size,
                          dump_bytes, safety_folder)
    refuse_if_short(db.server, space, args.in_place, dump_bytes)
    return plan, space


def made_globals(ctx: Context, db: DbContext, source: RestoreSource) -> tuple[dict | None, list[str]]:
    """restore --with-globals: create the backup's roles, memberships and tablespaces missing here; (what was
    created, for --json; the report's lines, with preflight's notes on roles)."""
    plan = source.roles.plan
    if plan is None:
        return None, list(source.roles.notes)
    create_globals(db.server, plan, ctx.warn)
    return plan.to_dict(), [*plan.lines(done=True), *source.roles.notes]


def undo_globals(ctx: Context, db: DbContext, source: RestoreSource) -> None:
    """Drop what made_globals created, after the restore it was made for failed; warn of what had to stay."""
    plan = source.roles.plan
    if plan is None or not (plan.roles or plan.tablespaces):
        return
    try:
        left = drop_created_globals(db.server, plan)
    except Exception as exc:  # noqa: BLE001 - the restore's own error is the one to report; this is a warning
        left = [f"the roles and tablespaces it created were kept ({exc})"]
    for line in left:
        ctx.warn(f"after the failed restore, {line}")


def restore_in_place(ctx: Context, db: DbContext, source: RestoreSource, space: SpaceCheck
                     ) -> tuple[list[str], list[str]]:
    """A safety backup (unless --no-backup), then pg_restore --clean into the live database in one transaction;
    (the safety backup's id, if any; the report's lines)."""
    ids, lines = [], []
    if not ctx.args.no_backup:
        safety = take_backup(db, f"before restore of {source.name}", progress=ctx.progress, safety=True,
                             warn=ctx.warn)
        ids.append(safety.id)
        lines.append(f"saved the current database as {safety.id}; to undo: {SCRIPT} restore {safety.id}")
    with ctx.progress(f"restoring {db.server.name} in place", lambda: -1, None):
        try:
            restore_into(db.server, db.tools, source.dump, db.server.name, 1, single_transaction=True, clean=True)
        except ToolkitError as exc:
            raise with_full_disk_named(exc, space.full_now() or "the server's disk") from None
    return ids, lines


def restore_by_swap(ctx: Context, db: DbContext, plan: SwapPlan, source: RestoreSource, space: SpaceCheck
                    ) -> tuple[dict, list[str]]:
    """Restore into a fresh database and switch it in (database.swap); (what it did, for --json; the report)."""
    outcome = restore_into_fresh_database(db.server, db.tools, plan, source.dump, ctx.args.jobs,
                                          source.recorded_size, space, ctx.progress)
    done = {"previous_database": outcome.before, "outage_seconds": round(outcome.outage, 3),
            "sessions_ended": outcome.sessions_ended, "transactions_ended": outcome.transactions_ended,
            "subscriptions_handed_over": outcome.subscriptions}
    if outcome.subscriptions:
        first, then = undo_statements(db.server.name, plan.subscriptions)
        done["undo_subscriptions"] = {"before_renames": first, "after_renames": then}
    lines = swap_lines(db.server, outcome, done.get("undo_subscriptions"))
    for warning in outcome.warnings:
        ctx.warn(warning)
    return done, lines


def swap_lines(server: DbServer, outcome: SwapOutcome, undo_subscriptions: dict | None) -> list[str]:
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


def undo_hint(server: DbServer, before: str) -> str:
    """The SQL that puts the previous database back, for the operator."""
    return (f"to undo, run as a superuser, connected to {MAINTENANCE_DB}: "
            + "; ".join(rename_back_statements(server.name, before)) + ";")
