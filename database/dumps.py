"""pg_dump into the backup store, and pg_restore back (into the live database, or the one database.swap builds).

User-supplied names never reach argv: the database to dump comes through PGDATABASE, the one to restore
into as a quoted conninfo value, and the password through the memory-only PGPASSFILE of DbServer.run_client().
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from backup_store.manifest import MANIFEST, Backup
from backup_store.staging import Staging
from common.errors import ToolkitError, UsageError
from common.proc import run_tool
from database.scratch import UNDONE, scratch_name
from database.server import DbServer

DUMP_FILE = "db.dump"  # custom format: one file plain pg_restore reads
DUMP_DIR = "db.dir"  # directory format: dumped and restored in parallel
NO_SPACE = "No space left on device"  # strerror(ENOSPC), in pg_dump's, pg_restore's and the server's errors
_HEAD_BYTES = 4096
_CUSTOM_MAGIC = b"PGDMP"  # pg_dump --format=custom
_TAR_MAGIC, _TAR_MAGIC_AT = b"ustar", 257  # pg_dump --format=tar: a POSIX tar header
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass
class PgTools:
    """Where pg_dump and pg_restore are: PG_BINDIR if set, else PATH."""

    bindir: Path | None

    def path(self, name: str) -> str:
        """The tool's path, or its bare name to be found on PATH."""
        if self.bindir is None:
            return shutil.which(name) or name
        return str(self.bindir / name)

    def major(self, name: str) -> int:
        """The tool's major version (15 for `pg_dump (PostgreSQL) 15.18`)."""
        out = run_tool([self.path(name), "--version"], f"{name} --version").stdout.decode()
        match = _VERSION.search(out)
        if not match:
            raise ToolkitError(f"cannot read the version of {name} from {out.strip()!r}")
        return int(match.group(1))


