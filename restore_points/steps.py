"""The three parts of a restore point: which script handles each, how rollback.py runs it, what undoes a step.

rollback.py runs the component scripts as child processes with `--json`, exactly as an operator would:
each keeps its own lock, safety backup, audit line and exit code, and the commands printed to undo a
step are the same commands, known to work.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from backup_store.locks import HeldLocks
from common.components import CONFIG, Component
from common.proc import run_tool
from common.settings import Settings
from common.text import printable
from database.dumps import rename_back_statements
from database.server import DbServer

ROOT = Path(__file__).resolve().parent.parent


def verify_args(component: Component, backup_id: str) -> list[str]:
    """The verify that follows a restore of `backup_id`."""
    return ["verify", "--against", backup_id] if component is CONFIG else ["verify"]


@dataclass
class ScriptRun:
    """One finished run of a component script."""

    component: Component
    args: list[str]
    exit_code: int
    data: dict
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Exit code 0."""
        return self.exit_code == 0

    @property
    def problems(self) -> list[str]:
        """What a verify found (its `problems`), each on one line."""
        found = self.data.get("problems")
        return [printable(str(problem).strip()) for problem in found] if isinstance(found, list) else []

    @property
    def error(self) -> str:
        """The one-line error the script printed, for the report."""
        if self.data.get("error"):
            return printable(str(self.data["error"]))
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return printable(lines[-1]) if lines else f"exit code {self.exit_code}"


@dataclass
class ScriptRunner:
    """Runs the component scripts with the settings rollback.py was given."""

    env_file: str | None = None
    metrics_file: str | None = None
    cwd: Path = field(default_factory=Path.cwd)
    locks: HeldLocks | None = None  # store locks this run holds: each script runs under them, not beside them

    def argv(self, component: Component, *args: str) -> list[str]:
        """The full command line of one script run (also what the undo commands print)."""
        options = ["--env-file", os.path.abspath(self.env_file)] if self.env_file else []
        if self.metrics_file:
            options += ["--metrics-file", os.path.abspath(self.metrics_file)]
        return [sys.executable, str(ROOT / component.script), *options, *args]

    def run(self, component: Component, *args: str, env: dict[str, str] | None = None) -> ScriptRun:
        """Run the script with --json and wait; its exit code and JSON document come back, never an exception.

        `env` overrides settings for this run only (the drill points DB_NAME at its scratch database)."""
        started = time.monotonic()
        # The children are this toolkit: they get DB_PASSWORD the way this process did.
        done = run_tool(self.argv(component, "--json", *args), component.script,
                        env={**self._lock_env(), **(env or {})}, cwd=self.cwd, check=False, keep_secrets=True,
                        pass_fds=self._lock_fds())
        try:
            data = json.loads(done.stdout.decode() or "{}")
        except ValueError:
            data = {}
        return ScriptRun(component, list(args), done.returncode, data, done.stderr, time.monotonic() - started)

    def preview(self, component: Component, *args: str) -> tuple[int, list[str]]:
        """What the script's step (`restore BACKUP`, or the database's `rollback MIGRATION`) says with --dry-run
        it would change: its exit code and its lines (its report, or its one-line error)."""
        done = run_tool(self.argv(component, *args, "--dry-run"), component.script, cwd=self.cwd,
                        env=self._lock_env(), check=False, keep_secrets=True, pass_fds=self._lock_fds())
        text = done.stdout.decode(errors="replace") if done.returncode == 0 else done.stderr
        return done.returncode, [line for line in text.splitlines() if line.strip()]

    def _lock_env(self) -> dict[str, str]:
        return self.locks.child_env() if self.locks else {}

    def _lock_fds(self) -> tuple[int, ...]:
        return self.locks.fds if self.locks else ()

    def shell_line(self, component: Component, *args: str) -> str:
        """A command an operator can paste: run from the same folder, with the same settings."""
        return f"cd {shlex.quote(str(self.cwd))} && {shlex.join(self.argv(component, *args))}"


def undo_commands(step: ScriptRun, runner: ScriptRunner, settings: Settings) -> list[str]:
    """What puts back the state a successful restore step replaced."""
    if step.args[:1] == ["rollback"]:  # a schema rollback: migrating up again keeps the rows written since
        undone = step.data.get("rolled_back") or []
        return [runner.shell_line(step.component, "migrate", undone[0])] if undone else []
    if step.data.get("undo_commands"):  # a restore to a mark: the commands that put the old data directory back
        return list(step.data["undo_commands"])
    safety = step.data.get("safety_backup")
    if safety:
        return [runner.shell_line(step.component, "restore", safety, "--yes")]
    previous = step.data.get("previous_database")
    if previous:  # a swap restore keeps the replaced database whole: renaming it back is the undo
        return [_rename_back(settings, step.data["database"], previous)]
    return []


def _rename_back(settings: Settings, database: str, previous: str) -> str:
    """A psql command, on DB_HOST/DB_PORT as DB_USER, that puts `previous` back under the name `database`.

    The password comes from the operator's PGPASSWORD or .pgpass.
    """
    server = DbServer.from_settings(settings)
    argv = ["psql", "-h", server.host, "-p", str(server.port), "-U", server.user, "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-X", "-q"]
    for statement in rename_back_statements(database, previous):
        argv += ["-c", statement]
    return shlex.join(argv)
