"""The one way the toolkit runs external tools: argv lists, no shell, stderr kept for the error message."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.errors import ToolkitError

_STOP_GRACE_SECONDS = 5
# Never inherited by a child: a password reaches a tool only through a private file named in `env`.
SECRET_VARIABLES = frozenset({"DB_PASSWORD", "PGPASSWORD"})
_STDERR_TAIL_LINES = 12


@dataclass
class ToolRun:
    """What a finished tool left behind."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: str


def run_tool(
    argv: list[str],
    what: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    stdout: IO[bytes] | None = None,
    check: bool = True,
    keep_secrets: bool = False,
    timeout: float | None = None,
) -> ToolRun:
    """Run `argv` and wait for it; with check, a non-zero exit raises a one-line error with stderr's tail.

    `env` is added to the inherited environment, from which SECRET_VARIABLES are removed: a secret
    reaches a child only as a private file named in `env` (a PGPASSFILE), never in argv or environ.
    `stdout` may be an open file to stream into; otherwise it is captured. `keep_secrets` is only for
    the toolkit's own scripts, which read DB_PASSWORD from their environment as this process did.
    After `timeout` seconds the child is stopped and the run fails.
    If this process is interrupted (SIGINT, or SIGTERM turned into an exception by the CLI) the child is
    terminated, then killed, before the exception goes on.
    """
    inherited = {key: value for key, value in os.environ.items() if keep_secrets or key not in SECRET_VARIABLES}
    child_env = {**inherited, **(env or {})}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env,
            cwd=cwd,
        )
    except FileNotFoundError:
        raise ToolkitError(f"{what}: {argv[0]} not found: install it or put it on PATH") from None
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_child(proc)
        raise ToolkitError(f"{what} did not finish within {timeout:g} s and was stopped") from None
    except BaseException:
        stop_child(proc)
        raise
    result = ToolRun(argv, proc.returncode, out or b"", err.decode("utf-8", "replace"))
    if check and proc.returncode != 0:
        raise ToolkitError(f"{what} failed (exit {proc.returncode}){_tail(result.stderr)}")
    return result


def stop_child(proc: subprocess.Popen) -> None:
    """Terminate a child, kill it if it lingers, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return ": " + " | ".join(lines[-_STDERR_TAIL_LINES:])
