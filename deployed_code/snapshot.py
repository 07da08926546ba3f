"""Snapshot a deployed tree into the store.

`snapshot_tree` puts a tree into a backup whose files' content is shared by every backup of the store
(backup_store.objects: one read-only file per sha256). A file unchanged since the previous backup (same size,
mtime, ctime, inode, mode and owner, as git's index decides) keeps the previous entry's sha256 without being
read; anything else is hashed and its content stored unless the store has it already. When the whole tree is
unchanged by that rule (one fingerprint of every path's stat says so), the previous manifest's entries are
written as they are: nothing else is read or written. Either way a sha256 is reused only while objects/ lists
its content: a file whose content is gone is read and stored again, so a backup never names content the store
does not have.
"""

from __future__ import annotations

import hashlib
import operator
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from backup_store.manifest import Backup, Entry
from backup_store.objects import share_file, stored_names
from backup_store.staging import Staging
from common.errors import Interrupted, ToolkitError, UsageError
from common.files import file_mode, is_inside
from deployed_code.tree import ALWAYS_EXCLUDED, code_excluder, not_racy_before

PAYLOAD_FILE = 0o400  # stored code files: read-only, so a hard link shared by two backups stays as taken
_NAME = operator.attrgetter("name")
_IS_REG, _IS_DIR, _IS_LNK = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK


@dataclass
class SnapshotStats:
    """What a snapshot did with the regular files of the tree."""

    files: int = 0
    bytes: int = 0  # of the regular files taken so far, copied or linked (what progress counts)
    linked: int = 0  # unchanged by their stat: linked from the previous backup without being read
    rehashed: int = 0  # in doubt, hashed, same content: linked too
    copied: int = 0  # new or changed: copied into the payload
    bytes_copied: int = 0

    def to_json(self) -> dict:
        """The counts, for --json."""
        return asdict(self)


def snapshot_tree(
    staging: Staging,
    src: Path,
    dest: str,
    previous: Backup | None = None,
    exclude: Iterable[str] = (),
    stats: SnapshotStats | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SnapshotStats:
    """Put the tree `src` into the backup being built, at `dest`; what the previous backup has is not read.

    `src` may be a symlink to the release folder (`current`): the folder it points at is taken.
    `exclude` holds the CODE_EXCLUDE patterns (see code_excluder). Symlinks are recorded as links and
    never followed; sockets, fifos and devices are skipped (`staging.skipped`). `stats`, when given,
    is updated as the snapshot goes, for progress. `cancelled`, when given, is asked at every file: once
    it says yes the snapshot stops with Interrupted (a snapshot on a thread cannot be sent a signal).
    """
    root = Path(os.path.realpath(src))
    if not root.is_dir():
        raise UsageError(f"{src} is not a folder: nothing to back up")
    if is_inside(staging.path, root):
        raise UsageError(f"the backup folder {staging.path.parent} is inside {src}: keep backups outside the tree")
    objects = staging.share_payload()
    stats = stats if stats is not None else SnapshotStats()

    def check_cancelled() -> None:
        if cancelled is not None and cancelled():
            raise Interrupted("the snapshot was cancelled")

    patterns = [pattern for pattern in exclude if pattern.strip().rstrip("/")]
    walk = _Walk(code_excluder(patterns) if patterns else None, check_cancelled)  # ALWAYS_EXCLUDED: by name
    walk.tree(str(root), dest)
    staging.skipped += walk.skipped
    staging.fingerprint = walk.fingerprint()
    present = stored_names(objects)  # names only: a reused sha256 must still be there
    if previous is not None and _reuse_unchanged(staging, previous, present):
        stats.files = stats.linked = staging.reused_counts[0]
        stats.bytes = staging.reused_counts[1]
        return stats
    files = walk.entries(staging.entries)
    before = _previous_files(previous)

    def stored(old: Entry | None, entry: Entry) -> Callable[[int], None]:
        def done(size: int) -> None:
            check_cancelled()
            if old is not None and old.sha256 == entry.sha256:
                stats.rehashed += 1  # in doubt by its stat, same content
            else:
                stats.copied += 1
                stats.bytes_copied += size
            stats.bytes += size

        return done

    for entry, path, st in files:
        check_cancelled()
        stats.files += 1
        old = before.get(entry.path)
        # Unchanged by its stat: the previous entry's content, trusted as that backup recorded it (restore
        # and verify check every checksum), while it is stored. Content gone from objects/ is read again.
        if old is not None and _unchanged(old, st) and _still_stored(previous, old, objects, present):
            entry.sha256 = old.sha256
            stats.linked += 1
            stats.bytes += st.st_size
            continue
        staging.copy_later(path, entry.path, entry, PAYLOAD_FILE, stored(old, entry))
    staging.copy_queued(present)
    staging.unsynced = True  # objects linked in from a folder-format backup are metadata the seal must flush
    return stats


class _Walk:
    """The tree's items as lstat sees them, parents before children and by name, with no file read.

    Each item also adds to a fingerprint: its path and what _unchanged compares (for a symlink its target),
    NUL-separated (no path or target holds a NUL), so two walks give the same one exactly when nothing was
    added, removed, moved or changed by that rule. A file modified too recently to be trusted by its stat
    (see deployed_code.tree.RACY_NS) leaves the walk without one."""

    def __init__(self, excluded: Callable[[str], bool] | None, check_cancelled: Callable[[], None]):
        self.excluded, self.check_cancelled = excluded, check_cancelled
        self.items: list[tuple[str, str, os.stat_result, str | None]] = []  # (path, source path, lstat, target)
        self.skipped: list[str] = []  # sockets, fifos and devices are not code
        self.not_racy_before = not_racy_before()
        self.racy = False
        self.device = 0

    def tree(self, root: str, dest: str) -> None:
        """Walk the folder `root` (the folder a symlink to it leads to), its items named under `dest`."""
        st = os.stat(root)
        self.device = st.st_dev
        self._add(dest, root, st, None)
        self._folder(root, dest, "")

    def _add(self, dest: str, path: str, st: os.stat_result, target: str | None) -> None:
        self.items.append((dest, path, st, target))

    def _folder(self, src: str, dest: str, rel: str) -> None:
        # Once per item of a 20,000-file tree, the whole of an unchanged backup's own work: kept lean.
        self.check_cancelled()
        with os.scandir(src) as listing:
            listed = sorted(listing, key=_NAME)
        add, excluded, not_racy_before = self.items.append, self.excluded, self.not_racy_before
        for item in listed:
            name = item.name
            if name in ALWAYS_EXCLUDED or (excluded is not None and excluded(f"{rel}/{name}" if rel else name)):
                continue
            st = item.stat(follow_symlinks=False)
            mode = st.st_mode
            if _IS_REG(mode):
                if st.st_mtime_ns >= not_racy_before:
                    self.racy = True
                add((f"{dest}/{name}", item.path, st, None))
            elif _IS_DIR(mode):
                add((f"{dest}/{name}", item.path, st, None))
                self._folder(item.path, f"{dest}/{name}", f"{rel}/{name}" if rel else name)
            elif _IS_LNK(mode):
                add((f"{dest}/{name}", item.path, st, os.readlink(item.path)))
            else:
                self.skipped.append(item.path)

    def fingerprint(self) -> str | None:
        """The walk's fingerprint; None when a file was too recently modified to be trusted by its stat."""
        if self.racy:
            return None
        lines = [f"{dest}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
                 f"\0{st.st_ino}" if target is None else f"{dest}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{target}"
                 for dest, _path, st, target in self.items]
        text = "\0".join([f"code-tree-1\0{self.device}", *lines])
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def entries(self, out: list[Entry]) -> list[tuple[Entry, str, os.stat_result]]:
        """Append each item's entry to `out`; the files' entries, with their source paths and lstat.

        A file's identity (mtime, ctime, inode) is recorded unless it is racy."""
        files = []
        for dest, path, st, target in self.items:
            if target is not None:
                out.append(Entry(dest, "symlink", target=target, uid=st.st_uid, gid=st.st_gid))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(dest, "dir", mode=file_mode(st), uid=st.st_uid, gid=st.st_gid))
            else:
                entry = Entry(dest, "file", mode=file_mode(st), size=st.st_size, uid=st.st_uid, gid=st.st_gid)
                if st.st_mtime_ns < self.not_racy_before:
                    entry.mtime_ns, entry.ctime_ns, entry.ino = st.st_mtime_ns, st.st_ctime_ns, st.st_ino
                out.append(entry)
                files.append((entry, path, st))
        return files


