"""The CLI contract every script keeps: global options, one result printer, exit codes, audit."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from backup_store.store import BackupStore, open_store
from commands.metrics import record_run
from commands.rto import OBJECTIVES, RtoReport, rto_for
from common.audit import append_audit
from common.errors import EXIT_FAILED, Interrupted, SettingError, ToolkitError, UsageError
from common.progress import show_progress
from common.settings import Settings
from common.text import mask_url_password
from offsite.pull import forbid_downloads

# A script's backup folder: its variable and default, e.g. ("CONFIG_BACKUP_DIR", "./config_backups").
StoreSetting = tuple[str, str]

EXIT_CODES_HELP = """exit codes:
  0   success
  1   the operation failed (nothing half-done: see the message)
  2   bad usage or bad input (nothing changed)
  3   verify found a problem
  75  another run holds the lock; try again later"""

RTO_COMMANDS = frozenset({"restore", "rollback"})  # timed against the component's recovery time objective
UNRECORDED_COMMANDS = frozenset({"list", "status", "locks"})  # they change nothing: no metrics


@dataclass
class Result:
    """What a command did: `data` for --json, `lines` for people, and the exit code."""

    data: dict
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0
    backup_ids: list[str] = field(default_factory=list)
    report: bool = False  # a report (list, verify, a plan) is printed even with --quiet


class Context:
    """What a command needs from the command line: settings, flags, and ways to talk to the operator."""

    def __init__(self, args: argparse.Namespace, settings: Settings, script: str, component: str = "",
                 store_setting: StoreSetting = ("", "")):
        self.args = args
        self.settings = settings
        self.script = script
        self.component = component  # the store's component name: config, code, db, point
        self.store_setting = store_setting
        self.json: bool = args.json
        self.dry_run: bool = args.dry_run
        self.yes: bool = args.yes
        self.quiet: bool = args.quiet
        self.verbose: bool = args.verbose

    def store(self) -> BackupStore:
        """The script's backup store."""
        return open_store(self.settings, self.store_setting, self.component)

    def info(self, message: str) -> None:
        """A progress or log line on stderr, unless --quiet."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def progress(self, label: str, measure: Callable[[], int],
                 total: int | Callable[[], int | None] | None) -> AbstractContextManager:
        """Show progress of long work on stderr (terminal only; never with --quiet or --json)."""
        return show_progress(label, measure, total, enabled=not (self.quiet or self.json))

    def warn(self, message: str) -> None:
        """A warning on stderr, always."""
        print(f"{self.script}: warning: {message}", file=sys.stderr, flush=True)

    def confirm(self, question: str) -> None:
        """Ask before a destructive step; without a terminal, refuse instead of waiting (use --yes)."""
        if self.yes:
            return
        if not sys.stdin.isatty():
            raise UsageError("this needs confirmation and there is no terminal to ask: pass --yes to go ahead")
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise UsageError("not confirmed: nothing changed")


def add_global_options(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    """The options every script and subcommand accepts, before or after the subcommand's name."""
    # In subcommands the defaults are suppressed, so an option given before the subcommand survives.
    default = argparse.SUPPRESS if in_subcommand else None
    group = parser.add_argument_group("global options")
    group.add_argument("--env-file", metavar="PATH", default=default,
                       help="read settings from this file instead of ./.env (relative paths in it, and the "
                            "default paths, are relative to its folder)")
    group.add_argument("--json", action="store_true", default=default or False,
                       help="print one JSON document on stdout and nothing else there")
    group.add_argument("--dry-run", action="store_true", default=default or False,
                       help="say what would change; change nothing")
    group.add_argument("--yes", "-y", action="store_true", default=default or False,
                       help="do not ask for confirmation (needed when there is no terminal)")
    group.add_argument("-q", "--quiet", action="store_true", default=default or False,
                       help="print only problems")
    group.add_argument("-v", "--verbose", action="store_true", default=default or False,
                       help="more detail; tracebacks on errors")
    group.add_argument("--metrics-file", metavar="PATH", default=default,
                       help="record the run for node_exporter's textfile collector in this .prom file "
                            "(default: the METRICS_FILE setting; none when unset); best effort: a lock kept "
                            "elsewhere for 5 s costs a warning, not the run")


