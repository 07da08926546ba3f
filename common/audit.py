"""The audit log: one JSON line per run, so the state before and after every change is on record."""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common.components import Component
from common.files import PRIVATE_FILE, make_private_dir
from common.settings import Settings

AUDIT_FILE = "audit.log"  # in the component's backup folder, unless AUDIT_LOG names another file
AUDIT_TIME = "%Y-%m-%dT%H:%M:%SZ"  # a run's start, UTC, to the second
# A line longer than this is no run's record (they are a few hundred bytes): it is passed over unread.
MAX_LINE = 1 << 20


def audit_log_path(settings: Settings, component: Component) -> Path:
    """Where a component's runs are recorded: AUDIT_LOG, else audit.log in its backup folder."""
    return settings.path("AUDIT_LOG") or component.store_path(settings) / AUDIT_FILE


def append_audit(path: Path, record: dict) -> None:
    """Append `record` (plus user and host) as one line to a private log file."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    line = json.dumps({"user": user, "host": os.uname().nodename, **record}, default=str) + "\n"
    make_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        # One write of one line: concurrent runs' lines do not interleave on a local filesystem.
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass
class AuditRecord:
    """One run as its audit line tells it: who ran which command of which script, when, and what came of it."""

    time: datetime  # the run's start (UTC, to the second)
    script: str
    command: str
    exit_code: int
    user: str | None = None
    host: str | None = None
    duration_s: float = 0.0
    arguments: dict = field(default_factory=dict)
    backup_ids: list[str] = field(default_factory=list)

    @property
    def changed_something(self) -> bool:
        """Ended with exit code 0 and was not a --dry-run."""
        return self.exit_code == 0 and self.arguments.get("dry_run") is not True

    @property
    def shown_time(self) -> str:
        """The start as the line has it."""
        return self.time.strftime(AUDIT_TIME)

    @classmethod
    def from_json(cls, data: object) -> AuditRecord | None:
        """The record of one parsed line; None for anything else (another shape, a field of the wrong type)."""
        if not isinstance(data, dict):
            return None
        try:
            time = datetime.strptime(data["time"], AUDIT_TIME).replace(tzinfo=UTC)
        except (KeyError, TypeError, ValueError):
            return None
        texts = [data.get(key) for key in ("script", "command", "user", "host")]
        exit_code, duration = data.get("exit_code"), data.get("duration_s", 0.0)
        arguments, ids = data.get("arguments", {}), data.get("backup_ids", [])
        if not (all(isinstance(text, str) for text in texts[:2])
                and all(text is None or isinstance(text, str) for text in texts[2:])
                and type(exit_code) is int and type(duration) in (int, float) and duration >= 0
                and isinstance(arguments, dict)
                and isinstance(ids, list) and all(isinstance(backup_id, str) for backup_id in ids)):
            return None
        return cls(time, texts[0], texts[1], exit_code, texts[2], texts[3], float(duration), arguments, ids)


def read_audit(path: Path, script: str | None = None) -> Iterator[AuditRecord]:
    """The runs an audit log records, oldest first, read one line at a time (a log can be large); with `script`,
    only that script's. Lines that are not a run's record (cut off, garbled, too long) are passed over.

    A log that does not exist yields nothing; one that cannot be read raises OSError."""
    needle = json.dumps(script).encode() if script else None  # most lines are skipped without being parsed
    try:
        log = open(path, "rb")  # noqa: SIM115 - closed below; a missing log is no error
    except FileNotFoundError:
        return
    with log:
        while line := log.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                while line and not line.endswith(b"\n"):  # the rest of the over-long line
                    line = log.readline(MAX_LINE)
                continue
            if needle is not None and needle not in line:
                continue
            try:
                record = AuditRecord.from_json(json.loads(line))
            except ValueError:  # not JSON, or not UTF-8
                continue
            if record is not None and (script is None or record.script == script):
                yield record
