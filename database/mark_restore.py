"""Restore to a mark (DB_ENGINE=pgbackrest): the whole cluster back to the restore point, by pgBackRest.

The server is stopped, its data directory moved aside whole (a rename: instant, nothing copied), pgBackRest
restores the backup the mark was made after into a new, empty one with recovery to the mark's restore
point, and the server is started and promoted there. The directory moved aside is what undoes the restore:
the report, and any failure after the server was stopped, prints the commands that put it back.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import Context, Result
from common.errors import FailedPartWay, SettingError, ToolkitError, UsageError
from common.hooks import hook_argv
from common.proc import run_tool
from common.settings import Settings
from database.context import SCRIPT, DbContext
from database.dumps import PgTools
from database.marks import MarkInfo, backup_set_gone
from database.pgbackrest import PgBackRest

# Replaying the WAL from the backup to the mark takes as long as it takes (hours for a busy day of a large
# cluster): the wait gives up only when replay stops moving for this long.
STALL_SECONDS = 600.0
START_WAIT_SECONDS = 86400  # pg_ctl start -t: it returns at once if the server dies


@dataclass(frozen=True)
class ServerControl:
    """How the cluster is stopped and started: PG_STOP_COMMAND and PG_START_COMMAND (e.g. systemctl stop
    postgresql@15-main), else pg_ctl on PGDATA as the server's OS user."""

    data_dir: Path
    stop_argv: list[str]
    start_argv: list[str]

    @classmethod
    def from_settings(cls, settings: Settings, pgbackrest: PgBackRest) -> ServerControl:
        """PGDATA (required), PG_STOP_COMMAND, PG_START_COMMAND, PG_BINDIR."""
        data_dir = settings.path("PGDATA")
        if data_dir is None:
            raise SettingError("PGDATA is not set: a restore to a mark moves the cluster's data directory aside",
                               setting="PGDATA")
        pg_ctl = PgTools(settings.path("PG_BINDIR")).path("pg_ctl")
        stop, start = hook_argv(settings, "PG_STOP_COMMAND"), hook_argv(settings, "PG_START_COMMAND")
        if (stop is None or start is None) and not os.access(pg_ctl, os.X_OK):
            raise SettingError(f"{pg_ctl} not found: set PG_BINDIR (Debian: /usr/lib/postgresql/<version>/bin), or "
                               "PG_STOP_COMMAND and PG_START_COMMAND", setting="PG_BINDIR")
        as_server = pgbackrest.as_server_user
        log = f"{data_dir}.server.log"
        return cls(data_dir, stop or as_server(
                       [pg_ctl, "-D", str(data_dir), "-m", "fast", "-w", "stop"]),
                   start or as_server(
                       [pg_ctl, "-D", str(data_dir), "-l", log, "-w", "-t", str(START_WAIT_SECONDS), "start"]))

    def stop(self) -> None:
        """Stop the server (a failure raises, nothing else changed)."""
        run_tool(self.stop_argv, "stopping the server")

    def start(self) -> None:
        """Start the server."""
        run_tool(self.start_argv, "starting the server")


@dataclass(frozen=True)
class MarkRestore:
    """What a restore to a mark did."""

    mark: MarkInfo
    kept_data_dir: Path  # the data directory it replaced, whole
    seconds: float
    undo: list[str]  # shell lines that put the replaced data directory back


def refuse_before_stop(pgbackrest: PgBackRest, control: ServerControl, mark: MarkInfo) -> None:
    """Every reason known beforehand that the restore would fail once the server is down: refused, nothing
    changed (UsageError)."""
    if mark.stanza != pgbackrest.stanza:
        raise UsageError(f"mark {mark.restore_point} was made on the stanza {mark.stanza!r}, PGBACKREST_STANZA "
                         f"is {pgbackrest.stanza!r}: nothing was changed")
    if gone := backup_set_gone(pgbackrest, mark):
        raise UsageError(f"{gone}; nothing was changed")
    data_dir = control.data_dir
    if data_dir.is_symlink() or not data_dir.is_dir() or os.path.ismount(data_dir):
        raise UsageError(f"PGDATA={data_dir} is not a plain folder (a symlink or a mount point cannot be set "
                         "aside by a rename): nothing was changed")
    if any((data_dir / "pg_tblspc").iterdir()) or (data_dir / "pg_wal").is_symlink():
        raise UsageError(f"{data_dir} has tablespaces or a pg_wal elsewhere, which a restore to a mark does not "
                         "set aside yet: nothing was changed")
    if kept_path(control, mark).exists():
        raise UsageError(f"{kept_path(control, mark)} is there already (an earlier restore to this mark): move it "
                         "away first; nothing was changed")


def kept_path(control: ServerControl, mark: MarkInfo) -> Path:
    """Where the data directory a restore to `mark` replaces is kept."""
    return control.data_dir.with_name(f"{control.data_dir.name}.before-{mark.restore_point}")


