"""Comparing a live folder with a backup's payload, and putting it back file by file, atomically per file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backup_store.manifest import Backup, Entry, UnsafeManifest
from common.errors import ToolkitError
from common.files import (
    PRIVATE_FILE,
    WriteFailed,
    copy_and_hash,
    file_mode,
    flush_filesystem,
    fsync_dir,
    sha256_file,
    temp_name,
)


class PayloadUnreadable(ToolkitError):
    """A file of a backup's payload could not be read while restoring it."""


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
            if entry.type != "dir":  # a symlink would carry every write into the tree out of it
                raise UnsafeManifest(f"backup {backup.id}: {prefix} is a {entry.type}, not a folder: refused")
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
            if not root.exists():
                diff.removed.append(".")
            elif not root.is_dir() or _root_mode_differs(entry, root):
                diff.changed.append(".")
        elif rel not in live:
            diff.removed.append(rel)
        elif not matches(entry, root / rel):
            diff.changed.append(rel)
    diff.added = sorted(live - wanted.keys())
    return diff


def restore_tree(backup: Backup, prefix: str, root: Path, diff: TreeDiff,
                 files: Sequence[tuple[Entry, Path]] = ()) -> None:
    """Make `root` exactly the backup's tree under `prefix`; only what `diff` names is touched.

    `files` are single entries of the backup to put at paths of their own (an .env outside the tree).
    Everything is first written beside its live copy, and renamed over it only once all of it is written:
    a failure to write (a full disk) changes nothing live, leaves no temporary file and says so. No reader
    sees a half-written file. Folders are made real before anything goes into them, so a live symlink
    where the backup has a folder is replaced, never followed out of the tree.
    """
    wanted = tree_entries(backup, prefix)
    if root.exists() and not root.is_dir():
        raise ToolkitError(f"{root} is not a folder: nothing was changed (move it away, then restore again)")
    # The root itself is never replaced, only made when missing: it may be a symlink to the real folder.
    todo = sorted((set(diff.removed) | set(diff.changed)) - {"."}, key=lambda rel: (rel.count("/"), rel))
    staging = _Staging()
    try:
        staging.parents(root)
        for rel in todo:
            if wanted[rel].type == "dir":
                staging.folder(root / rel)
        for rel in todo:
            if wanted[rel].type != "dir":
                staging.file(backup, wanted[rel], root / rel)
        for entry, live in files:
            staging.parents(live.parent)
            staging.file(backup, entry, live)
        if staging.files:
            flush_filesystem(root)
    except (WriteFailed, PayloadUnreadable) as exc:
        staging.undo()
        raise ToolkitError(f"{exc}; nothing was changed") from None
    except BaseException:
        staging.undo()
        raise
    staging.commit()
    for rel in sorted(diff.added, key=lambda rel: rel.count("/"), reverse=True):
        _remove(root / rel)
    # Modes and owners of folders last: a read-only folder must not stop the files going in.
    for rel, entry in sorted(wanted.items(), key=lambda item: item[0].count("/"), reverse=True):
        if entry.type == "dir" and rel:
            set_owner_and_mode(root / rel, entry)
    if "" in wanted and _root_mode_differs(wanted[""], root):
        _set_root_owner_and_mode(root, wanted[""])
    for parent in {live.parent for _, live in staging.files} | {root}:
        fsync_dir(parent)


class _Staging:
    """What a restore puts beside the live tree before it changes anything there, and how to take it back."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []  # (written beside, live path)
        self.made: list[Path] = []  # folders made, parents first
        self.aside: list[tuple[Path, Path]] = []  # (renamed to, live path): a non-folder where a folder goes

    def folder(self, path: Path, mode: int = 0o700) -> None:
        """Make `path` a real folder; a file or symlink there is renamed aside until the restore commits."""
        try:
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                moved = temp_name(path)
                os.rename(path, moved)
                self.aside.append((moved, path))
            if not path.is_dir():
                path.mkdir(mode=mode)
                self.made.append(path)
        except OSError as exc:
            raise WriteFailed(path, exc) from None

    def parents(self, path: Path) -> None:
        """Make the missing folders of `path`, as a plain mkdir -p would."""
        for folder in reversed([path, *path.parents]):
            if not folder.is_dir():
                self.folder(folder, mode=0o777)

    def file(self, backup: Backup, entry: Entry, live: Path) -> None:
        """Write the entry's file or symlink beside `live`."""
        self.files.append((_stage(backup, entry, live), live))

    def commit(self) -> None:
        """Rename every file over its live copy; drop what was renamed aside."""
        for temp, live in self.files:
            _replace(temp, live)
        for moved, _live in self.aside:
            moved.unlink()

    def undo(self) -> None:
        """Remove what was written and made, and put back what was renamed aside: the live tree as it was."""
        for temp, _live in self.files:
            temp.unlink(missing_ok=True)
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        for moved, live in reversed(self.aside):
            os.rename(moved, live)


def _root_mode_differs(entry: Entry, root: Path) -> bool:
    """Whether the tree's root folder (through a symlink to it) lacks the recorded mode.

    Backups made before the root was read through its symlink recorded the link's own 0777 when the root was
    a symlink: that is no folder's mode, so it is not taken for a difference, nor ever applied."""
    if entry.mode == 0o777 and root.is_symlink():
        return False
    return file_mode(os.stat(root)) != entry.mode


def _set_root_owner_and_mode(root: Path, entry: Entry) -> None:
    if os.geteuid() == 0 and entry.owner is not None:
        os.chown(root, *entry.owner)
    os.chmod(root, entry.mode)  # both follow a symlink to the real folder


def _stage(backup: Backup, entry: Entry, live: Path) -> Path:
    temp = temp_name(live)
    content = None if entry.type == "symlink" else backup.content(entry)
    try:
        if content is None:
            os.symlink(entry.target, temp)
        else:
            copy_and_hash(content.path, temp, mode=PRIVATE_FILE, span=content.span)
        set_owner_and_mode(temp, entry)
    except OSError as exc:
        if exc.errno != errno.EEXIST:  # a name already there is not ours to remove
            temp.unlink(missing_ok=True)
        if content is not None and str(exc.filename) == content.path:
            raise PayloadUnreadable(f"could not read {content.path}: {exc.strerror}") from None
        raise WriteFailed(live, exc) from None
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


def set_owner_and_mode(path: Path, entry: Entry) -> None:
    """Give `path` the entry's mode, and its owner when running as root (a symlink: the owner only)."""
    if os.geteuid() == 0 and entry.owner is not None:
        os.lchown(path, *entry.owner)
    if entry.type != "symlink":
        os.chmod(path, entry.mode)  # after chown, which may clear setuid bits
