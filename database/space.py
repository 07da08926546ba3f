"""Whether the server's disks can take a restore, asked before anything is built.

A restore writes a whole new copy of the database before the old one is let go (the swap keeps the old
one; an in-place restore's one transaction frees the replaced tables only when it commits), and WAL as it
writes. A disk that fills on the way makes PostgreSQL fail, and a full pg_wal stops the whole server. So
the free space of the filesystems holding the database's tablespace and pg_wal (which may be a symlink
elsewhere) is compared with an estimate before the first change, and a restore that does not fit is refused.

No SQL function of PostgreSQL reports free space, so the filesystems are looked at from this host: the
server gives its data_directory, and the folder of that name here must be the server's (pg_stat_file's
times of it must match ours). Run elsewhere, or without the privileges to ask, the check says why it
could not be made and the restore goes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ToolkitError
from common.text import human_size
from database.scratch import KEPT_ROLES, scratch_databases
from database.server import APPLICATION_NAME, MAINTENANCE_DB, DbServer

WAL_RESERVE_SEGMENTS = 2  # kept free on pg_wal's filesystem beyond the estimate: room for a checkpoint
FULL_BYTES = 16 * 1024 * 1024  # less free than one WAL segment: full, as far as the server is concerned


@dataclass
class Demand:
    """What a restore will write on one filesystem, and how much room that filesystem has."""

    path: str  # the first place on it the restore writes to, to name it
    free: int
    parts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def needed(self) -> int:
        return sum(size for _, size in self.parts)

    def describe(self) -> str:
        """`<path>: N free, M needed (a, b, c)`."""
        parts = ", ".join(f"{human_size(size)} {what}" for what, size in self.parts)
        return f"{self.path}: {human_size(self.free)} free, {human_size(self.needed)} needed ({parts})"


@dataclass
class SpaceCheck:
    """The estimate and, if the filesystems could be looked at, each one's demand; else why not."""

    estimate: int
    estimated_from: str
    demands: list[Demand] = field(default_factory=list)
    unchecked: str | None = None

    def shortfalls(self) -> list[Demand]:
        """The filesystems that would fill up."""
        return [demand for demand in self.demands if demand.needed > demand.free]

    def full_now(self) -> str:
        """The filesystems among the demands' that are (nearly) full now, named with what is free; or ""."""
        full = []
        for demand in self.demands:
            try:
                stats = os.statvfs(demand.path)
            except OSError:
                continue
            free = stats.f_bavail * stats.f_frsize
            if free < FULL_BYTES:
                full.append(f"{demand.path} ({human_size(free)} free)")
        return ", ".join(full)

    def to_dict(self) -> dict:
        """For --json."""
        return {"estimate_bytes": self.estimate, "estimated_from": self.estimated_from, "checked": not self.unchecked,
                "reason_unchecked": self.unchecked,
                "filesystems": [{"path": d.path, "free_bytes": d.free, "needed_bytes": d.needed,
                                 "parts": dict(d.parts)} for d in self.demands]}

    def lines(self) -> list[str]:
        """One line per filesystem, or why there are none."""
        if self.unchecked:
            return [f"free space not checked: {self.unchecked} (the restore writes about "
                    f"{human_size(self.estimate)}, {self.estimated_from}, plus WAL)"]
        return [f"free space: {demand.describe()}" for demand in self.demands]


@dataclass
class ServerPaths:
    """Where, on this host, the server keeps a database's files and its WAL; and its WAL settings."""

    database_dir: Path
    wal_dir: Path
    max_wal_size: int
    wal_segment_size: int


class Unchecked(Exception):
    """The filesystems cannot be looked at from here; the message says why."""


def estimate(recorded: int | None, live_size: int | None, dump_size: int) -> tuple[int, str]:
    """The size of the database a restore builds, and what the figure comes from: the size recorded with
    the backup if there is one, else the live database's, and never less than the dump's."""
    if recorded:
        base, source = recorded, "the database's size when the backup was taken"
    elif live_size:
        base, source = live_size, "the live database's size"
    else:
        base, source = 0, "the dump's size"
    if dump_size > base:
        return dump_size, "the dump's size"
    return base, source


def check_space(server: DbServer, tablespace: str, size: int, source: str,
                safety_backup: tuple[Path, int] | None = None) -> SpaceCheck:
    """The demands of a restore writing a database of `size` bytes into `tablespace`, with WAL, and of a
    safety backup of about `safety_backup[1]` bytes into folder `safety_backup[0]` if one is taken first."""
    check = SpaceCheck(size, source)
    try:
        paths = locate(server, tablespace)
    except Unchecked as why:
        check.unchecked = str(why)
        return check
    wal = min(size, paths.max_wal_size)
    places = [(paths.database_dir, f"for the restored database ({source})", size),
              (paths.wal_dir, "of WAL (as much as it writes, up to max_wal_size)", wal),
              (paths.wal_dir, "kept free for the server's own WAL", WAL_RESERVE_SEGMENTS * paths.wal_segment_size)]
    if safety_backup is not None:
        places.append((_existing(safety_backup[0]), "for the safety backup taken first (about the dump's size)",
                       safety_backup[1]))
    by_device: dict[int, Demand] = {}
    for path, what, needed in places:
        device = os.stat(path).st_dev
        if device not in by_device:
            stats = os.statvfs(path)
            by_device[device] = Demand(str(path), stats.f_bavail * stats.f_frsize)
        by_device[device].parts.append((what, needed))
    check.demands = list(by_device.values())
    return check


