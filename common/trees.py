"""Comparing a live folder with a backup's payload, and putting it back file by file, atomically per file."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.files import (
    PRIVATE_FILE,
    copy_and_hash,
    file_mode,
    flush_filesystem,
    fsync_dir,
    sha256_file,
    temp_name,
)
from common.manifest import Backup, Entry

# What a restore does about each way a live path differs from the backup: after it ran, and before (a plan)
_RESTORE_DONE = {"added": "deleted", "removed": "re-created", "changed": "changed"}
_RESTORE_PLANNED = {"added": "delete", "removed": "re-create", "changed": "change"}


def restore_label(drift: str, done: bool = True) -> str:
    """What a restore did (done) or would do to a path that is `added`, `removed` or `changed` live."""
    return (_RESTORE_DONE if done else _RESTORE_PLANNED)[drift]


@dataclass
class TreeDiff:
    """How a live tree differs from a backup, as paths relative to the tree's root."""

    added: list[str] = field(default_factory=list)  # live only: restore removes them
    removed: list[str] = field(default_factory=list)  # backup only: restore writes them
    changed: list[str] = field(default_factory=list)  # in both, different content, mode, type or target

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_json(self) -> dict:
        """The lists, for --json: how the live tree differs from the backup (drift)."""
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    def lines(self, root: str) -> list[str]:
        """One line per difference, for people: how the live tree differs from the backup (drift)."""
        out = [f"  added    {root}/{path}" for path in self.added]
        out += [f"  removed  {root}/{path}" for path in self.removed]
        out += [f"  changed  {root}/{path}" for path in self.changed]
        return out

    def restore_json(self) -> dict:
        """The lists, for --json, named by what a restore does to them."""
        return {"re_created": self.removed, "deleted": self.added, "changed": self.changed}

    def restore_lines(self, root: str, done: bool = True) -> list[str]:
        """One line per path a restore re-created, deleted or changed (done), or would (a plan)."""
        out = []
        for drift, paths in (("removed", self.removed), ("added", self.added), ("changed", self.changed)):
            out += [f"  {restore_label(drift, done):10} {root}/{path}" for path in paths]
        return out


def tree_entries(backup: Backup, prefix: str) -> dict[str, Entry]:
    """The backup's entries under `prefix`, keyed by their path relative to it ("" is the root)."""
    found = {}
    for entry in backup.entries:
        if entry.path == prefix:
            found[""] = entry
        elif entry.path.startswith(prefix + "/"):
            found[entry.path[len(prefix) + 1:]] = entry
    return found


def matches(entry: Entry, live: Path) -> bool:
    """Whether the live path is what the entry describes (type, mode, content or link target)."""
    try:
        st = os.lstat(live)
    except FileNotFoundError:
        return False
    if entry.type == "symlink":
        return stat.S_ISLNK(st.st_mode) and os.readlink(live) == entry.target
    if entry.type == "dir":
        return stat.S_ISDIR(st.st_mode) and file_mode(st) == entry.mode
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == entry.size
        and file_mode(st) == entry.mode
        and sha256_file(live) == entry.sha256
    )


def live_paths(root: Path, exclude: Callable[[str], bool] | None = None) -> list[str]:
    """Every path under `root`, relative to it, parents before children; symlinks are not followed.

    `exclude` (a relative path -> bool) leaves out a path and, for a folder, everything in it.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        if exclude is not None:
            dirnames[:] = [name for name in dirnames if not exclude(prefix + name)]
            filenames = [name for name in filenames if not exclude(prefix + name)]
        found += [prefix + name for name in sorted(dirnames + filenames)]
    return found


def diff_tree(wanted: dict[str, Entry], root: Path, exclude: Callable[[str], bool] | None = None) -> TreeDiff:
    """Compare the live folder `root` with the entries from tree_entries(); `exclude` as in live_paths."""
    diff = TreeDiff()
    live = set(live_paths(root, exclude)) if root.is_dir() else set()
    for rel, entry in sorted(wanted.items()):
        if rel == "":
            if not matches(entry, root):
                (diff.changed if root.exists() else diff.removed).append(".")
        elif rel not in live:
            diff.removed.append(rel)
        elif not matches(entry, root / rel):
            diff.changed.append(rel)
    diff.added = sorted(live - wanted.keys())
    return diff


def restore_tree(backup: Backup, prefix: str, root: Path, diff: TreeDiff) -> None:
    """Make `root` exactly the backup's tree under `prefix`; only what `diff` names is touched.

    Each file is written beside its live copy and renamed over it, so no reader sees a half-written
    file. Folders are made real before anything goes into them, so a live symlink where the backup
    has a folder is replaced, never followed out of the tree.
    """
    wanted = tree_entries(backup, prefix)
    todo = sorted(set(diff.removed) | set(diff.changed), key=lambda rel: (rel.count("/"), rel))
    folders = [rel for rel in todo if wanted[_key(rel)].type == "dir"]
    others = [rel for rel in todo if wanted[_key(rel)].type != "dir"]
    for rel in folders:
        _ensure_folder(root / rel if rel != "." else root)
    staged: list[tuple[Path, Path]] = []
    try:
        for rel in others:
            staged.append((_stage(backup, wanted[_key(rel)], root / rel), root / rel))
        if staged:
            flush_filesystem(root)
    except BaseException:
        for temp, _live in staged:  # nothing live was touched yet: leave no temporary files behind
            temp.unlink(missing_ok=True)
        raise
    for temp, live in staged:
        _replace(temp, live)
    for rel in sorted(diff.added, key=lambda rel: rel.count("/"), reverse=True):
        _remove(root / rel)
    # Modes and owners of folders last: a read-only folder must not stop the files going in.
    for rel, entry in sorted(wanted.items(), key=lambda item: item[0].count("/"), reverse=True):
        if entry.type == "dir":
            _set_owner_and_mode(root / rel if rel else root, entry)
    for parent in {live.parent for _, live in staged} | {root}:
        fsync_dir(parent)


def restore_file(backup: Backup, entry: Entry, live: Path) -> None:
    """Put one file (or symlink) of a backup at `live`, atomically."""
    live.parent.mkdir(parents=True, exist_ok=True)
    temp = _stage(backup, entry, live)
    flush_filesystem(live.parent)
    _replace(temp, live)
    fsync_dir(live.parent)


def _key(rel: str) -> str:
    return "" if rel == "." else rel


def _ensure_folder(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(mode=0o700, exist_ok=True)


def _stage(backup: Backup, entry: Entry, live: Path) -> Path:
    temp = temp_name(live)
    if entry.type == "symlink":
        os.symlink(entry.target, temp)
    else:
        copy_and_hash(backup.path / entry.path, temp, mode=PRIVATE_FILE)
    _set_owner_and_mode(temp, entry)
    return temp


def _replace(temp: Path, live: Path) -> None:
    if live.is_dir() and not live.is_symlink():
        shutil.rmtree(live)  # a folder where the backup has a file: os.replace cannot overwrite it
    os.replace(temp, live)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass  # already gone with a folder the backup has as a file


def _set_owner_and_mode(path: Path, entry: Entry) -> None:
    if os.geteuid() == 0 and entry.uid is not None:
        os.lchown(path, entry.uid, entry.gid if entry.gid is not None else -1)
    if entry.type != "symlink":
        os.chmod(path, entry.mode)  # after chown, which may clear setuid bits
