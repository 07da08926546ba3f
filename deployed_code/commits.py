"""What REPO_PATH's git says of the commits the backups recorded: their tags, author and subject.

Read-only, and two git runs whatever the number of commits. A commit the repository does not have (a
crafted value, a history rewritten since, another repository) is simply not described.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.proc import ToolRun, run_tool
from deployed_code.git import is_repository

SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # sha1 or sha256 object names, as backups record them


@dataclass
class Commit:
    """One commit as `git log` shows it, with the tags that point at it."""

    author: str
    author_email: str
    subject: str
    tags: list[str] = field(default_factory=list)


def describe_commits(repo: Path | None, commits: Iterable[str]) -> tuple[dict[str, Commit], str | None]:
    """The commits of `commits` that `repo` has, by full sha; and why none could be looked up, if so."""
    wanted = sorted({commit for commit in commits if SHA.fullmatch(commit)})
    if repo is None:
        return {}, "REPO_PATH is not set"
    if not is_repository(repo):
        return {}, f"REPO_PATH {repo} is not a git repository"
    if not wanted:
        return {}, None
    # --ignore-missing: a sha the repository does not have is passed over instead of failing the run.
    log = _git(repo, "log", "--no-walk=unsorted", "--ignore-missing", "--stdin", "--format=%H%x00%an%x00%ae%x00%s",
               stdin="".join(f"{commit}\n" for commit in wanted))
    if log.returncode != 0:
        return {}, f"git log in {repo} failed: {log.stderr.strip()[:300]}"
    found: dict[str, Commit] = {}
    for line in _lines(log.stdout):
        parts = line.split("\0")
        if len(parts) == 4 and parts[0] in wanted:
            found[parts[0]] = Commit(*parts[1:])
    refs = _git(repo, "for-each-ref", "--format=%(objectname)%00%(*objectname)%00%(refname:strip=2)", "refs/tags")
    for line in _lines(refs.stdout) if refs.returncode == 0 else []:
        target, peeled, name = (line.split("\0") + ["", ""])[:3]
        commit = found.get(peeled or target)  # an annotated tag points at its tag object: the commit is peeled
        if commit is not None and name:
            commit.tags.append(name)
    for commit in found.values():
        commit.tags.sort()
    return found, None


def _git(repo: Path, *args: str, stdin: str | None = None) -> ToolRun:
    # Signatures off: a repository configured to show them would put their lines into the output.
    return run_tool(["git", "-C", str(repo), "-c", "log.showSignature=false", *args], f"git {args[0]}",
                    check=False, stdin=stdin.encode() if stdin is not None else None)


def _lines(output: bytes) -> list[str]:
    return [line for line in output.decode("utf-8", "replace").splitlines() if line]