@dataclass
class ServerInfo:
    """What the manifest records of the server and the database."""

    version: str
    major: int
    database_size: int

    @classmethod
    def read(cls, server: DbServer) -> ServerInfo:
        """Ask the server for its version and the database's size."""
        with server.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
                        " pg_database_size(current_database())")
            version, number, size = cur.fetchone()
        conn.close()
        return cls(version=version, major=number // 10000, database_size=size)


def check_client_version(tools: PgTools, server_major: int) -> int:
    """Refuse before the run if pg_dump or pg_dumpall is older than the server (it would fail mid-dump);
    pg_dump's major version."""
    versions = {name: tools.major(name) for name in ("pg_dump", "pg_dumpall")}
    for name, client in versions.items():
        if client < server_major:
            raise ToolkitError(
                f"{name} {client} is older than the server ({server_major}): install the PostgreSQL "
                f"{server_major} client (e.g. postgresql-client-{server_major}) or point PG_BINDIR at its bin folder"
            )
    return versions["pg_dump"]


def dump_into(staging: Staging, server: DbServer, tools: PgTools, fmt: str, jobs: int, compress: int | None) -> str:
    """Run pg_dump into the staging folder and record its output; returns the payload's name."""
    target = DUMP_FILE if fmt == "custom" else DUMP_DIR
    argv = [tools.path("pg_dump"), f"--format={fmt}", f"--file={staging.path / target}",
            f"--lock-wait-timeout={server.lock_timeout * 1000}", "--no-password"]
    if fmt == "directory" and jobs > 1:
        argv.append(f"--jobs={jobs}")
    if compress is not None:
        argv.append(f"--compress={compress}")
    try:
        server.run_client(argv, f"pg_dump of {server.name}", env={"PGDATABASE": server.name})
    except ToolkitError as exc:
        raise with_full_disk_named(exc, f"the backup folder {staging.path.parent} (BACKUP_DIR)") from None
    staging.adopt(target)
    return target


def with_full_disk_named(exc: ToolkitError, where: str) -> ToolkitError:
    """`exc`, saying which filesystem is full if it is a "No space left on device" (pg_dump names no path)."""
    if NO_SPACE not in str(exc):
        return exc
    named = ToolkitError(f"{exc} ({where} is on a full filesystem)")
    named.exit_code = exc.exit_code
    return named


def dump_path(backup: Backup) -> Path:
    """The dump inside a database backup."""
    # From the manifest, not the folder: a dump that is a symlink would make pg_restore read anything.
    for name, kind in ((DUMP_FILE, "file"), (DUMP_DIR, "dir")):
        if any(entry.path == name and entry.type == kind for entry in backup.entries):
            return backup.path / name
    raise ToolkitError(f"backup {backup.id} holds no {DUMP_FILE} or {DUMP_DIR}")


def dump_entries(server: DbServer, tools: PgTools, path: Path) -> list[str]:
    """The dump's table of contents as pg_restore --list prints it, one line per entry; a dump pg_restore
    cannot read is an error."""
    result = server.run_client([tools.path("pg_restore"), "--list", str(path)], f"pg_restore --list of {path}",
                               check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no error message"])[-1]
        raise ToolkitError(f"{path} is not a dump pg_restore can read: {last}")
    return [line for line in result.stdout.decode().splitlines() if line and not line.startswith(";")]


def subscriptions_in(entries: list[str]) -> list[str]:
    """The names of the subscriptions in a table of contents (`<id>; <oids> SUBSCRIPTION - <name> <owner>`)."""
    names = []
    for entry in entries:
        words = entry.split()
        if "SUBSCRIPTION" in words[:4] and len(words) > words.index("SUBSCRIPTION") + 2:
            names.append(words[words.index("SUBSCRIPTION") + 2])
    return names


def dump_size(path: Path) -> int:
    """The bytes of a dump file, or of every file in a directory-format dump."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


def conninfo_dbname(name: str) -> str:
    """A conninfo string naming only the database, quoted so the name is data, never options."""
    return "dbname='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def restore_into(server: DbServer, tools: PgTools, path: Path, dbname: str, jobs: int, single_transaction: bool,
                 clean: bool = False) -> None:
    """pg_restore a dump into `dbname`, stopping at the first error.

    Never its subscriptions: they name the replication slot the live database's subscription is using.
    A swap restore hands the live database's over instead; an in-place restore refuses a database that has some."""
    argv = [tools.path("pg_restore"), "--exit-on-error", "--no-password", "--no-subscriptions",
            f"--dbname={conninfo_dbname(dbname)}"]
    if clean:
        argv += ["--clean", "--if-exists"]
    if single_transaction:
        argv.append("--single-transaction")
    elif jobs > 1:
        argv.append(f"--jobs={jobs}")
    argv.append(str(path))
    server.run_client(argv, f"pg_restore into {dbname}")


def quote_identifier(name: str) -> str:
    """A database name as SQL text, for statements shown to the operator (the toolkit runs psycopg2.sql)."""
    return '"' + name.replace('"', '""') + '"'


def rename_back_statements(live: str, before: str) -> list[str]:
    """The SQL that puts the database kept as `before` back under the name `live`.

    New connections are refused and sessions ended first, as the swap itself did: a database cannot be
    renamed while anyone is connected to it. The one put aside gets a name that fits 63 bytes.
    """
    literal = "'" + live.replace("'", "''") + "'"
    return [
        f"ALTER DATABASE {quote_identifier(live)} WITH ALLOW_CONNECTIONS false",
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {literal} AND pid <> pg_backend_pid()",
        f"ALTER DATABASE {quote_identifier(live)} RENAME TO {quote_identifier(scratch_name(live, UNDONE))}",
        f"ALTER DATABASE {quote_identifier(before)} RENAME TO {quote_identifier(live)}",
        # The swap refused connections to the database it set aside; a run killed just after it left that so.
        f"ALTER DATABASE {quote_identifier(live)} WITH ALLOW_CONNECTIONS true",
    ]


def foreign_dump(ref: str) -> Path | None:
    """The pg_dump archive `ref` names if it was made outside the toolkit: a custom- or tar-format file, or a
    directory-format folder. None for a path inside a backup, or no path at all: the store resolves those.

    A plain SQL dump, or any other file, is refused here (exit 2), since pg_restore cannot read it.
    """
    path = Path(ref)
    if not path.exists():
        if ref.endswith(".dump"):
            raise UsageError(f"{ref}: no such file")
        return None
    if any((folder / MANIFEST).is_file() for folder in [path, *path.parents]):
        return None
    if path.is_dir():
        if (path / "toc.dat").is_file():
            return path
        raise UsageError(f"{ref} is neither a backup nor a pg_dump directory-format dump (no toc.dat in it)")
    try:
        with path.open("rb") as dump:
            head = dump.read(_HEAD_BYTES)
    except OSError as exc:
        raise UsageError(f"cannot read {ref}: {exc.strerror}") from None
    if head.startswith(_CUSTOM_MAGIC) or head[_TAR_MAGIC_AT:_TAR_MAGIC_AT + len(_TAR_MAGIC)] == _TAR_MAGIC:
        return path
    if _is_sql_text(head) or path.suffix == ".sql":
        raise UsageError(f"{ref} is a plain SQL dump: plain SQL dumps are not supported: use psql "
                         f"(psql -X -v ON_ERROR_STOP=1 -d DATABASE -f {ref}), or dump again with pg_dump -Fc")
    raise UsageError(f"{ref} is neither a backup nor a pg_dump archive (custom, directory or tar format)")


def _is_sql_text(head: bytes) -> bool:
    """Whether the start of a file reads as SQL text, as pg_dump --format=plain writes it."""
    if b"\0" in head:
        return False
    text = head.decode("utf-8", errors="replace").lstrip()
    return text.startswith(("--", "SET ", "CREATE ", "\\")) or "PostgreSQL database dump" in text
