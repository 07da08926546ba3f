"""The git side of the code component: the working copy's state, a commit's tree exported safely, HEAD put back.

- `git_state` records where HEAD is (commit and branch, or a branch with no commit yet) for a backup.
- `export_commit` writes a commit's tree (git archive) into a new folder without tarfile's extraction
  filters, which Python gained only in 3.11.4: every member is checked here, whatever the Python.
- `head_plan` / `move_head` put HEAD back where an in-place backup was taken, once its files are back.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import ToolkitError, UsageError
from common.files import PRIVATE_DIR, PRIVATE_FILE, flush_filesystem, fsync_dir, relative_parts
from common.proc import ToolRun, run_tool
from deployed_code.source import CodeSource
from deployed_code.tree import remove_tree

_CHUNK = 1 << 20
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # sha1 or sha256 object names
# What tarfile's "tar" filter took away from a member's mode: set-id and sticky bits, group and other write.
_UNSAFE_MODE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH


def _git(repo: Path, *args: str, check: bool = True) -> ToolRun:
    return run_tool(["git", "-C", str(repo), *args], f"git {args[0]}", check=check)


def _out(run: ToolRun) -> str:
    return run.stdout.decode().strip()


def is_repository(repo: Path | None) -> bool:
    """Whether `repo` is set and holds a git repository."""
    return repo is not None and (repo / ".git").exists()


def git_state(repo: Path | None) -> dict:
    """HEAD's commit and branch and whether the working copy has local changes; {} without a repository.

    A branch with no commit yet (a new repository) is recorded as `unborn`, with no commit."""
    if not is_repository(repo):
        return {}
    branch = _out(_git(repo, "symbolic-ref", "--short", "-q", "HEAD", check=False)) or None
    head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if head.returncode != 0 and branch is None:
        _git(repo, "rev-parse", "--verify", "HEAD^{commit}")  # a detached HEAD that resolves to nothing: say why
    state = {"commit": _out(head) if head.returncode == 0 else None, "branch": branch,
             "dirty": bool(_out(_git(repo, "status", "--porcelain")))}
    if state["commit"] is None:
        state["unborn"] = True
    return state


def resolve_commit(repo: Path, revision: str) -> str:
    """The full sha of `revision`, resolved after --end-of-options so nothing option-like reaches git."""
    commit = _commit_of(repo, revision)
    if commit is None:
        raise UsageError(f"{revision!r} is not a commit in {repo}: give a sha, a tag, a branch or HEAD~N")
    return commit


def _commit_of(repo: Path, revision: str) -> str | None:
    result = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}", check=False)
    return _out(result) if result.returncode == 0 else None


def local_changes(repo: Path) -> list[str]:
    """`git status --porcelain` lines: uncommitted and untracked changes."""
    return [line for line in _git(repo, "status", "--porcelain").stdout.decode().splitlines() if line]


# -- rollback in a working copy -------------------------------------------------------------------------


def check_out(repo: Path, commit: str, stash_message: str | None) -> list[str]:
    """Check `commit` out detached, stashing local changes first when `stash_message` is given.

    Returns the commands that undo it: back to the branch (or commit) HEAD was on, and the stash popped."""
    before = git_state(repo)
    if stash_message is not None:
        _git(repo, "stash", "push", "--include-untracked", "-m", stash_message)
    _git(repo, "checkout", "--quiet", "--detach", commit)
    undo = [f"git -C {repo} checkout {before['branch'] or before['commit']}"]
    if stash_message is not None:
        undo.append(f"git -C {repo} stash pop")
    return undo


# -- export -----------------------------------------------------------------------------------------------


def export_commit(repo: Path, commit: str, target: Path) -> dict[str, str]:
    """Write the commit's tree into the new folder `target` (git archive, so nothing of .git), flushed; return
    each file's sha256 by its relative path."""
    archive = _git(repo, "-c", "tar.umask=022", "archive", "--format=tar", "--end-of-options", commit).stdout
    return extract_archive(archive, target, f"commit {commit[:12]}")


