"""Running one command of a script: settings, the handler, the printed result, and what every run records.

Around each command's handler: the audit log line, the metrics file, the recovery time objective of a
restore or rollback, and the push after a backup when one is wanted. A failure becomes one line and its
exit code here, whatever raised it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime

from commands.metrics import record_run
from commands.rto import RtoReport, rto_for
from common.audit import append_audit, audit_log_path
from common.cli import Context, Result, emit, push_wanted, report_error
from common.components import Component
from common.errors import EXIT_FAILED, EXIT_VERIFY, FailedPartWay, Interrupted, SettingError, ToolkitError
from common.settings import Settings
from common.text import mask_url_password
from offsite.commands import push_after_backup
from offsite.pull import forbid_downloads, open_store

RTO_COMMANDS = frozenset({"restore", "rollback"})  # timed against the component's recovery time objective
UNRECORDED_COMMANDS = frozenset({"list", "history", "status", "locks", "changes"})  # they change nothing: no metrics


def run(parser: argparse.ArgumentParser, component: Component, argv: list[str] | None = None) -> int:
    """Parse, run the chosen command, print its result, record it (audit log, metrics); return the exit code.

    The audit log is AUDIT_LOG, else audit.log in the component's backup folder.
    """
    args = parser.parse_args(argv)
    script = parser.prog
    started, started_at = time.monotonic(), datetime.now(UTC)
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    settings: Settings | None = None
    settings_broken = False
    result: Result | None = None
    error: str | None = None
    objective: float | None = None
    if args.dry_run:
        forbid_downloads()
    try:
        settings = Settings.load(args.env_file)
        objective = _objective(args, settings, component)
        ctx = Context(args, settings, component, script)
        for warning in settings.warnings:
            ctx.warn(warning)
        result = args.handler(ctx)
        _attach_rto(ctx, result, component, objective, time.monotonic() - started)
        if args.command == "backup" and result.exit_code == 0 and not ctx.dry_run and push_wanted(ctx):
            push_after_backup(ctx, result)
        emit(result, args)
        code = result.exit_code
    except (ToolkitError, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            exc = Interrupted("interrupted by SIGINT")
        error, code = str(exc), exc.exit_code
        # With the backup folder's or the audit log's own setting wrong, the log would go to the wrong place.
        settings_broken = isinstance(exc, SettingError) and exc.setting in (component.store_setting, "AUDIT_LOG")
        report_error(script, args, error, code, exc.undo if isinstance(exc, FailedPartWay) else None)
    except Exception as exc:  # a bug: still one line, the traceback only with --verbose
        error, code = f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        report_error(script, args, error + hint, code)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    duration = time.monotonic() - started
    if not settings_broken:
        _audit(script, args, settings, component, started_at, duration, code, error, result)
    _record_metrics(script, args, settings, component, code, duration, objective)
    return code


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted("interrupted by SIGTERM")


def _objective(args: argparse.Namespace, settings: Settings, component: Component) -> float | None:
    """A restore's or rollback's RTO, read before the command runs so that a malformed setting changes nothing."""
    # A component without an objective of its own (a restore point spanning all three) is not timed here.
    if args.command not in RTO_COMMANDS or component.rto_setting is None:
        return None
    return rto_for(settings, component.name)


def _attach_rto(ctx: Context, result: Result, component: Component, objective: float | None, seconds: float) -> None:
    """Report a finished restore or rollback against its RTO; a missed one is also a warning, not a failure."""
    if objective is None or ctx.dry_run or result.exit_code != 0:
        return
    report = RtoReport(component.name, ctx.args.command, seconds, objective)
    result.data["rto"] = report.to_json()
    result.lines.append(report.line())
    if not report.met:
        ctx.warn(report.line())  # stderr whatever --quiet or --json, so a missed objective is never silent


def _record_metrics(
    script: str,
    args: argparse.Namespace,
    settings: Settings | None,
    component: Component,
    code: int,
    duration: float,
    objective: float | None,
) -> None:
    """Record the run in the metrics file, if one is configured; a failure to do so is only a warning."""
    if args.dry_run or args.command in UNRECORDED_COMMANDS:
        return
    try:
        path = args.metrics_file or (settings.path("METRICS_FILE") if settings is not None else None)
        if path is None:
            return
        count, newest_bytes = _store_state(settings, component)
        verify_ok = {0: True, EXIT_VERIFY: False}.get(code) if args.command == "verify" else None
        record_run(path, component.name, args.command, code == 0, duration, count, newest_bytes, verify_ok, objective)
    except Exception as exc:  # the command is over and its exit code stands, whatever went wrong here
        print(f"{script}: warning: the run was not recorded in the metrics file: {exc}", file=sys.stderr)


def _store_state(settings: Settings | None, component: Component) -> tuple[int | None, int | None]:
    """How many backups the store holds and the newest one's size; unknown without settings."""
    if settings is None:
        return None, None
    store = open_store(settings, component)
    newest = store.newest()
    # The folders, not store.backups(): counting must not read every manifest of a large store.
    return len(store.backup_folders()), (newest.size if newest else None)


def _audit(
    script: str,
    args: argparse.Namespace,
    settings: Settings | None,
    component: Component,
    started_at: datetime,
    duration: float,
    code: int,
    error: str | None,
    result: Result | None,
) -> None:
    hidden = {"handler", "secret_args", "command", *args.secret_args}
    # A URL's password (--health-url http://user:password@...) is a secret wherever it is given.
    arguments = {key: mask_url_password(value) if isinstance(value, str) else value
                 for key, value in vars(args).items() if key not in hidden}
    arguments.update({key: "<redacted>" for key in args.secret_args})
    try:
        settings = settings or Settings.load(None)
        path = audit_log_path(settings, component)
    except ToolkitError:
        return  # settings too broken to know where the log lives; the error was already shown
    record = {
        "time": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "script": script,
        "command": args.command,
        "arguments": arguments,
        "exit_code": code,
        "result": "ok" if code == 0 else mask_url_password(error or f"exit {code}"),
        "duration_s": round(duration, 3),
        "backup_ids": result.backup_ids if result else [],
    }
    try:
        append_audit(path, record)
    except OSError as exc:
        print(f"{script}: warning: could not write the audit log {path}: {exc}", file=sys.stderr)
