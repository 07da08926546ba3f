"""`pip install .` gives the four commands, each a working front of its script, wherever it is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

COMMANDS = {"config-rollback": "config_rollback.py", "code-rollback": "code_rollback.py",
            "database-rollback": "database_rollback.py", "rollback": "rollback.py"}


def test_an_installed_package_puts_the_four_commands_on_path_and_each_runs(tmp_path: Path):
    source, target = tmp_path / "source", tmp_path / "site"
    # A copy of what the repository holds beside tests/, so the build leaves nothing in the work tree.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "tests", "bench", "examples", "build",
                                                                 "*.egg-info", "__pycache__", "*_backups",
                                                                 "backups"))
    # The build as `pip install .` makes it, without the network: the dependencies are this suite's own.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"  # not the source tree: everything must come from the installed copy
    elsewhere.mkdir()
    for command, script in COMMANDS.items():
        installed = target / "bin" / command
        assert installed.is_file(), f"{command} was not installed"
        shown = subprocess.run([str(installed), "--help"], env=env, cwd=elsewhere, capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"usage: {script}") and "exit codes:" in shown.stdout
        # A command that reads settings and the store runs from the installed packages alone.
        listed = subprocess.run([str(installed), "list", "--json"], env=env, cwd=elsewhere, capture_output=True,
                                text=True)
        assert listed.returncode == 0, listed.stderr