def extract_archive(archive: bytes, target: Path, what: str) -> dict[str, str]:
    """Unpack a tar archive into the new folder `target` and flush it to disk; `what` names it in errors.
    Returns the sha256 of each file written, by its relative path (hashed as written: no second read).

    Refused, with `target` removed: a member that would land outside `target` or under a symlink, a
    symlink pointing out of it, anything but files, folders and symlinks (devices, fifos, hard links).
    Set-id, sticky and group- or other-write bits are dropped, as tarfile's "tar" filter does."""
    os.mkdir(target, PRIVATE_DIR)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            hashes = _extract(tar, target, what)
        flush_filesystem(target)
        fsync_dir(target.parent)
    except BaseException:
        remove_tree(target)
        raise
    return hashes


def _extract(tar: tarfile.TarFile, target: Path, what: str) -> dict[str, str]:
    """Every member of `tar` into `target`, never through a symlink and never outside it; the files' sha256."""
    folders: dict[str, int] = {"": 0o755}  # relative path -> mode, for the folders made here
    links: list[str] = []
    hashes: dict[str, str] = {}
    root = str(target)
    for member in tar:
        rel = member.name.rstrip("/")
        if relative_parts(rel) is None:
            raise ToolkitError(f"{what}: {member.name!r} would land outside the tree: refused")
        _make_parents(root, rel.rpartition("/")[0], folders, what)
        out = os.path.join(root, rel)
        mode = member.mode & 0o7777 & ~_UNSAFE_MODE_BITS
        if member.isdir():
            if rel not in folders:
                _mkdir(out, rel, what)
            folders[rel] = mode
        elif member.isreg():
            hashes[rel] = _write(tar, member, out, mode, what)
        elif member.issym():
            _symlink(member.linkname, out, rel, what)
            links.append(rel)
        else:
            raise ToolkitError(f"{what}: {member.name!r} is not a file, folder or symlink: refused")
    real_root = os.path.realpath(root)
    for rel in links:  # once all are made: a later link can change where an earlier one leads
        resolved = os.path.realpath(os.path.join(root, rel))
        if resolved != real_root and not resolved.startswith(real_root + os.sep):
            raise ToolkitError(f"{what}: the symlink {rel!r} points out of the tree: refused")
    for rel, mode in sorted(folders.items(), key=lambda item: item[0].count("/"), reverse=True):
        os.chmod(os.path.join(root, rel) if rel else root, mode)  # last: a read-only folder must not stop its files
    return hashes


def _make_parents(root: str, parent: str, folders: dict[str, int], what: str) -> None:
    """Make the member's missing parent folders; a parent that exists must be a folder made here."""
    if parent in folders:
        return
    path = ""
    for part in parent.split("/"):
        path = f"{path}/{part}" if path else part
        if path not in folders:
            _mkdir(os.path.join(root, path), path, what)
            folders[path] = 0o755


def _mkdir(out: str, rel: str, what: str) -> None:
    try:
        os.mkdir(out, PRIVATE_DIR)
    except FileExistsError:  # a file or symlink of that name came first
        raise ToolkitError(f"{what}: {rel!r} is in the archive twice, or under something not a folder: refused") \
            from None


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, out: str, mode: int, what: str) -> str:
    """Write one file member; its sha256."""
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    except FileExistsError:
        raise ToolkitError(f"{what}: {member.name!r} is in the archive twice: refused") from None
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as dest:
        source = tar.extractfile(member)
        while source is not None and (chunk := source.read(_CHUNK)):
            digest.update(chunk)
            dest.write(chunk)
        os.fchmod(fd, mode)
    return digest.hexdigest()