def restore_to_mark(db: DbContext, pgbackrest: PgBackRest, control: ServerControl, mark: MarkInfo) -> MarkRestore:
    """Stop, move the data directory aside, restore to the mark, start, wait for the promotion. A failure after
    the stop raises with the commands that undo what was done so far."""
    started = time.monotonic()
    kept = kept_path(control, mark)
    control.stop()
    moved = False
    try:
        os.rename(control.data_dir, kept)
        moved = True
        os.mkdir(control.data_dir, 0o700)
        st = os.stat(kept)
        os.chown(control.data_dir, st.st_uid, st.st_gid)
        pgbackrest.run("restore", "--type=name", f"--target={mark.restore_point}", "--target-action=promote",
                       f"--target-timeline={mark.timeline}", f"--set={mark.pgbackrest_backup}",
                       what="pgbackrest restore")
        control.start()
        _wait_promoted(db)
    except BaseException as exc:
        why = str(exc) or type(exc).__name__
        if not moved:
            start = [shlex.join(control.start_argv)]
            raise FailedPartWay(f"the restore to mark {mark.restore_point} failed before PGDATA was set aside "
                                f"({why}); nothing was moved; start the server again:\n{start[0]}", start) from exc
        undo = undo_lines(control, kept)
        lines = "\n".join(undo)
        raise FailedPartWay(f"the restore to mark {mark.restore_point} failed ({why}); the data directory it "
                            f"replaced is kept whole as {kept}; to put it back:\n{lines}", undo) from exc
    return MarkRestore(mark, kept, time.monotonic() - started, undo_lines(control, kept))


def undo_lines(control: ServerControl, kept: Path) -> list[str]:
    """Shell lines that stop the server (an error there, when it is not running, is harmless), set the restored
    data directory aside and put `kept` back, then start the server."""
    restored = control.data_dir.with_name(f"{control.data_dir.name}.restored")
    return [shlex.join(control.stop_argv), shlex.join(["mv", str(control.data_dir), str(restored)]),
            shlex.join(["mv", str(kept), str(control.data_dir)]), shlex.join(control.start_argv)]


def _wait_promoted(db: DbContext) -> None:
    """Wait until the server is out of recovery; give up when the replayed position stops moving for
    STALL_SECONDS (or the server cannot be reached for that long)."""
    last, moved_at = None, time.monotonic()
    while True:
        try:
            with db.server.session("postgres", autocommit=True) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                recovering, replayed = cur.fetchone()
        except ToolkitError:
            recovering, replayed = True, last  # not accepting connections yet
        if not recovering:
            return
        if replayed != last:
            last, moved_at = replayed, time.monotonic()
        elif time.monotonic() - moved_at > STALL_SECONDS:
            raise ToolkitError(f"recovery to the mark made no progress for {STALL_SECONDS:g} s (at {last}); "
                               "the server's log says why")
        time.sleep(0.2)  # polling the server: recovery has no event to wait on from here


def names_a_mark(ctx: Context) -> bool:
    """Whether the BACKUP a restore names is a mark (a dump, or a name that resolves to nothing, is not)."""
    db = DbContext.from_settings(ctx.settings)
    try:
        return MarkInfo.load(db.store.resolve(ctx.args.backup, match=db.is_own, lazy=True)) is not None
    except ToolkitError:
        return False  # the dump's path reports it


def mark_restore_command(ctx: Context) -> Result:
    """restore MARK with DB_ENGINE=pgbackrest: the plan, the question, the restore, the undo."""
    given = [option for option, value in (("--target-db", ctx.args.target_db), ("--in-place", ctx.args.in_place),
                                          ("--with-globals", ctx.args.with_globals)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: not with DB_ENGINE=pgbackrest, where the whole cluster goes back "
                         "to the mark")
    db = DbContext.from_settings(ctx.settings)
    pgbackrest = PgBackRest.from_settings(ctx.settings)
    control = ServerControl.from_settings(ctx.settings, pgbackrest)
    with db.store.lock(f"{SCRIPT} restore"):
        backup = db.store.resolve(ctx.args.backup, match=db.is_own)
        mark = MarkInfo.load(backup)
        if mark is None:
            raise ToolkitError(f"{backup.id} is no longer a mark: nothing was changed")
        plan = [f"the whole cluster of {db.server.name} goes back to mark {mark.restore_point} ({mark.marked_at}, "
                f"{mark.lsn}): every database in it, and everything written since is set aside with the data "
                f"directory {control.data_dir}, kept whole"]
        refuse_before_stop(pgbackrest, control, mark)
        if ctx.dry_run:
            return Result({"dry_run": True, "mark": mark.dump()}, plan, report=True)
        for line in plan:
            ctx.info(line)
        ctx.confirm(f"Stop the server and restore the whole cluster to {mark.restore_point}?")
        done = restore_to_mark(db, pgbackrest, control, mark)
    return Result({"mark": mark.dump(), "kept_data_dir": str(done.kept_data_dir), "seconds": done.seconds,
                   "undo_commands": done.undo},
                  [f"restored the cluster to mark {mark.restore_point} in {done.seconds:.1f} s; the data directory "
                   f"it replaced is {done.kept_data_dir}; to undo:", *(f"  {line}" for line in done.undo)],
                  backup_ids=[backup.id])

