"""pgBackRest, the engine of large databases (DB_ENGINE=pgbackrest): the toolkit runs its binary and reads
its JSON; it reimplements none of it.

pgBackRest must run as the server's OS user (it reads the data directory and writes the repository that
user owns): as root, it is started through runuser as the owner of PGDATA (`postgres` without PGDATA).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.errors import SettingError, ToolkitError
from common.proc import ToolRun, run_tool
from common.settings import Settings

ENGINES = ("dump", "pgbackrest")
SERVER_OS_USER = "postgres"  # whom pgBackRest runs as, from root, when PGDATA does not say
MAX_AGE_HOURS = 24.0  # PGBACKREST_MAX_AGE_HOURS: an older newest backup is followed by a new one with a mark


class ArchivingBroken(ToolkitError):
    """`pgbackrest check` failed: WAL does not reach the repository, so no mark could be restored."""


def engine(settings: Settings) -> str:
    """DB_ENGINE: `dump` (pg_dump and pg_restore, the default) or `pgbackrest`."""
    name = settings.text("DB_ENGINE", "dump") or "dump"
    if name not in ENGINES:
        raise SettingError(f"DB_ENGINE={name!r}: use one of {', '.join(ENGINES)}", setting="DB_ENGINE")
    return name


@dataclass(frozen=True)
class BackupSet:
    """One pgBackRest backup, as `info` describes it."""

    label: str
    kind: str  # full, diff or incr
    started: int  # Unix time
    stopped: int
    size: int  # bytes of the database it copied
    wal_start: str | None
    wal_stop: str | None

    @classmethod
    def from_info(cls, data: dict) -> BackupSet:
        """One entry of the `backup` list of `pgbackrest info --output=json`."""
        archive, timestamp, info = data.get("archive") or {}, data.get("timestamp") or {}, data.get("info") or {}
        return cls(label=str(data.get("label")), kind=str(data.get("type")), started=int(timestamp.get("start", 0)),
                   stopped=int(timestamp.get("stop", 0)), size=int(info.get("size", 0)),
                   wal_start=archive.get("start"), wal_stop=archive.get("stop"))


@dataclass(frozen=True)
class PgBackRest:
    """How to run pgBackRest for this database's cluster: its stanza, its configuration, as whom."""

    stanza: str
    config: Path | None
    os_user: str | None  # set when running as root: the server's OS user, whom pgBackRest runs as

    @classmethod
    def from_settings(cls, settings: Settings) -> PgBackRest:
        """PGBACKREST_STANZA (required), PGBACKREST_CONFIG (pgBackRest's own default when unset), PGDATA."""
        stanza = settings.text("PGBACKREST_STANZA", required=True)
        config = settings.path("PGBACKREST_CONFIG")
        data_dir = settings.path("PGDATA")
        return cls(str(stanza), config, _server_os_user(data_dir) if os.geteuid() == 0 else None)

    def run(self, *args: str, what: str, check: bool = True) -> ToolRun:
        """Run `pgbackrest [--config=...] --stanza=... ARGS` as the server's OS user."""
        argv = ["pgbackrest", *([f"--config={self.config}"] if self.config else []), f"--stanza={self.stanza}",
                *args]
        return run_tool(self.as_server_user(argv), what, check=check)

    def as_server_user(self, argv: list[str]) -> list[str]:
        """`argv` run as the server's OS user (through runuser when this process is root)."""
        return argv if self.os_user is None else [_runuser(), "-u", self.os_user, "--", *argv]

    def check(self) -> None:
        """Raise ArchivingBroken, with pgBackRest's own reason, unless WAL reaches the repository now."""
        result = self.run("check", what="pgbackrest check", check=False)
        if result.returncode != 0:
            reason = _last_error(result.stderr or result.stdout.decode("utf-8", "replace"))
            raise ArchivingBroken(f"pgbackrest check failed: WAL archiving does not work, so a mark could not be "
                                  f"restored; nothing was changed ({reason})")

    def backups(self) -> list[BackupSet]:
        """The stanza's backups, oldest first."""
        out = self.run("info", "--output=json", what="pgbackrest info").stdout
        try:
            stanzas = json.loads(out)
        except ValueError:
            raise ToolkitError("pgbackrest info printed something that is not JSON") from None
        found = next((item for item in stanzas if item.get("name") == self.stanza), None)
        if found is None:
            raise ToolkitError(f"pgbackrest info does not know the stanza {self.stanza!r}: run stanza-create first")
        return [BackupSet.from_info(item) for item in found.get("backup") or []]

    def back_up(self, kind: str) -> None:
        """A pgBackRest backup of that type (full, diff or incr)."""
        self.run(f"--type={kind}", "backup", what=f"pgbackrest backup --type={kind}")


def _server_os_user(data_dir: Path | None) -> str:
    if data_dir is None:
        return SERVER_OS_USER
    try:
        return pwd.getpwuid(os.stat(data_dir).st_uid).pw_name
    except (OSError, KeyError) as exc:
        raise SettingError(f"PGDATA={data_dir}: its owner cannot be read ({exc})", setting="PGDATA") from None


def _runuser() -> str:
    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if found is None:
        raise ToolkitError("runuser not found (util-linux): needed to run pgbackrest as the server's OS user")
    return found


def _last_error(text: str) -> str:
    """pgBackRest's ERROR line (the reason), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line]
    return (errors or lines or ["no output"])[-1]
