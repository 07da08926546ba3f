"""Health checks for deciding whether a deployment needs rolling back: an HTTP endpoint's error rate and
95th-percentile response time, the host's CPU and memory use, and the PostgreSQL server's connections, longest
open transaction and blocked sessions.

The thresholds are the runbook's alert levels (error rate > 1 %, response time > 500 ms, CPU > 80 %,
memory > 80 %). Each can be changed with a HEALTH_* setting (environment, then .env) or a command-line flag.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from common.errors import ToolkitError, UsageError
from common.settings import Settings
from common.text import mask_url_password

if TYPE_CHECKING:
    import socket

    from database.server import DbServer

CPU_SAMPLE_SECONDS = 0.2
_GIB = 1024**3

# Thresholds field: (setting, smallest accepted value).
_SETTINGS = {
    "max_error_rate_percent": ("HEALTH_MAX_ERROR_RATE", 0),
    "max_p95_ms": ("HEALTH_MAX_P95_MS", 0),
    "max_cpu_percent": ("HEALTH_MAX_CPU", 0),
    "max_memory_percent": ("HEALTH_MAX_MEMORY", 0),
    "requests": ("HEALTH_REQUESTS", 1),
    "timeout_seconds": ("HEALTH_TIMEOUT", 0.1),  # a deadline for each whole request; 0 would fail them all
    "max_connections_percent": ("HEALTH_MAX_CONNECTIONS_PERCENT", 0),
    "max_transaction_seconds": ("HEALTH_MAX_TRANSACTION_SECONDS", 0),
    "max_blocked_sessions": ("HEALTH_MAX_BLOCKED", 0),
}


@dataclass
class Thresholds:
    """The level above which each check fails, and how the HTTP check samples the endpoint."""

    max_error_rate_percent: float = 1.0
    max_p95_ms: float = 500.0
    max_cpu_percent: float = 80.0
    max_memory_percent: float = 80.0
    requests: int = 20
    timeout_seconds: float = 5.0
    max_connections_percent: float = 80.0
    max_transaction_seconds: float = 300.0
    max_blocked_sessions: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: float | int | None) -> Thresholds:
        """The HEALTH_* settings over the defaults; overrides that are not None (command-line flags) win."""
        unknown = set(overrides) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"unknown thresholds: {', '.join(sorted(unknown))}")
        defaults, values = cls(), {}
        for name, (variable, minimum) in _SETTINGS.items():
            if overrides.get(name) is not None:
                # A flag replaces the setting, so a malformed value left in .env does not stop the run.
                values[name] = overrides[name]
                continue
            default = getattr(defaults, name)
            read = settings.integer if isinstance(default, int) else settings.number
            values[name] = read(variable, default, minimum=minimum)
        return cls(**values)


@dataclass
class Check:
    """One measurement against its threshold; it fails when the value is above the threshold."""

    name: str
    ok: bool
    value: float
    threshold: float
    unit: str
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """E.g. `FAIL  cpu: 93 % (threshold 80 %)`, with the detail after a dash when there is one."""
        text = (f"{'ok' if self.ok else 'FAIL':<6}{self.name}: {_number(self.value)} {self.unit} "
                f"(threshold {_number(self.threshold)} {self.unit})")
        return f"{text} - {self.detail}" if self.detail else text


@dataclass
class HealthReport:
    """The checks of one run; healthy when every check passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict:
        return {"ok": self.ok, "checks": [check.to_json() for check in self.checks]}

    def lines(self) -> list[str]:
        return [check.line() for check in self.checks]


