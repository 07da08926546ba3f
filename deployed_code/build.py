"""Build a backup's tree aside: `build_tree` writes it into a new folder (copies, never links: live code must
not share inodes with the store), checking every file's checksum as it goes; the layout switches it in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from backup_store.copier import CopyJob, copy_all
from backup_store.manifest import Backup, Entry
from backup_store.trees import set_owner_and_mode, tree_entries
from common.errors import ToolkitError, UsageError
from common.files import PRIVATE_DIR, flush_filesystem, flushing_meanwhile, fsync_dir, relative_parts
from deployed_code.tree import remove_tree


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

    Files are copied (never linked), with their modes, their backed-up mtimes, and their owners when running
    as root;
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

    out_base = str(target)  # plain strings: this runs once per file
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
            # With its backed-up mtime, as rsync -a, tar and restic restore it: a release described right after
            # its build then has its files known by their stat at once, not hashed by the next check.
            content = backup.content(entry)
            copies.append(CopyJob(content.path, out, entry.mode, owner, checked(entry), span=content.span,
                                  mtime_ns=entry.mtime_ns if type(entry.mtime_ns) is int else None))
        else:
            raise ToolkitError(f"backup {backup.id}: {entry.path} has an unknown type {entry.type!r}")
    copy_all(copies)  # once every folder exists: files on every core
    # Folder modes last and deepest first: a read-only folder must not stop what goes into it.
    for rel, entry in sorted(entries.items(), key=lambda item: item[0].count("/"), reverse=True):
        if entry.type == "dir":
            set_owner_and_mode(target / rel if rel else target, entry)
