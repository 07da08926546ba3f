"""The CLI contract every script keeps: global options, one result printer, exit codes, audit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from common.components import Component
from common.errors import UsageError
from common.progress import show_progress
from common.settings import Settings
from common.text import mask_url_password

EXIT_CODES_HELP = """exit codes:
  0   success
  1   the operation failed (nothing half-done: see the message)
  2   bad usage or bad input (nothing changed)
  3   verify found a problem
  75  another run holds the lock; try again later"""



@dataclass
class Result:
    """What a command did: `data` for --json, `lines` for people, and the exit code."""

    data: dict
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0
    backup_ids: list[str] = field(default_factory=list)
    report: bool = False  # a report (list, verify, a plan) is printed even with --quiet
    # Text made while it is printed, after `lines` (a script too long to hold in memory); never with --json.
    stream: Iterable[str] | None = None


class Context:
    """What a command needs from the command line: settings, flags, and ways to talk to the operator."""

    def __init__(self, args: argparse.Namespace, settings: Settings, component: Component, script: str = ""):
        self.args = args
        self.settings = settings
        self.component = component
        self.script = script or component.script
        self.json: bool = args.json
        self.dry_run: bool = args.dry_run
        self.yes: bool = args.yes
        self.quiet: bool = args.quiet
        self.verbose: bool = args.verbose

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

    def confirm(self, question: str) -> bool:
        """Ask before a destructive step; without a terminal, refuse instead of waiting (use --yes). Whether the
        operator was asked (and said yes): what was checked before the question may have changed meanwhile."""
        if self.yes:
            return False
        if not sys.stdin.isatty():
            raise UsageError("this needs confirmation and there is no terminal to ask: pass --yes to go ahead")
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise UsageError("not confirmed: nothing changed")
        return True


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


def add_backup_arguments(sub: argparse.ArgumentParser) -> None:
    """--label and --push, the same for every component's backup."""
    sub.add_argument("--label", help="a note kept with the backup, e.g. the release being deployed")
    sub.add_argument("--push", action="store_true",
                     help="copy it to REMOTE_URL as soon as it is made (REMOTE_AUTO_PUSH=1 does it always)")


def add_cleanup_arguments(sub: argparse.ArgumentParser) -> None:
    """DAYS, --keep and the calendar rules, the same for every component's cleanup."""
    sub.add_argument("days", metavar="DAYS", type=int, nargs="?",
                     help="keep every backup taken with `backup` that is younger than this many days")
    sub.add_argument("--keep", type=int, metavar="N",
                     help="keep the newest N backups taken with `backup` (default 3 beside DAYS, at least 1)")
    sub.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N backups taken with `backup`")
    for name, period in (("daily", "days"), ("weekly", "ISO weeks"), ("monthly", "months"), ("yearly", "years")):
        sub.add_argument(f"--keep-{name}", type=int, metavar="N",
                         help=f"keep the newest backup of each of the last N {period} that have one (UTC)")


def push_wanted(ctx: Context) -> bool:
    """backup --push, or REMOTE_AUTO_PUSH=1."""
    return bool(getattr(ctx.args, "push", False)) or ctx.settings.text("REMOTE_AUTO_PUSH", "0") == "1"


def emit(result: Result, args: argparse.Namespace) -> None:
    """Print a result: one JSON document with --json, else its lines (unless --quiet and not a report), then
    its stream."""
    if args.json:
        document = {"ok": result.exit_code == 0, "command": args.command, **result.data}
        print_out(json.dumps(document, indent=2, default=str))
        return
    if result.lines and (result.report or result.exit_code != 0 or not args.quiet):
        print_out("\n".join(result.lines))
    for text in result.stream or ():
        if not print_out(text):
            break  # nobody reads the rest: stop making it


def print_out(text: str) -> bool:
    """Print on stdout; a reader that has gone (`list | head`) took all it wanted, which is not an error
    (False then: nothing more needs printing)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Later writes, and the flush at exit, go nowhere instead of failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


def report_error(script: str, args: argparse.Namespace, message: str, code: int, undo: list[str] | None = None
                 ) -> None:
    """The one line a failure prints (stderr; and a JSON document with --json), the traceback with --verbose;
    `undo`: the commands that put back what a step failing part-way changed (in the message too)."""
    message = mask_url_password(message)
    if args.verbose:
        import traceback  # only for --verbose: it costs every command's start a few milliseconds

        traceback.print_exc()
    print(f"{script}: error: {message}", file=sys.stderr)
    if args.json:
        document = {"ok": False, "command": args.command, "exit_code": code, "error": message}
        print_out(json.dumps({**document, **({"undo_commands": undo} if undo else {})}, indent=2))


