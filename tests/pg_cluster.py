"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary folder, removed on stop."""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from psycopg2.extensions import connection

SERVER_BINARIES = ("initdb", "pg_ctl")
DEBIAN_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
PORT_ATTEMPTS = 5
LOG_TAIL_LINES = 20
START_TIMEOUT_SECONDS = 60
# A tmpfs with room: the throwaway cluster's files never reach a disk, whose I/O other work on the machine
# shares, and files are made and removed without a journal (each database is a few hundred of them).
MEMORY_FOLDER = "/dev/shm"
MEMORY_FOLDER_MIN_FREE = 4 << 30
# What the postmaster logs when another process got the port between our probe and its bind.
_PORT_TAKEN = re.compile(r"could not bind|Address already in use|could not create any TCP/IP sockets")


class ClusterError(RuntimeError):
    """The throwaway cluster could not be set up, started or stopped."""


class ServerBinariesNotFound(ClusterError):
    """No initdb/pg_ctl on this machine: the test suite cannot run."""


def find_bindir(pg_config: str = "pg_config", pattern: str = DEBIAN_BINDIR_GLOB) -> str:
    """The folder holding initdb and pg_ctl: `pg_config --bindir`, else the newest match of `pattern`."""
    try:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    except OSError:
        result = None
    if result is not None and result.returncode == 0 and _has_server_binaries(result.stdout.strip()):
        return result.stdout.strip()
    # Debian/Ubuntu keep server binaries off PATH, one folder per major version.
    candidates = [path for path in glob.glob(pattern) if _has_server_binaries(path)]
    if candidates:
        return max(candidates, key=_version_key)
    raise ServerBinariesNotFound(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install the postgresql server package, "
        "e.g. apt-get install postgresql"
    )


def _has_server_binaries(bindir: str) -> bool:
    return bool(bindir) and all(
        os.path.isfile(os.path.join(bindir, name)) and os.access(os.path.join(bindir, name), os.X_OK)
        for name in SERVER_BINARIES
    )


def _version_key(bindir: str) -> tuple[int, ...]:
    # ".../postgresql/9.6/bin" must sort below ".../postgresql/15/bin", which string order gets wrong.
    version = os.path.basename(os.path.dirname(bindir.rstrip("/")))
    return tuple(int(part) for part in version.split(".")) if re.fullmatch(r"\d+(\.\d+)*", version) else (-1,)


def runuser() -> str:
    """runuser, which lives in /usr/sbin: cron's PATH and many CI images' (/usr/bin:/bin) leave that out."""
    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if found is None:
        raise ClusterError("runuser not found (it is in util-linux): needed to start the server as postgres")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Database:
    """One database in a ThrowawayCluster, with the settings the scripts read."""

    name: str
    cluster: ThrowawayCluster

    @property
    def env(self) -> dict[str, str]:
        return self.cluster.env(self.name)

    def connect(self, **overrides: str | int) -> connection:
        return self.cluster.connect(self.name, **overrides)