def _reuse_unchanged(staging: Staging, previous: Backup, present: set[str]) -> bool:
    """When the tree is, by its fingerprint, the previous backup's, seal the backup with the previous manifest's
    entries as they are (see Staging.reuse_backup); whether it did."""
    fingerprint = previous.extra.get("fingerprint")
    return bool(staging.fingerprint) and fingerprint == staging.fingerprint and staging.reuse_backup(previous, present)


def _previous_files(previous: Backup | None) -> dict[str, Entry]:
    """The previous backup's files by path; none when its entries cannot be read (then every file is hashed)."""
    if previous is None:
        return {}
    try:
        return {entry.path: entry for entry in previous.entries if entry.type == "file"}
    except ToolkitError:
        return {}


def _unchanged(old: Entry, st: os.stat_result) -> bool:
    """Whether the file is, by its stat, the one the previous backup took (ctime also moves on chmod and chown)."""
    return (
        old.mtime_ns is not None
        and old.ctime_ns is not None
        and old.ino is not None
        and old.size == st.st_size
        and old.mtime_ns == st.st_mtime_ns
        and old.ctime_ns == st.st_ctime_ns
        and old.ino == st.st_ino
        and old.mode == file_mode(st)
        and old.uid == st.st_uid
        and old.gid == st.st_gid
    )


def _still_stored(previous: Backup, old: Entry, objects: str, present: set[str]) -> bool:
    """Whether the previous entry's content is in `objects` for the new backup to name: listed in `present`,
    or (a previous backup of the folder format) linked in from that backup's payload."""
    if previous.objects is not None:
        return old.sha256 in present
    stored = previous.payload(old)
    return _linkable(stored, old) and share_file(stored, objects, old.sha256, old.size)


def _linkable(stored: str, old: Entry) -> bool:
    """Whether the previous backup's payload file can be shared: a read-only regular file of the right size."""
    try:
        st = os.lstat(stored)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == old.size and file_mode(st) == PAYLOAD_FILE