def _number(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _measure(url: str, timeout: float) -> tuple[float, str | None]:
    """One GET of `url`, the whole of it (connection, headers, body, redirects) within `timeout` seconds:
    its time in ms and its error, if any. A server that trickles its answer is cut off at the deadline."""
    import http.client
    import urllib.error

    started = time.monotonic()
    deadline = _Deadline(started + timeout)
    try:
        with deadline, _opener(deadline).open(_request(url), timeout=timeout) as response:
            response.read()  # the time to the whole body is what a client waits for
            status = response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        status = exc.code  # urllib raises for a 304 or an unfollowed redirect too, which are not errors
    except (OSError, http.client.HTTPException) as exc:
        reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        if deadline.expired:
            reason = f"no whole answer within {timeout:g} s (HEALTH_TIMEOUT)"
        return (time.monotonic() - started) * 1000, reason
    elapsed_ms = (time.monotonic() - started) * 1000
    if deadline.expired:  # cut off, yet what arrived looked whole (a body without a length)
        return elapsed_ms, f"no whole answer within {timeout:g} s (HEALTH_TIMEOUT)"
    return elapsed_ms, None if 200 <= status < 400 else f"HTTP {status}"


def _request(url: str):  # -> urllib.request.Request
    """A GET of `url`; its `user:password@`, which urllib would take for part of the host name, is sent as
    HTTP basic authentication instead."""
    import base64
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)),
                                  headers={"Authorization": "Basic " + base64.b64encode(credentials).decode()})


