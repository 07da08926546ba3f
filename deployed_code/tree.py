"""Code trees: snapshot a deployed tree into the store, build a backup's tree aside (the layout switches it in).

- `snapshot_tree` copies a tree into a backup like `Staging.add_tree`, but a file unchanged since the
  previous backup (same size, mtime, ctime, inode and mode, as git's index decides) is hard-linked from
  that backup's payload instead of copied. Payload files are read-only (0400), so a file shared by two
  backups can never be changed through one of them. Whatever is in doubt is hashed: equal content is
  still linked, anything else copied.
- `build_tree` writes a backup's tree into a new folder (copies, never links: live code must not share
  inodes with the store), checking every file's checksum as it goes.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from backup_store.copier import CopyJob, copy_all
from backup_store.manifest import Backup, Entry
from backup_store.staging import Staging
from backup_store.trees import set_owner_and_mode, tree_entries
from common.errors import Interrupted, ToolkitError, UsageError
from common.files import (
    PRIVATE_DIR,
    file_mode,
    flush_filesystem,
    flushing_meanwhile,
    fsync_dir,
    is_inside,
    relative_parts,
    sha256_file,
)

PAYLOAD_FILE = 0o400  # stored code files: read-only, so a hard link shared by two backups stays as taken
ALWAYS_EXCLUDED = (".git", "__pycache__")
# A file modified this close to the snapshot could be modified again within the same timestamp tick
# without its mtime changing ("racy" in git's words): its identity is not recorded, so the next
# snapshot hashes it instead of trusting its stat.
RACY_NS = 2_000_000_000


# -- exclusions -------------------------------------------------------------------------------------


def code_excluder(patterns: Iterable[str] = ()) -> Callable[[str], bool]:
    """A test for paths (relative to the tree, `/`-separated) that a code snapshot leaves out.

    `.git` and `__pycache__` are always left out, at any depth. Each pattern (CODE_EXCLUDE) is an
    fnmatch pattern tried against the item's name and against its relative path, so `*.log` and
    `node_modules` match at any depth and `build/tmp` only there; a trailing `/` is ignored. A leading
    `/` ties a pattern to the tree's top: `/.env` is only the top-level `.env` (LINKED_PATHS are left out so).
    """
    wanted = [pattern.strip().rstrip("/") for pattern in patterns]
    anywhere = [pattern for pattern in wanted if pattern and not pattern.startswith("/")]
    rooted = [pattern[1:] for pattern in wanted if pattern.startswith("/") and pattern[1:]]

    def excluded(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if name in ALWAYS_EXCLUDED:
            return True
        if not (anywhere or rooted):
            return False
        return (any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(rel, pattern) for pattern in anywhere)
                or any(fnmatch.fnmatchcase(rel, pattern) for pattern in rooted))

    return excluded


# -- snapshot -----------------------------------------------------------------------------------------


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
    """Put the tree `src` into the backup being built, at `dest`; link what the previous backup already has.

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
    before = {entry.path: entry for entry in previous.entries if entry.type == "file"} if previous else {}
    base = str(previous.path) if previous else ""
    stats = stats if stats is not None else SnapshotStats()
    not_racy_before = time.time_ns() - RACY_NS

    def check_cancelled() -> None:
        if cancelled is not None and cancelled():
            raise Interrupted("the snapshot was cancelled")

    def copied(size: int) -> None:
        check_cancelled()
        stats.copied += 1
        stats.bytes_copied += size
        stats.bytes += size

    payload = str(staging.path)

    def regular(path: str, item_dest: str, st: os.stat_result) -> Entry:
        check_cancelled()
        stats.files += 1
        out = f"{payload}/{item_dest}"  # not os.path.join: this runs once per file, and both parts are plain
        old = before.get(item_dest)
        stored = None
        if old is not None and old.sha256 and old.size == st.st_size:
            stored = f"{base}/{old.path}"
            # Unchanged by its stat: linked without being read, and its entry is the previous one as it
            # stands. The stored file is trusted as the previous backup recorded it (restore checks every
            # checksum); if it cannot be linked, it is copied.
            if _unchanged(old, st) and _link(stored, out):
                stats.linked += 1
                stats.bytes += st.st_size
                return old
        entry = Entry(item_dest, "file", mode=file_mode(st), size=st.st_size, uid=st.st_uid, gid=st.st_gid)
        if st.st_mtime_ns < not_racy_before:
            entry.mtime_ns, entry.ctime_ns, entry.ino = st.st_mtime_ns, st.st_ctime_ns, st.st_ino
        if stored is not None and _linkable(stored, old) and sha256_file(path) == old.sha256 and _link(stored, out):
            entry.sha256 = old.sha256
            stats.rehashed += 1
            stats.bytes += st.st_size
            return entry
        staging.copy_later(path, item_dest, entry, PAYLOAD_FILE, copied)
        return entry

    staging.add_tree(root, dest, code_excluder(exclude), regular=regular)
    staging.unsynced = True  # new links are metadata the seal must flush too, even when nothing was copied
    return stats


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


