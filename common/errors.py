"""One exception hierarchy for the toolkit; each class carries the exit code `main()` returns."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_VERIFY = 3
EXIT_LOCKED = 75  # EX_TEMPFAIL from sysexits.h: try again later


class ToolkitError(Exception):
    """An operation failed; the message is the one line the operator sees."""

    exit_code = EXIT_FAILED


class FailedPartWay(ToolkitError):
    """A step that changes things failed after its first change; `undo` holds the commands that put back what it
    changed (the message shows them; --json gives them as `undo_commands`)."""

    def __init__(self, message: str, undo: list[str]):
        super().__init__(message)
        self.undo = undo


class UsageError(ToolkitError):
    """Bad usage or bad input (an unknown backup, invalid JSON, a path outside its root)."""

    exit_code = EXIT_USAGE


class SettingError(UsageError):
    """A missing or malformed setting; the message names the variable (`setting`, when one is to blame)."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class LockBusy(ToolkitError):
    """Another run holds the store's lock."""

    exit_code = EXIT_LOCKED


class Interrupted(ToolkitError):
    """The run was stopped by SIGINT or SIGTERM."""