def locate(server: DbServer, tablespace: str) -> ServerPaths:
    """The folders on this host that hold `tablespace`'s databases and the server's WAL; Unchecked if the
    server will not say where they are or they are not here."""
    import psycopg2

    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        try:
            cur.execute("SELECT current_setting('data_directory')")
            data_dir = Path(cur.fetchone()[0])
        except psycopg2.errors.InsufficientPrivilege:
            raise Unchecked(f"{server.user} may not read the server's data_directory (a superuser or a member of "
                            "pg_read_all_settings may)") from None
        cur.execute("SELECT pg_size_bytes(current_setting('max_wal_size')),"
                    " pg_size_bytes(current_setting('wal_segment_size')),"
                    " (SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = %s)", (tablespace,))
        max_wal_size, segment, location = cur.fetchone()
        try:
            cur.execute("SELECT extract(epoch FROM modification)::bigint, extract(epoch FROM change)::bigint"
                        " FROM pg_stat_file('.')")
            server_times = cur.fetchone()
        except psycopg2.errors.InsufficientPrivilege:
            raise Unchecked(f"{server.user} may not run pg_stat_file, which tells whether {data_dir} here is the "
                            "server's data directory (a superuser may, or one granted EXECUTE on it)") from None
    try:
        here = os.stat(data_dir)
    except FileNotFoundError:
        raise Unchecked(f"the server's data directory {data_dir} is not on this host (the server runs elsewhere, "
                        "and no SQL function reports free space)") from None
    except OSError as exc:
        raise Unchecked(f"cannot look at {data_dir}: {exc.strerror}") from None
    if (int(here.st_mtime), int(here.st_ctime)) != tuple(server_times):
        raise Unchecked(f"{data_dir} on this host is not the server's data directory (its times differ: the "
                        "server runs on another host or in a container)")
    database_dir = Path(location) if location else data_dir
    if location:
        try:
            os.stat(database_dir)
        except OSError as exc:
            raise Unchecked(f"cannot look at {database_dir} (tablespace {tablespace}): {exc.strerror}") from None
    return ServerPaths(database_dir, _wal_dir(data_dir), max_wal_size, segment)


def _wal_dir(data_dir: Path) -> Path:
    """pg_wal, or where it leads if it is a symlink (initdb --waldir)."""
    wal = data_dir / "pg_wal"
    try:
        if wal.is_symlink():
            return (data_dir / os.readlink(wal)).resolve()
        os.stat(wal)
    except PermissionError:
        raise Unchecked(f"cannot look inside {data_dir} to see where pg_wal is: run as root or as the server's OS "
                        "user") from None
    except OSError as exc:
        raise Unchecked(f"cannot look at {wal}: {exc.strerror}") from None
    return wal


def _existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (the backup folder is made on the first backup)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def restore_space(server: DbServer, live: str, tablespace: str, recorded: int | None, dump_bytes: int,
                  safety_folder: Path | None) -> SpaceCheck:
    """The space check of a restore over database `live` (in `tablespace`) from a dump of `dump_bytes`,
    `recorded`: the database's size when the backup was taken, if known; `safety_folder`: where a safety
    backup is taken first, if one is."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(datname) FROM pg_database WHERE datname = %s", (live,))
        found = cur.fetchone()
    size, source = estimate(recorded, found[0] if found else None, dump_bytes)
    return check_space(server, tablespace, size, source,
                       (safety_folder, dump_bytes) if safety_folder is not None else None)


def refuse_if_short(server: DbServer, check: SpaceCheck, in_place: bool, dump_bytes: int) -> None:
    """Refuse (exit 1, nothing changed) if a filesystem would fill up, with the figures, what the other mode
    would need, and what earlier restores keep."""
    short = check.shortfalls()
    if not short:
        return
    figures = "; ".join(demand.describe() for demand in short)
    if in_place:
        other = ("a swap restore (without --in-place) needs as much on the server and keeps the replaced "
                 "database afterwards")
    else:
        other = (f"--in-place needs no less on the server ({human_size(check.estimate)} and its WAL: its one "
                 "transaction frees the replaced tables only when it commits), plus about "
                 f"{human_size(dump_bytes)} in the backup folder for its safety backup; it only keeps no copy "
                 "of the replaced database afterwards")
    raise ToolkitError(f"not enough free space for this restore, nothing was changed: {figures}. {other}"
                       f"{_kept_note(server)}")


def _kept_note(server: DbServer) -> str:
    """What the databases kept by earlier restores of the live database take, if any."""
    with server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        kept = [s.name for s in scratch_databases(cur, server.name) if s.role in KEPT_ROLES]
        if not kept:
            return ""
        cur.execute("SELECT sum(pg_database_size(datname)) FROM pg_database WHERE datname = ANY(%s)", (kept,))
        total = cur.fetchone()[0] or 0
    return (f". Earlier restores keep {human_size(total)} in {', '.join(kept)}: `{APPLICATION_NAME} cleanup DAYS "
            "--keep N` drops old ones")
