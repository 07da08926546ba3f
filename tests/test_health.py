"""Health checks against a real local HTTP server, this host, and the throwaway PostgreSQL cluster."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.errors import SettingError, ToolkitError, UsageError
from common.settings import Settings
from database.server import DbServer
from restore_points.health import Check, Thresholds, check_database, check_http, check_system, run_health

SLOW_SECONDS = 0.6
TRICKLE_SECONDS = 0.1
DEADLINE_SECONDS = 10
POLL_SECONDS = 0.02


class _Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.flaky_hits = 0
        self.flaky_guard = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path == "/ok":
            self._answer(200)
        elif self.path == "/slow":
            time.sleep(SLOW_SECONDS)  # the slowness is the behaviour under test
            self._answer(200)
        elif self.path == "/private":  # basic authentication as user `ops`, password `p@ss:word`
            expected = "Basic " + base64.b64encode(b"ops:p@ss:word").decode()
            self._answer(200 if self.headers.get("Authorization") == expected else 401)
        elif self.path in ("/trickle-body", "/trickle-headers"):
            self._trickle(headers_too=self.path == "/trickle-headers")
        elif self.path == "/flaky":
            with self.server.flaky_guard:
                self.server.flaky_hits += 1
                hit = self.server.flaky_hits
            self._answer(500 if hit % 2 == 0 else 200)
        else:
            self._answer(404)

    def _answer(self, status: int) -> None:
        body = f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, headers_too: bool) -> None:
        """A whole answer, one byte every TRICKLE_SECONDS: each read is quick, the request is not."""
        body = b"ok" * 100
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        if not headers_too:
            self.wfile.write(answer[: answer.index(b"\r\n\r\n") + 4])
            answer = body
        try:
            for byte in answer:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(TRICKLE_SECONDS)  # the trickle is the behaviour under test
        except OSError:
            pass  # the client gave up: what the test wants
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass  # keep pytest's captured output to the failures


@pytest.fixture
def web() -> Iterator[str]:
    """The base URL of a local HTTP server with /ok, /slow and /flaky."""
    server = _Server()
    # A short poll interval so that shutdown() returns at once instead of after up to half a second.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


# --- HTTP -------------------------------------------------------------------------------------------------


# A local request answers in milliseconds, but a machine busy with other work can hold one for half a second:
# the tests that are not about latency give p95 a limit no scheduler reaches.
UNREACHED_P95_MS = 10_000


def test_healthy_endpoint_passes(web):
    checks = by_name(check_http(f"{web}/ok", Thresholds(max_p95_ms=UNREACHED_P95_MS)))
    assert set(checks) == {"http error rate", "http p95"}
    assert checks["http error rate"].ok and checks["http error rate"].value == 0
    assert checks["http p95"].ok and 0 < checks["http p95"].value < UNREACHED_P95_MS


def test_slow_endpoint_fails_p95_not_error_rate(web):
    checks = by_name(check_http(f"{web}/slow", Thresholds(requests=3)))
    assert checks["http error rate"].ok
    assert not checks["http p95"].ok
    assert checks["http p95"].value >= SLOW_SECONDS * 1000


def test_flaky_endpoint_fails_error_rate(web):
    checks = by_name(check_http(f"{web}/flaky", Thresholds(requests=10, max_p95_ms=UNREACHED_P95_MS)))
    rate = checks["http error rate"]
    assert not rate.ok and rate.value == 50
    assert "5 of 10 requests failed" in rate.detail and "HTTP 500" in rate.detail
    assert checks["http p95"].ok


def test_unreachable_port_fails_with_every_request():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    checks = by_name(check_http(f"http://127.0.0.1:{port}/", Thresholds()))
    assert not checks["http error rate"].ok and checks["http error rate"].value == 100
    assert not checks["http p95"].ok and "every request failed" in checks["http p95"].detail


def test_a_url_with_user_and_password_is_sent_basic_authentication(web):
    """urllib takes `user:password@` for part of the host name: every request failed with a name lookup error."""
    base = web.replace("http://", "")
    assert by_name(check_http(f"http://ops:p%40ss%3Aword@{base}/private", Thresholds(requests=2)))[
        "http error rate"].ok
    rate = by_name(check_http(f"http://ops:wrong@{base}/private", Thresholds(requests=2)))["http error rate"]
    assert not rate.ok and "HTTP 401" in rate.detail
    with pytest.raises(UsageError) as refused:
        check_http(f"ftp://ops:p%40ss@{base}/", Thresholds())
    assert "p%40ss" not in str(refused.value) and "ftp://ops:********@" in str(refused.value)


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_health_timeout_is_a_deadline_for_the_whole_request(web, path):
    """A server answering a byte every 0.1 s took 20 s a request whatever HEALTH_TIMEOUT said."""
    started = time.monotonic()
    checks = by_name(check_http(f"{web}{path}", Thresholds(requests=2, timeout_seconds=0.5)))
    assert time.monotonic() - started < 5
    rate = checks["http error rate"]
    assert not rate.ok and rate.value == 100
    assert "no whole answer within 0.5 s (HEALTH_TIMEOUT)" in rate.detail


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/", "127.0.0.1:8080/health", "http://",
                                 "http://127.0.0.1:notaport/"])
def test_non_http_url_is_a_usage_error(url):
    with pytest.raises(UsageError, match="http://"):
        check_http(url, Thresholds())


# --- System -----------------------------------------------------------------------------------------------


def test_system_passes_at_100_percent_and_fails_below_zero():
    assert [check.ok for check in check_system(Thresholds(max_cpu_percent=100, max_memory_percent=100))] == [
        True, True]
    failing = by_name(check_system(Thresholds(max_cpu_percent=-1, max_memory_percent=-1)))
    assert not failing["cpu"].ok and not failing["memory"].ok
    assert failing["cpu"].line().startswith("FAIL  cpu: ")


# --- Database ---------------------------------------------------------------------------------------------


@pytest.fixture
def server(pg_db) -> DbServer:
    return DbServer.from_settings(Settings.load(None, environ=pg_db.env))


def wait_until_blocked(watcher, pid: int) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    with watcher.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", (pid,))
            if cur.fetchone()[0]:
                return
            time.sleep(POLL_SECONDS)
    raise AssertionError(f"session {pid} was not blocked within {DEADLINE_SECONDS} s")


def test_quiet_database_passes(server):
    report = run_health(Thresholds(max_transaction_seconds=0), server=server, system=False)
    assert report.ok, report.lines()
    checks = by_name(report.checks)
    assert set(checks) == {"db connections", "db longest transaction", "db blocked sessions"}
    assert 0 < checks["db connections"].value < 100
    assert checks["db longest transaction"].value == 0


def test_blocked_session_fails(pg_db, server):
    holder, waiter, watcher = pg_db.connect(), pg_db.connect(), pg_db.connect()
    watcher.autocommit = True  # a fresh pg_stat_activity snapshot on every poll
    errors: list[Exception] = []

    def read_locked_table() -> None:
        try:
            with waiter.cursor() as cur:
                cur.execute("SELECT count(*) FROM locked")
            waiter.rollback()
        except Exception as exc:  # reported by the test thread, where pytest sees it
            errors.append(exc)

    thread = threading.Thread(target=read_locked_table, daemon=True)
    try:
        with holder.cursor() as cur:
            cur.execute("CREATE TABLE locked (id int)")
            holder.commit()
            cur.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
        thread.start()
        wait_until_blocked(watcher, waiter.get_backend_pid())

        checks = by_name(check_database(server, Thresholds()))
        blocked = checks["db blocked sessions"]
        assert not blocked.ok and blocked.value == 1
        assert str(waiter.get_backend_pid()) in blocked.detail
        assert checks["db longest transaction"].ok  # the holder's transaction is seconds old, not minutes
    finally:
        holder.close()  # ends the transaction, so the waiter goes on
        thread.join(DEADLINE_SECONDS)
        waiter.close()
        watcher.close()
    assert not thread.is_alive() and not errors


def test_open_transaction_fails_longest_transaction(pg_db, server):
    holder = pg_db.connect()
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1")  # psycopg2 opens a transaction and leaves it open, idle
        longest = by_name(check_database(server, Thresholds(max_transaction_seconds=0)))["db longest transaction"]
        assert not longest.ok and longest.value > 0
        assert f"pid {holder.get_backend_pid()}, idle in transaction" in longest.detail
    finally:
        holder.close()


def test_unreachable_database_is_a_toolkit_error(pg_db):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**pg_db.env, "DB_HOST": "127.0.0.1", "DB_PORT": str(port)}
    with pytest.raises(ToolkitError, match="cannot connect"):
        check_database(DbServer.from_settings(Settings.load(None, environ=env)), Thresholds())


# --- Report -----------------------------------------------------------------------------------------------


def test_report_combines_parts_and_renders(web, server):
    report = run_health(Thresholds(max_cpu_percent=100, max_memory_percent=100, requests=3), url=f"{web}/ok",
                        server=server)
    assert [check.name for check in report.checks] == [
        "http error rate", "http p95", "cpu", "memory", "db connections", "db longest transaction",
        "db blocked sessions"]
    assert report.ok
    document = json.loads(json.dumps(report.to_json()))
    assert document["ok"] is True and len(document["checks"]) == 7
    assert set(document["checks"][0]) == {"name", "ok", "value", "threshold", "unit", "detail"}
    assert all(line.startswith("ok    ") for line in report.lines())

    failing = run_health(Thresholds(max_cpu_percent=-1), system=True)
    assert not failing.ok and failing.to_json()["ok"] is False


def test_check_line():
    assert Check("http p95", True, 12.04, 500.0, "ms").line() == "ok    http p95: 12 ms (threshold 500 ms)"
    assert Check("cpu", False, 93.0, 80.0, "%").line() == "FAIL  cpu: 93 % (threshold 80 %)"
    assert (Check("http error rate", False, 33.333, 1.0, "%", "1 of 3 requests failed").line()
            == "FAIL  http error rate: 33.3 % (threshold 1 %) - 1 of 3 requests failed")


# --- Settings ---------------------------------------------------------------------------------------------


def settings_with(tmp_path, environ: dict[str, str], file_text: str = "") -> Settings:
    env_file = tmp_path / "health.env"
    env_file.write_text(file_text)
    return Settings.load(str(env_file), environ=environ)


def test_thresholds_default_to_the_runbook(tmp_path):
    assert Thresholds.from_settings(settings_with(tmp_path, {})) == Thresholds()


def test_thresholds_read_environment_then_env_file(tmp_path):
    settings = settings_with(tmp_path, {"HEALTH_MAX_P95_MS": "250", "HEALTH_MAX_CPU": "70", "HEALTH_REQUESTS": "5"},
                             "HEALTH_MAX_CPU=95\nHEALTH_MAX_MEMORY=85.5\nHEALTH_MAX_BLOCKED=2\n")
    thresholds = Thresholds.from_settings(settings)
    assert (thresholds.max_p95_ms, thresholds.max_cpu_percent, thresholds.max_memory_percent) == (250, 70, 85.5)
    assert (thresholds.requests, thresholds.max_blocked_sessions) == (5, 2)
    assert thresholds.max_error_rate_percent == 1.0


def test_override_wins_and_none_does_not(tmp_path):
    settings = settings_with(tmp_path, {"HEALTH_MAX_P95_MS": "250", "HEALTH_MAX_CPU": "70"})
    thresholds = Thresholds.from_settings(settings, max_p95_ms=100, max_cpu_percent=None)
    assert (thresholds.max_p95_ms, thresholds.max_cpu_percent) == (100, 70)


@pytest.mark.parametrize("variable, value", [("HEALTH_MAX_P95_MS", "abc"), ("HEALTH_MAX_CPU", "nan"),
                                             ("HEALTH_REQUESTS", "0"), ("HEALTH_MAX_ERROR_RATE", "-1"),
                                             ("HEALTH_TIMEOUT", "0")])
def test_malformed_setting_names_the_variable(tmp_path, variable, value):
    with pytest.raises(SettingError, match=variable):
        Thresholds.from_settings(settings_with(tmp_path, {variable: value}))


def test_override_replaces_a_malformed_setting(tmp_path):
    settings = settings_with(tmp_path, {}, "HEALTH_MAX_P95_MS=abc\n")
    assert Thresholds.from_settings(settings, max_p95_ms=300).max_p95_ms == 300