def _linkable(stored: str, old: Entry) -> bool:
    """Whether the previous backup's payload file can be shared: a read-only regular file of the right size."""
    try:
        st = os.lstat(stored)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == old.size and file_mode(st) == PAYLOAD_FILE


def _link(stored: str, out: str) -> bool:
    """Hard-link the previous backup's payload file; False when that cannot be done (then it is copied)."""
    try:
        os.link(stored, out, follow_symlinks=False)
    except OSError:  # gone, too many links, another filesystem, protected hard links: copy instead
        return False
    return True


# -- build --------------------------------------------------------------------------------------------


@dataclass
class BuildStats:
    """What build_tree wrote."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0

    def to_json(self) -> dict:
        """The counts, for --json."""
        return asdict(self)


def build_tree(
    backup: Backup, prefix: str, target: Path, verify: bool = True, stats: BuildStats | None = None
) -> BuildStats:
    """Write the backup's tree under `prefix` into the new folder `target`, byte for byte.

    Files are copied (never linked), with their modes, and their owners when running as root;
    symlinks are made as symlinks with their recorded target and never followed; empty folders are
    kept. With `verify`, each file's size and sha256 are checked while it is copied, so a damaged
    backup stops the build before anything is switched. An entry whose path would leave `target`
    (absolute, `..`, or under something that is not one of the backup's folders) is refused.
    On any failure `target` is removed; a run killed meanwhile leaves only `target`, never touching
    anything beside it. `stats`, when given, is updated as the build goes, for progress.
    """
    _check_relative(prefix, backup)
    entries = tree_entries(backup, prefix)
    root_entry = entries.get("")
    if root_entry is None or root_entry.type != "dir":
        raise ToolkitError(f"backup {backup.id} holds no folder {prefix!r}: nothing to build")
    for rel in entries:
        if rel:
            _check_relative(rel, backup)
    try:
        os.mkdir(target, PRIVATE_DIR)
    except FileExistsError:
        raise UsageError(f"{target} already exists: a tree is only built into a new folder") from None
    stats = stats if stats is not None else BuildStats()
    try:
        with flushing_meanwhile(target):
            _build(backup, entries, target, verify, stats)
        flush_filesystem(target)
        fsync_dir(target.parent)
    except BaseException:
        remove_tree(target)
        raise
    return stats


def _check_relative(rel: str, backup: Backup) -> None:
    if relative_parts(rel) is None:
        raise ToolkitError(f"backup {backup.id} has an entry {rel!r} that would leave the tree: refused")


def _build(backup: Backup, entries: dict[str, Entry], target: Path, verify: bool, stats: BuildStats) -> None:
    as_root = os.geteuid() == 0
    folders = {""}
    copies: list[CopyJob] = []

    def checked(entry: Entry) -> Callable[[int, str], None]:
        def done(size: int, digest: str) -> None:
            if verify and (size != entry.size or digest != entry.sha256):
                raise ToolkitError(
                    f"backup {backup.id}: {entry.path} does not match its checksum (damaged); nothing was switched"
                )
            stats.files += 1
            stats.bytes += size

        return done

    base, out_base = str(backup.path), str(target)  # plain strings: this runs once per file
    for rel, entry in sorted(entries.items(), key=lambda item: item[0].split("/")):  # parents first
        if not rel:
            continue
        if rel.rpartition("/")[0] not in folders:
            raise ToolkitError(
                f"backup {backup.id}: {entry.path} is not inside one of the backup's folders: refused"
            )
        out = os.path.join(out_base, rel)
        if entry.type == "dir":
            os.mkdir(out, PRIVATE_DIR)
            folders.add(rel)
            stats.dirs += 1
        elif entry.type == "symlink":
            if entry.target is None:
                raise ToolkitError(f"backup {backup.id}: symlink {entry.path} has no target in the manifest")
            os.symlink(entry.target, out)
            if as_root and entry.owner is not None:
                os.lchown(out, *entry.owner)
            stats.symlinks += 1
        elif entry.type == "file":
            owner = entry.owner if as_root else None
            copies.append(CopyJob(os.path.join(base, entry.path), out, entry.mode, owner, checked(entry)))
        else:
            raise ToolkitError(f"backup {backup.id}: {entry.path} has an unknown type {entry.type!r}")
    copy_all(copies)  # once every folder exists: files on every core
    # Folder modes last and deepest first: a read-only folder must not stop what goes into it.
    for rel, entry in sorted(entries.items(), key=lambda item: item[0].count("/"), reverse=True):
        if entry.type == "dir":
            set_owner_and_mode(target / rel if rel else target, entry)


def remove_tree(path: Path) -> None:
    """Remove a folder tree, read-only folders included (a built or replaced tree keeps the backup's modes)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    os.chmod(path, PRIVATE_DIR)
    for dirpath, dirnames, _files in os.walk(path):
        for name in dirnames:  # made writable before os.walk goes into them
            sub = os.path.join(dirpath, name)
            if not os.path.islink(sub):
                os.chmod(sub, PRIVATE_DIR)
    shutil.rmtree(path)
