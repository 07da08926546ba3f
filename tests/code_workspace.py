"""A code workspace for the tests: a git repository with a tag, a deployed release, a store."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from helpers import Terminal, git, run_script, script_argv, script_env, tree_snapshot


class CodeWorkspace:
    """A git repository, a deployed release (a plain folder or a `current` symlink), and a store."""

    def __init__(self, root: Path, symlink_layout: bool):
        self.root = root
        self.repo = root / "repo"
        self.store = root / "code_backups"
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        (self.repo / "app.py").write_text("print('v1')\n")
        (self.repo / "pkg").mkdir()
        (self.repo / "pkg" / "__init__.py").write_text("")
        (self.repo / "run.sh").write_text("#!/bin/sh\nexec python app.py\n")
        os.chmod(self.repo / "run.sh", 0o755)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", "v1")
        git(self.repo, "tag", "v1")
        release = root / "releases" / "v1"
        release.parent.mkdir()
        subprocess.run(["cp", "-a", str(self.repo), str(release)], check=True)
        subprocess.run(["rm", "-rf", str(release / ".git")], check=True)
        (release / "empty").mkdir()
        os.symlink("/etc/hostname", release / "outside-link")
        if symlink_layout:
            self.live = root / "current"
            os.symlink("releases/v1", self.live)
        else:
            self.live = root / "deploy"
            os.rename(release, self.live)
        self.env = {"REPO_PATH": str(self.repo), "DEPLOYMENT_DIR": str(self.live),
                    "CODE_BACKUP_DIR": str(self.store)}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return run_script("code_rollback.py", *args, env=self.env, cwd=self.root)

    def run_asked(self, *args: str, meanwhile: Callable[[], None]) -> tuple[int, str]:
        """Run at a terminal that is asked for confirmation: once the question is on the screen, `meanwhile` runs
        (what happens while the operator reads it), then the operator answers y. The exit code and stdout."""
        terminal = Terminal()
        proc = subprocess.Popen(script_argv("code_rollback.py", *args), env=script_env(self.env), cwd=self.root,
                                stdin=terminal.follower, stdout=subprocess.PIPE, stderr=terminal.follower, text=True)
        os.close(terminal.follower)
        terminal.wait_for(rb"\[y/N\] ")
        meanwhile()
        os.write(terminal.leader, b"y\n")
        out, _ = proc.communicate(timeout=120)
        terminal.screen()
        return proc.returncode, out

    def tree(self) -> dict:
        return tree_snapshot(Path(os.path.realpath(self.live)))

    def backup_ids(self) -> list[str]:
        return [b["id"] for b in json.loads(self.run("--json", "list").stdout)["backups"]]


def commit_v2(cw: CodeWorkspace) -> None:
    """A second commit on main: app.py changed, v2.py added."""
    (cw.repo / "app.py").write_text("print('v2')\n")
    (cw.repo / "v2.py").write_text("NEW = True\n")
    git(cw.repo, "add", "-A")
    git(cw.repo, "commit", "-q", "-m", "v2")


def git_archive_tree(repo: Path, rev: str, into: Path) -> dict:
    """What `git archive REV | tar -x` gives, as tree_snapshot sees it."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "-c", "tar.umask=022", "archive", rev],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return tree_snapshot(into)


def in_place_workspace(tmp_path: Path) -> CodeWorkspace:
    """REPO_PATH is what runs (no DEPLOYMENT_DIR), with v1 tagged and v2 committed on main."""
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    del cw.env["DEPLOYMENT_DIR"]
    cw.live = cw.repo
    commit_v2(cw)
    return cw