def make_parser(prog: str, description: str, epilog: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A script's top-level parser with the global options and a place for its subcommands."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"{epilog}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    return parser, commands


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    handler: Callable[[Context], Result],
    summary: str,
    description: str | None = None,
    secret_args: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """Declare a subcommand; `secret_args` are kept out of the audit log."""
    sub = commands.add_parser(
        name,
        help=summary,
        description=description or summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(handler=handler, command=name, secret_args=secret_args)
    add_global_options(sub, in_subcommand=True)
    return sub


def add_backup_argument(sub: argparse.ArgumentParser, also: str = "") -> None:
    """BACKUP, the way every restore names a backup; `also` lists what else this component accepts."""
    sub.add_argument("backup", metavar="BACKUP",
                     help=f"a backup id, `latest`, a backup folder or a file inside one{also}")


def add_no_backup_argument(sub: argparse.ArgumentParser, what: str = "the current state") -> None:
    """--no-backup: skip the safety backup a destructive command takes first."""
    sub.add_argument("--no-backup", action="store_true", help=f"do not save {what} first")


def add_store_commands(commands: argparse._SubParsersAction, cleanup: Callable[[Context], Result],
                       listing: Callable[[Context], Result]) -> None:
    """`cleanup DAYS [--keep N] [--remote]`, `list [--remote]`, `push` and `pull`, which every script has."""
    sub = add_command(commands, "cleanup", _local_or_remote(cleanup, "cleanup_remote"),
                      "remove old backups, keeping the newest N (--remote: on the remote)")
    add_cleanup_arguments(sub)
    sub.add_argument("--remote", action="store_true",
                     help="apply the same rules to the copies on REMOTE_URL (while a remote manifest cannot be "
                          "read, it is kept and no object is removed)")
    sub = add_command(commands, "list", _local_or_remote(listing, "list_remote"),
                      "list the backups, newest first (--remote: those on REMOTE_URL)")
    sub.add_argument("--remote", action="store_true",
                     help="the backups on REMOTE_URL instead (a manifest that cannot be read is named in a warning)")
    sub = add_command(commands, "push", _remote_command("cmd_push"), "copy backups to REMOTE_URL (only what is new)",
                      "Uploads each payload file the remote does not have yet, then the manifest, last: a push\n"
                      "cut off at any moment leaves nothing `list --remote` shows, and the next one resumes.\n"
                      "A backup already there has its objects checked: what is missing, cut short or known\n"
                      "to be damaged (found by `verify --remote --deep` or a pull) is sent again.\n"
                      "An id the remote holds for other content (another host's backup) is refused (exit 1),\n"
                      "and the remote copy is left as it is.")
    sub.add_argument("backup", metavar="BACKUP", nargs="?", help="a backup id or `latest` (the default)")
    sub.add_argument("--all", action="store_true", help="every backup of the store")
    sub.add_argument("--repair", action="store_true",
                     help="also read back and hash every object the backups rely on, and send again what is "
                          "damaged (a damaged remote manifest of the backup too)")
    sub = add_command(commands, "pull", _remote_command("cmd_pull"), "bring a backup from REMOTE_URL into the store",
                      "Every byte's sha256 is checked while downloading; a missing or changed object refuses\n"
                      "the pull and leaves the local store as it was. `restore ID` pulls by itself.")
    sub.add_argument("backup", metavar="BACKUP", help="the id of a backup on the remote")


def add_verify_command(commands: argparse._SubParsersAction, handler: Callable[[Context], Result], summary: str,
                       description: str) -> argparse.ArgumentParser:
    """A script's `verify`, with `--remote [--deep]` checking the copies on REMOTE_URL instead."""
    sub = add_command(commands, "verify", _local_or_remote(handler, "verify_remote"), summary, description)
    sub.add_argument("--remote", action="store_true",
                     help="check that every remote manifest reads and every object it names exists with its size")
    sub.add_argument("--deep", action="store_true", help="with --remote: download each object and check its sha256")
    sub.add_argument("--repair", action="store_true",
                     help="with --remote: send each missing or damaged object (or manifest) again from the "
                          "local store")
    return sub


def add_backup_arguments(sub: argparse.ArgumentParser) -> None:
    """--label and --push, the same for every component's backup."""
    sub.add_argument("--label", help="a note kept with the backup, e.g. the release being deployed")
    sub.add_argument("--push", action="store_true",
                     help="copy it to REMOTE_URL as soon as it is made (REMOTE_AUTO_PUSH=1 does it always)")


def _remote_command(name: str) -> Callable[[Context], Result]:
    def handler(ctx: Context) -> Result:
        from offsite import commands as remote_commands  # boto3 and its kin only for the commands that talk to a remote

        return getattr(remote_commands, name)(ctx)

    return handler


def _local_or_remote(local: Callable[[Context], Result], remote: str) -> Callable[[Context], Result]:
    def handler(ctx: Context) -> Result:
        if getattr(ctx.args, "remote", False):
            return _remote_command(remote)(ctx)
        for flag in ("deep", "repair"):
            if getattr(ctx.args, flag, False):
                raise UsageError(f"--{flag} goes with --remote")
        return local(ctx)

    return handler


def add_cleanup_arguments(sub: argparse.ArgumentParser) -> None:
    """DAYS and --keep, the same for every component's cleanup."""
    sub.add_argument("days", metavar="DAYS", type=int, help="remove backups older than this many days")
    sub.add_argument("--keep", type=int, default=3, metavar="N",
                     help="always keep the newest N backups taken with `backup` (default 3, at least 1); "
                          "safety backups are not counted: those since the newest backup stay, older ones "
                          "go once older than DAYS")


def run(
    parser: argparse.ArgumentParser, component: str, store_setting: StoreSetting, argv: list[str] | None = None
) -> int:
    """Parse, run the chosen command, print its result, record it (audit log, metrics); return the exit code.

    `component` is the store's component name ("config", "code", "db"); `store_setting` names the script's
    backup folder (variable and default); the audit log is AUDIT_LOG, else audit.log in that folder.
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
        ctx = Context(args, settings, script, component, store_setting)
        for warning in settings.warnings:
            ctx.warn(warning)
        result = args.handler(ctx)
        _attach_rto(ctx, result, component, objective, time.monotonic() - started)
        if args.command == "backup" and result.exit_code == 0 and not ctx.dry_run and push_wanted(ctx):
            from offsite.commands import push_after_backup

            push_after_backup(ctx, result)
        _emit(result, args)
        code = result.exit_code
    except (ToolkitError, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            exc = Interrupted("interrupted by SIGINT")
        error, code = str(exc), exc.exit_code
        # With the backup folder's or the audit log's own setting wrong, the log would go to the wrong place.
        settings_broken = isinstance(exc, SettingError) and exc.setting in (store_setting[0], "AUDIT_LOG")
        _report_error(script, args, error, code)
    except Exception as exc:  # a bug: still one line, the traceback only with --verbose
        error, code = f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        _report_error(script, args, error + hint, code)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    duration = time.monotonic() - started
    if not settings_broken:
        _audit(script, args, settings, store_setting, started_at, duration, code, error, result)
    _record_metrics(script, args, settings, component, store_setting, code, duration, objective)
    return code


def push_wanted(ctx: Context) -> bool:
    """backup --push, or REMOTE_AUTO_PUSH=1."""
    return bool(getattr(ctx.args, "push", False)) or ctx.settings.text("REMOTE_AUTO_PUSH", "0") == "1"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted("interrupted by SIGTERM")


def _objective(args: argparse.Namespace, settings: Settings, component: str) -> float | None:
    """A restore's or rollback's RTO, read before the command runs so that a malformed setting changes nothing."""
    # A component without an objective of its own (a restore point spanning all three) is not timed here.
    if args.command not in RTO_COMMANDS or component not in OBJECTIVES:
        return None
    return rto_for(settings, component)


def _attach_rto(ctx: Context, result: Result, component: str, objective: float | None, seconds: float) -> None:
    """Report a finished restore or rollback against its RTO; a missed one is also a warning, not a failure."""
    if objective is None or ctx.dry_run or result.exit_code != 0:
        return
    report = RtoReport(component, ctx.args.command, seconds, objective)
    result.data["rto"] = report.to_json()
    result.lines.append(report.line())
    if not report.met:
        ctx.warn(report.line())  # stderr whatever --quiet or --json, so a missed objective is never silent


def _record_metrics(
    script: str,
    args: argparse.Namespace,
    settings: Settings | None,
    component: str,
    store_setting: StoreSetting,
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
        count, newest_bytes = _store_state(settings, component, store_setting)
        verify_ok = {0: True, 3: False}.get(code) if args.command == "verify" else None
        record_run(path, component, args.command, code == 0, duration, count, newest_bytes, verify_ok, objective)
    except Exception as exc:  # the command is over and its exit code stands, whatever went wrong here
        print(f"{script}: warning: the run was not recorded in the metrics file: {exc}", file=sys.stderr)


def _store_state(settings: Settings | None, component: str, store_setting: StoreSetting
                 ) -> tuple[int | None, int | None]:
    """How many backups the store holds and the newest one's size; unknown without settings."""
    if settings is None:
        return None, None
    store = BackupStore(settings.path(*store_setting), component)
    newest = store.newest()
    # The folders, not store.backups(): counting must not read every manifest of a large store.
    return len(store.backup_folders()), (newest.size if newest else None)


def _emit(result: Result, args: argparse.Namespace) -> None:
    if args.json:
        document = {"ok": result.exit_code == 0, "command": args.command, **result.data}
        _print_out(json.dumps(document, indent=2, default=str))
    elif result.lines and (result.report or result.exit_code != 0 or not args.quiet):
        _print_out("\n".join(result.lines))


def _print_out(text: str) -> None:
    """Print on stdout; a reader that has gone (`list | head`) took all it wanted, which is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Later writes, and the flush at exit, go nowhere instead of failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _report_error(script: str, args: argparse.Namespace, message: str, code: int) -> None:
    message = mask_url_password(message)
    if args.verbose:
        traceback.print_exc()
    print(f"{script}: error: {message}", file=sys.stderr)
    if args.json:
        _print_out(json.dumps({"ok": False, "command": args.command, "exit_code": code, "error": message}, indent=2))


def _audit(
    script: str,
    args: argparse.Namespace,
    settings: Settings | None,
    store_setting: StoreSetting,
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
        path = settings.path("AUDIT_LOG") or settings.path(*store_setting) / "audit.log"
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