class _Deadline:
    """Shuts down every socket a request opened once its time is up: a socket timeout bounds each read
    alone, so a server sending a byte a second would hold a request for as long as it liked."""

    def __init__(self, at: float):
        self.at = at
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._guard = threading.Lock()
        self._timer: threading.Timer | None = None

    def remaining(self) -> float:
        """Seconds left, never less than a millisecond (a socket timeout of 0 would mean non-blocking)."""
        return max(self.at - time.monotonic(), 0.001)

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline (at once if it has passed)."""
        with self._guard:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._guard:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        import socket  # loaded by _opener already

        try:
            # The plain socket's shutdown, also for a TLS socket: a blocked read returns at once (the
            # TLS layer's own shutdown would pull its state from under the reading thread).
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed, or handed over to the TLS socket

    def __enter__(self) -> _Deadline:
        self._timer = threading.Timer(self.remaining(), self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _opener(deadline: _Deadline):  # -> urllib.request.OpenerDirector
    """urllib's opener whose connections (a redirect's too) are watched by the deadline from the moment they
    are made, TLS handshake included. (The name lookup before is the resolver's; it has its own timeouts.)"""
    # Loaded only when a health URL is checked, not by every command's start.
    import http.client
    import socket
    import urllib.request

    def watched_connection(address: tuple[str, int], timeout: object = None, source_address: object = None
                           ) -> socket.socket:
        sock = socket.create_connection(address, deadline.remaining(), source_address)
        deadline.watch(sock)
        return sock

    class Connection(http.client.HTTPConnection):
        def __init__(self, *args: object, **kwargs: object):
            super().__init__(*args, **kwargs)
            self._create_connection = watched_connection

    class SecureConnection(http.client.HTTPSConnection):
        def __init__(self, *args: object, **kwargs: object):
            super().__init__(*args, **kwargs)
            self._create_connection = watched_connection

        def connect(self) -> None:
            super().connect()
            deadline.watch(self.sock)  # the TLS socket took the plain one's place

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):  # noqa: ANN001, ANN202 - urllib's signature
            return self.do_open(Connection, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # noqa: ANN001, ANN202 - urllib's signature
            return self.do_open(SecureConnection, req, context=self._context)

    return urllib.request.build_opener(Handler, SecureHandler)


def validate_url(url: str) -> None:
    """Refuse anything but an http(s) URL with a host (UsageError), before any work that a bad URL would cut short."""
    parts = urllib.parse.urlsplit(url)
    try:
        # A bad port raises here rather than failing every request as if the service were down.
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise UsageError("the health URL must be http://HOST[:PORT]/... or https://..., got "
                         f"{mask_url_password(url)!r}")


def check_http(url: str, thresholds: Thresholds) -> list[Check]:
    """GET `url` thresholds.requests times, one after another: the error rate and the p95 response time."""
    validate_url(url)
    if thresholds.requests < 1:
        raise UsageError(f"the health check needs at least 1 request, got {thresholds.requests}")
    times, errors = [], []
    for _ in range(thresholds.requests):
        elapsed_ms, error = _measure(url, thresholds.timeout_seconds)
        times.append(elapsed_ms)
        if error is not None:
            errors.append(error)
    total = len(times)
    rate = 100.0 * len(errors) / total
    error_detail = f"{len(errors)} of {total} requests failed" + (f", last: {errors[-1]}" if errors else "")
    # Nearest rank: an actual response time, and the slowest one when there are fewer than 20.
    p95 = sorted(times)[math.ceil(total * 95 / 100) - 1]  # 0.95 * total is not exact in binary
    all_failed = len(errors) == total
    return [
        Check("http error rate", rate <= thresholds.max_error_rate_percent, rate,
              thresholds.max_error_rate_percent, "%", error_detail),
        Check("http p95", p95 <= thresholds.max_p95_ms and not all_failed, p95, thresholds.max_p95_ms, "ms",
              "every request failed, so there is no response time to judge" if all_failed else ""),
    ]


def check_system(thresholds: Thresholds) -> list[Check]:
    """This host's CPU use over a short sample, and the share of memory in use."""
    import psutil

    cpu = psutil.cpu_percent(interval=CPU_SAMPLE_SECONDS)
    memory = psutil.virtual_memory()
    return [
        Check("cpu", cpu <= thresholds.max_cpu_percent, cpu, thresholds.max_cpu_percent, "%"),
        Check("memory", memory.percent <= thresholds.max_memory_percent, memory.percent,
              thresholds.max_memory_percent, "%",
              f"{memory.available / _GIB:.1f} GiB available of {memory.total / _GIB:.1f} GiB"),
    ]


# Only client backends: background workers (autovacuum, walwriter...) neither take connection slots nor count
# as an application's transactions.
_CONNECTIONS_SQL = """
SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       (SELECT setting::int FROM pg_settings WHERE name = 'max_connections')"""
_LONGEST_TRANSACTION_SQL = """
SELECT pid, state, extract(epoch FROM clock_timestamp() - xact_start)::float8 FROM pg_stat_activity
WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
  AND datname = current_database()
ORDER BY xact_start LIMIT 1"""
_BLOCKED_SQL = """
SELECT coalesce(array_agg(pid ORDER BY pid), '{}') FROM pg_stat_activity
WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0"""


def check_database(server: DbServer, thresholds: Thresholds) -> list[Check]:
    """Connections in use (of the whole server), and the longest transaction and blocked sessions in DB_NAME."""
    import psycopg2

    # Autocommit: pg_stat_activity is read once per transaction, and the check should hold none open.
    with server.session(autocommit=True) as conn:
        try:
            with conn.cursor() as cur:
                cur.execute(_CONNECTIONS_SQL)
                used, limit = cur.fetchone()
                cur.execute(_LONGEST_TRANSACTION_SQL)
                longest = cur.fetchone()
                cur.execute(_BLOCKED_SQL)
                blocked = cur.fetchone()[0]
        except psycopg2.Error as exc:
            lines = str(exc).strip().splitlines()
            raise ToolkitError(f"health check query on database {server.name!r} failed: "
                               f"{lines[0] if lines else type(exc).__name__}") from None
    used_percent = 100.0 * used / limit
    age = longest[2] if longest else 0.0
    return [
        Check("db connections", used_percent <= thresholds.max_connections_percent, used_percent,
              thresholds.max_connections_percent, "%", f"{used} of max_connections {limit}"),
        Check("db longest transaction", age <= thresholds.max_transaction_seconds, age,
              thresholds.max_transaction_seconds, "s",
              f"pid {longest[0]}, {longest[1] or 'state hidden'}" if longest else "no other open transaction"),
        Check("db blocked sessions", len(blocked) <= thresholds.max_blocked_sessions, float(len(blocked)),
              float(thresholds.max_blocked_sessions), "sessions",
              "waiting: pid " + ", ".join(map(str, blocked)) if blocked else ""),
    ]


def run_health(thresholds: Thresholds, url: str | None = None, server: DbServer | None = None,
               system: bool = True) -> HealthReport:
    """The HTTP checks if `url` is given, the system checks if `system`, the database checks if `server`."""
    checks = []
    if url is not None:
        checks += check_http(url, thresholds)
    if system:
        checks += check_system(thresholds)
    if server is not None:
        checks += check_database(server, thresholds)
    return HealthReport(checks)