def _symlink(link_target: str, out: str, rel: str, what: str) -> None:
    if not link_target or "\0" in link_target:  # git can store an empty target; no system makes that link
        raise ToolkitError(f"{what}: the symlink {rel!r} has an empty or invalid target: refused")
    if os.path.isabs(link_target):
        raise ToolkitError(f"{what}: the symlink {rel!r} points out of the tree ({link_target}): refused")
    try:
        os.symlink(link_target, out)
    except FileExistsError:
        raise ToolkitError(f"{what}: {rel!r} is in the archive twice: refused") from None


# -- HEAD after an in-place restore -----------------------------------------------------------------------


@dataclass
class HeadPlan:
    """Where HEAD goes when an in-place restore puts a backup's files back, and why."""

    how: str  # "unchanged", "branch" (re-attached), "detached", or "left" (HEAD not moved: see note)
    commit: str | None  # where HEAD is afterwards
    branch: str | None
    note: str  # one line for people

    def to_json(self) -> dict:
        """For --json."""
        return asdict(self)


def head_plan(repo: Path, source: CodeSource, backup_id: str) -> HeadPlan:
    """Where the backup was taken: its branch if that still points at its commit, else its commit, detached.

    HEAD stays where it is when the backup is not of this working copy or its commit cannot be had."""
    now = git_state(repo)
    here = now.get("commit")
    at = f"at {here[:12]}" if here else "with no commit yet"
    recorded, branch = source.commit, source.branch
    if not source.in_place:
        return HeadPlan("left", here, now.get("branch"), f"HEAD left {at}: backup {backup_id} is of a release "
                        "folder, not of this working copy")
    if not recorded:
        return HeadPlan("left", here, now.get("branch"), f"HEAD left {at}: backup {backup_id} was taken before "
                        "the repository's first commit")
    if not isinstance(recorded, str) or not _SHA.fullmatch(recorded) or _commit_of(repo, recorded) != recorded:
        return HeadPlan("left", here, now.get("branch"), f"HEAD left {at}: the backup's commit {str(recorded)[:12]} "
                        f"is not in {repo}, so `git status` shows the restored files as changes")
    dirty = "; the backup had local changes, which `git status` shows" if source.dirty else ""
    if isinstance(branch, str) and branch and _commit_of(repo, f"refs/heads/{branch}") == recorded:
        if now.get("branch") == branch:
            return HeadPlan("unchanged", recorded, branch, f"HEAD is on {branch} at {recorded[:12]}, as when "
                            f"the backup was taken{dirty}")
        return HeadPlan("branch", recorded, branch, f"HEAD back on {branch} at {recorded[:12]}, where the backup "
                        f"was taken{dirty}")
    if here == recorded and now.get("branch") is None:
        return HeadPlan("unchanged", recorded, None, f"HEAD is detached at {recorded[:12]}, as when the backup "
                        f"was taken{dirty}")
    why = (f": branch {branch} has moved on since the backup, or is gone" if branch
           else ", as when the backup was taken")
    return HeadPlan("detached", recorded, None, f"HEAD detached at {recorded[:12]}{why}{dirty}")


def move_head(repo: Path, plan: HeadPlan, reason: str) -> None:
    """Point HEAD as planned and make the index HEAD's tree; the working copy's files are not touched.

    A git failure is one line that gives the commands doing it by hand."""
    if plan.how == "branch":
        point = ["symbolic-ref", "HEAD", f"refs/heads/{plan.branch}"]
    elif plan.how == "detached":
        point = ["update-ref", "--no-deref", "HEAD", str(plan.commit)]
    else:
        return
    try:
        _git(repo, *point[:1], "-m", reason, *point[1:])
        _git(repo, "reset", "--quiet")  # the index as HEAD: only the restored files' own differences show
    except ToolkitError as exc:
        by_hand = f"git -C {repo} {' '.join(point)} && git -C {repo} reset --quiet"
        raise ToolkitError(f"{exc}; to put HEAD where the backup was taken: {by_hand}") from None
