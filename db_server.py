"""The PostgreSQL server the database script works on: its settings, connections, and the environment for
pg_dump / pg_restore (the password only ever in a private PGPASSFILE)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import SettingError, ToolkitError
from common.files import PRIVATE_FILE
from common.settings import Settings

APPLICATION_NAME = "database_rollback.py"
CONNECT_TIMEOUT_SECONDS = 10


@dataclass
class DbServer:
    """Where the database is and how to reach it (DB_HOST may be a host name, an address or a socket folder)."""

    host: str
    port: int
    name: str
    user: str
    password: str | None
    lock_timeout: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DbServer:
        """DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD and DB_LOCK_TIMEOUT with the seed's defaults."""
        name = settings.text("DB_NAME", "ariesone")
        if len(name.encode()) > 63:
            raise SettingError(f"DB_NAME {name!r} is longer than PostgreSQL's 63-byte limit")
        return cls(
            host=settings.text("DB_HOST", "localhost"),
            port=settings.integer("DB_PORT", 5432, minimum=1, maximum=65535),
            name=name,
            user=settings.text("DB_USER", "postgres"),
            password=settings.text("DB_PASSWORD"),
            lock_timeout=settings.integer("DB_LOCK_TIMEOUT", 10, minimum=1),
        )

    def connect(self, dbname: str | None = None, autocommit: bool = False):
        """A psycopg2 connection to `dbname` (default DB_NAME); a failure is one line naming the server."""
        import psycopg2

        try:
            conn = psycopg2.connect(
                host=self.host,
                port=self.port,
                dbname=dbname or self.name,
                user=self.user,
                password=self.password,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=APPLICATION_NAME,
            )
        except psycopg2.OperationalError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
            raise ToolkitError(
                f"cannot connect to database {dbname or self.name!r} on {self.host}:{self.port} "
                f"as {self.user}: {_without_password(first_line, self.password)}"
            ) from None
        conn.autocommit = autocommit
        return conn

    @contextmanager
    def session(self, dbname: str | None = None, autocommit: bool = False) -> Iterator:
        """A connection for the length of a `with` block, closed whatever happens."""
        conn = self.connect(dbname, autocommit)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def tool_env(self) -> Iterator[dict[str, str]]:
        """Environment for pg_dump/pg_restore/psql: where to connect, and a private PGPASSFILE if needed."""
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGAPPNAME": APPLICATION_NAME,
            "PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_SECONDS),
        }
        folder = Path(tempfile.mkdtemp(prefix="rollback-pgpass-"))  # mkdtemp makes it 0700
        try:
            passfile = folder / "pgpass"
            line = "*:*:*:" + _pgpass_escape(self.user) + ":" + _pgpass_escape(self.password or "") + "\n"
            fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            with os.fdopen(fd, "w") as out:
                out.write(line)
            env["PGPASSFILE"] = str(passfile)
            yield env
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _without_password(message: str, password: str | None) -> str:
    return message.replace(password, "********") if password else message
