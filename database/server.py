"""The PostgreSQL server the database script works on: its settings, connections, and running pg_dump /
pg_restore against it (the password only ever in a private, memory-only PGPASSFILE)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from common.components import DATABASE
from common.errors import SettingError, ToolkitError
from common.proc import ToolRun, run_tool, secret_file
from common.settings import Settings

APPLICATION_NAME = DATABASE.script  # the toolkit's own sessions are told apart from the application's by it
MAINTENANCE_DB = "postgres"  # where the toolkit connects to create, rename and drop databases
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

    def connect(self, dbname: str | None = None, autocommit: bool = False, keepalive: bool = False):
        """A psycopg2 connection to `dbname` (default DB_NAME); a failure is one line naming the server.

        `keepalive`: TCP keepalives, for a session that stays idle for long (a firewall or NAT would drop it)."""
        import psycopg2

        probes = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        try:
            conn = psycopg2.connect(
                host=self.host,
                port=self.port,
                dbname=dbname or self.name,
                user=self.user,
                password=self.password,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=APPLICATION_NAME,
                **(probes if keepalive else {}),
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

    def run_client(self, argv: list[str], what: str, env: dict[str, str] | None = None,
                   check: bool = True) -> ToolRun:
        """Run pg_dump/pg_restore/psql against this server (run_tool's rules; `env` adds to the environment).

        The password goes in a memory-only PGPASSFILE that the child opens as /proc/self/fd/N: there is no
        file on disk for a killed run to leave behind.
        """
        child_env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGAPPNAME": APPLICATION_NAME,
            "PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_SECONDS),
            **(env or {}),
        }
        if self.password is None:  # the operator's own ~/.pgpass or PGPASSFILE decides, as for psycopg2
            return run_tool(argv, what, env=child_env, check=check)
        line = "*:*:*:" + _pgpass_escape(self.user) + ":" + _pgpass_escape(self.password) + "\n"
        with secret_file(line) as passfile:
            child_env["PGPASSFILE"] = passfile.child_path
            return run_tool(argv, what, env=child_env, check=check, pass_fds=[passfile.fd])


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _without_password(message: str, password: str | None) -> str:
    return message.replace(password, "********") if password else message