class ThrowawayCluster:
    """A private PostgreSQL server on a unix socket and 127.0.0.1, for one test session."""

    def __init__(self, bindir: str | None = None, settings: dict[str, str] | None = None,
                 data_dir: str | None = None, wal_dir: str | None = None, wal_segment_mb: int | None = None) -> None:
        """`settings`: postgresql.conf lines added to the defaults (e.g. {"max_wal_size": "64MB"}).
        `data_dir` and `wal_dir`: where initdb puts the cluster and its WAL (e.g. on a small filesystem the
        caller mounted), instead of inside the temporary folder; folders that must not exist yet.
        `wal_segment_mb`: initdb's --wal-segsize (16 by default), smaller for WAL that grows in small steps."""
        self.bindir = bindir or find_bindir()
        self._extra_settings = dict(settings or {})
        self._data_dir = data_dir
        self._wal_dir = wal_dir
        self._wal_segment_mb = wal_segment_mb
        self.user = SUPERUSER
        self.password = secrets.token_urlsafe(18)
        self.host = ""  # the socket folder, set by start()
        self.port = 0
        self._tmp: str | None = None
        # pg_ctl and postgres refuse to run as root, so as root every server command runs as postgres.
        self._server_account: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._server_account = pwd.getpwnam(SERVER_OS_USER)
            except KeyError:
                raise ClusterError(
                    f"running as root needs an OS user {SERVER_OS_USER!r} to run the PostgreSQL server: "
                    "install the postgresql server package or run the tests as an ordinary user"
                ) from None

    @property
    def data_dir(self) -> str:
        return self._data_dir or os.path.join(self._require_tmp(), "data")

    @property
    def log_file(self) -> str:
        return os.path.join(self._require_tmp(), "server.log")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create, configure and start the cluster; on failure clean up and raise ClusterError."""
        if self._tmp is not None:
            raise ClusterError("the cluster is already started")
        in_memory = memory_folder()
        self._tmp = tempfile.mkdtemp(prefix="pgtest-", dir=in_memory)
        if in_memory:  # WAL kept in memory is memory taken from the machine: checkpoint (cheap, no fsync) sooner
            self._extra_settings = {"max_wal_size": "256MB", **self._extra_settings}
        self.host = self._tmp
        try:
            self._own(self._tmp)
            self._initdb()
            self._start_server()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server at once and remove the temporary folder; a no-op if nothing is there."""
        tmp = self._tmp
        if tmp is None:
            return
        error: ClusterError | None = None
        try:
            pid = self._server_pid()
            if pid is not None:
                argv = [self._tool("pg_ctl"), "-D", self.data_dir, "-m", "immediate", "-w", "stop"]
                result = self._run(argv)
                # A pid file left by a server that already died is not a failure to stop.
                if result.returncode != 0 and _is_alive(pid):
                    error = self._failure("pg_ctl stop", result)
        finally:
            # Even if the stop failed, a postmaster whose data folder vanished shuts itself down.
            for made in (tmp, self._data_dir, self._wal_dir):
                if made is not None:
                    shutil.rmtree(made, ignore_errors=True)
            self._tmp = None
            self.port = 0
        if error is not None:
            raise error

    def dsn(self, dbname: str = "postgres", **overrides: str | int) -> str:
        """A libpq connection string for `dbname` (unix socket by default; host="127.0.0.1" for TCP)."""
        from psycopg2.extensions import make_dsn

        self._require_tmp()
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname,
            "connect_timeout": 10,
        }
        params.update(overrides)
        return make_dsn(**params)

    def connect(self, dbname: str = "postgres", **overrides: str | int) -> connection:
        """A new psycopg2 connection to `dbname`; the caller closes it."""
        import psycopg2

        return psycopg2.connect(self.dsn(dbname, **overrides))

    def query(self, dbname: str, statement: str) -> list:
        """Run `statement` in `dbname` outside a transaction block; the rows it returns, if any."""
        conn = self.connect(dbname)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def env(self, dbname: str) -> dict[str, str]:
        """The DB_* settings that point the toolkit's scripts at `dbname` in this cluster."""
        self._require_tmp()
        return {
            "DB_HOST": self.host,
            "DB_PORT": str(self.port),
            "DB_NAME": dbname,
            "DB_USER": self.user,
            "DB_PASSWORD": self.password,
        }

    def create_database(self, name: str) -> Database:
        """Create an empty database called `name`."""
        from psycopg2 import sql

        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return Database(name, self)

    def drop_database(self, name: str) -> None:
        """Drop `name` if it exists, ending any sessions still connected to it."""
        from psycopg2 import sql

        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def server_folder(self, prefix: str) -> str:
        """A new empty folder the server may write into (e.g. a tablespace's), removed with the cluster."""
        path = tempfile.mkdtemp(prefix=prefix, dir=self._require_tmp())
        self._own(path)
        return path

    def restart(self) -> None:
        """Start the server again on its port after it stopped (e.g. crashed), with its data as it is."""
        self._require_tmp()
        # A postmaster that gave up after a crash may still be on its way out, holding postmaster.pid.
        pid, deadline = self._server_pid(), time.monotonic() + START_TIMEOUT_SECONDS
        while pid is not None and _is_alive(pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"the server (pid {pid}) is still running: not restarted")
            time.sleep(0.05)
        argv = [self._tool("pg_ctl"), "-D", self.data_dir, "-l", self.log_file, "-w"]
        result = self._run([*argv, "-t", str(START_TIMEOUT_SECONDS), "start"])
        if result.returncode != 0:
            raise self._failure("pg_ctl start", result)

    def _admin(self, statement: object) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction block.
        conn = self.connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def _initdb(self) -> None:
        pwfile = os.path.join(self._require_tmp(), "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.password + "\n")
        self._own(pwfile)
        argv = [
            self._tool("initdb"),
            "-D", self.data_dir,
            "-U", self.user,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
            *([f"--waldir={self._wal_dir}"] if self._wal_dir else []),
            *([f"--wal-segsize={self._wal_segment_mb}"] if self._wal_segment_mb else []),
        ]  # fmt: skip
        try:
            result = self._run(argv)
        finally:
            os.unlink(pwfile)
        if result.returncode != 0:
            raise self._failure("initdb", result)
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a", encoding="utf-8") as conf:
            conf.write("\ninclude = 'throwaway.conf'\n")

    def _start_server(self) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            self._write_settings(port)
            log_offset = os.path.getsize(self.log_file) if os.path.exists(self.log_file) else 0
            argv = [self._tool("pg_ctl"), "-D", self.data_dir, "-l", self.log_file, "-w"]
            result = self._run([*argv, "-t", str(START_TIMEOUT_SECONDS), "start"])
            if result.returncode == 0:
                self.port = port
                return
            # The probe socket is closed before the server binds, so another process can win the port.
            if attempt < PORT_ATTEMPTS and _PORT_TAKEN.search(self._log_tail(log_offset)):
                continue
            raise self._failure("pg_ctl start", result, log_offset)

    def _write_settings(self, port: int) -> None:
        path = os.path.join(self.data_dir, "throwaway.conf")
        settings = {
            "listen_addresses": _conf_string("127.0.0.1"),
            "port": str(port),
            "unix_socket_directories": _conf_string(self._require_tmp()),
            "password_encryption": _conf_string("scram-sha-256"),
            # Durability is worthless for a cluster thrown away after the run; speed is not.
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            # Logical replication between two databases of the cluster: subscriptions across a swap restore.
            "wal_level": "logical",
            # An apply worker that stops (its subscription disabled, its database renamed) is started again
            # after this, not the default 5 s: the subscription tests wait on it several times each.
            "wal_retrieve_retry_interval": _conf_string("200ms"),
            **self._extra_settings,
        }
        with open(path, "w", encoding="utf-8") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._own(path)

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        prefix = [runuser(), "-u", SERVER_OS_USER, "--"] if self._server_account else []
        # Inherited PG* variables (PGDATA, PGPORT, PGOPTIONS...) would change what the server does.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            [*prefix, *argv],
            cwd=self._require_tmp(),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )

    def _failure(self, what: str, run: subprocess.CompletedProcess[str], log_offset: int = 0) -> ClusterError:
        output = (run.stderr.strip() or run.stdout.strip() or "(no output)").replace(self.password, "***")
        message = f"{what} failed (exit {run.returncode}): {output}"
        tail = self._log_tail(log_offset)
        if tail:
            message += f"\n--- server log (last lines) ---\n{tail}"
        return ClusterError(message)

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as log:
                log.seek(offset)
                lines = log.read().splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def _server_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid"), encoding="utf-8") as pidfile:
                return int(pidfile.readline().strip())
        except (OSError, ValueError):
            return None

    def _own(self, path: str) -> None:
        if self._server_account is not None:
            os.chown(path, self._server_account.pw_uid, self._server_account.pw_gid)

    def _tool(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _require_tmp(self) -> str:
        if self._tmp is None:
            raise ClusterError("the cluster is not started: call start() first")
        return self._tmp


def memory_folder(path: str = MEMORY_FOLDER, min_free: int = MEMORY_FOLDER_MIN_FREE) -> str | None:
    """`path` if it is a writable tmpfs mount with `min_free` bytes free, else None (the usual temporary folder)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            on_tmpfs = any(line.split()[1:3] == [path, "tmpfs"] for line in mounts)
        stats = os.statvfs(path)
    except OSError:
        return None
    return path if on_tmpfs and os.access(path, os.W_OK) and stats.f_bavail * stats.f_frsize >= min_free else None


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
