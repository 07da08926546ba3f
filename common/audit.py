"""The audit log: one JSON line per run, so the state before and after every change is on record."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

from common.files import PRIVATE_FILE, make_private_dir


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
