"""Kept releases of a symlink layout (`current -> releases/X`): their manifests, which one a restore can switch
to, and pruning (a folder is described and checked against its manifest in deployed_code.release_check).

Each release folder the toolkit builds gets a manifest beside it, `releases/.X.manifest.json`: every path
of the release with its type, mode, size, sha256 (files), target (symlinks) and stat identity (mtime,
ctime, inode), and what the release is (the backups whose tree it is, the commit it was exported from).
A restore or rollback whose tree is a kept release checks the folder against that manifest, the way git
checks its index: a file whose stat is unchanged is taken as unchanged, the others are hashed (all of them
with `--verify-all`), and anything added, missing or different fails the check. A file modified too
recently to be known by its stat (deployed_code.tree.RACY_NS) has none recorded, as in snapshots; once a
check has hashed it and found it unchanged, and it is old enough, its stat is recorded, as git refreshes its
index, so the next check does not read it. A release that passes is switched in as it is: no copy. Paths
that snapshots leave out (CODE_EXCLUDE, LINKED_PATHS, `__pycache__`) are left out here too, so a release the
application has run keeps matching.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from backup_store.manifest import Backup, Entry, format_time, parse_time, verified_entries_json
from backup_store.trees import tree_entries
from common.files import atomic_write
from deployed_code.paths import TREE
from deployed_code.tree import remove_tree, visibility

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = 1

Excluded = Callable[[str], bool]


@dataclass
class ReleaseManifest:
    """What a kept release is, and every path in it.

    On disk: a first line of JSON saying what the release is, then its entries as one JSON list, so that
    finding a release among several reads a line of each, and only the chosen one's entries are parsed."""

    release: str  # the folder's name in the releases folder
    built_at: str
    root_mode: int
    commit: str | None = None  # the commit whose tree it is (exported by a rollback)
    backups: list[str] = field(default_factory=list)  # backups whose tree it is, as checked when each was added
    # Of those, each one's entries_sha256 (its manifest's header): a backup with entries byte for byte the same
    # is the same tree, known without reading the 20,000 entries of both again.
    trees: dict[str, str] = field(default_factory=dict)
    switched_at: str | None = None  # when it last went live (written by earlier versions; now the file's mtime)
    stat_fingerprint: str | None = None  # of the folder, from when every file in it was known by its stat
    files: int | None = None  # how many of the entries are files (None in a manifest written before it was kept)
    exclude: list[str] | None = None  # the exclusions (CODE_EXCLUDE, LINKED_PATHS) it was described with
    raw_entries: bytes = b"[]"  # the entries as written; parsed by `entries` when first needed
    parsed: list[Entry] | None = field(default=None, repr=False)
    compared: dict = field(default_factory=dict, repr=False)  # its _content, by the excluder it was made with
    touched_ns: int = field(default=0, repr=False)  # the file's mtime: when it last went live, or was last checked

    @classmethod
    def of(cls, release: str, root_mode: int, entries: list[Entry], commit: str | None, backups: list[Backup]
           ) -> ReleaseManifest:
        """A new manifest of a release just described (`backups`: those whose tree it is)."""
        raw = json.dumps([entry.to_json() for entry in entries], separators=(",", ":")).encode()
        manifest = cls(release, now(), root_mode, commit, raw_entries=raw, parsed=entries,
                       files=sum(entry.type == "file" for entry in entries))
        for backup in backups:
            manifest.list_backup(backup)
        return manifest

    def list_backup(self, backup: Backup) -> None:
        """Record that the backup's tree is the release's (the caller knows it is)."""
        if backup.id not in self.backups:
            self.backups.append(backup.id)
        digest = backup.extra.get("entries_sha256")
        if isinstance(digest, str):
            self.trees[backup.id] = digest

    def lists_tree_of(self, backup: Backup) -> bool:
        """Whether a backup with the very entries of this one was found to be the release's tree."""
        digest = backup.extra.get("entries_sha256")
        return isinstance(digest, str) and digest in self.trees.values()

    @property
    def entries(self) -> list[Entry]:
        """Every path of the release (ValueError when the manifest's list is not one)."""
        if self.parsed is None:
            entries = [Entry.from_json(item) for item in json.loads(self.raw_entries)]
            if not all(map(_well_formed, entries)):
                raise ValueError("not a release manifest's entries")
            self.parsed = entries
        return self.parsed

    def entries_changed(self) -> None:
        """Take the parsed entries, changed in place, as what is written."""
        self.raw_entries = json.dumps([entry.to_json() for entry in self.entries], separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        """The file's content."""
        header = {"format": MANIFEST_FORMAT, "release": self.release, "built_at": self.built_at,
                  "switched_at": self.switched_at, "commit": self.commit, "backups": self.backups,
                  "trees": self.trees, "root_mode": self.root_mode, "stat_fingerprint": self.stat_fingerprint,
                  "files": self.files, "exclude": self.exclude}
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + self.raw_entries

    @classmethod
    def from_bytes(cls, data: bytes) -> ReleaseManifest:
        """From the file's content (KeyError, TypeError or ValueError when it is not one); entries unparsed."""
        first, _, rest = data.partition(b"\n")
        header = json.loads(first)
        backups = header.get("backups") or []
        if header.get("format") != MANIFEST_FORMAT or not all(isinstance(item, str) for item in backups):
            raise ValueError("not a release manifest")
        commit, trees = header.get("commit"), header.get("trees")  # none in a manifest written before they were
        trees = {key: value for key, value in trees.items() if key in backups and isinstance(value, str)} \
            if isinstance(trees, dict) else {}
        fingerprint, files, exclude = header.get("stat_fingerprint"), header.get("files"), header.get("exclude")
        built_at, switched_at = header["built_at"], header.get("switched_at")
        for moment in (built_at, switched_at or built_at):  # unreadable: the manifest is, here, not at a prune
            if parse_time(moment).tzinfo is None:
                raise ValueError("a time without its zone")
        return cls(release=str(header["release"]), built_at=built_at,
                   root_mode=int(header["root_mode"]), commit=commit if isinstance(commit, str) else None,
                   backups=list(backups), trees=trees, switched_at=switched_at,
                   stat_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
                   files=files if type(files) is int else None, raw_entries=rest,
                   exclude=exclude if isinstance(exclude, list) and all(isinstance(p, str) for p in exclude) else None)

    def file_count(self) -> int:
        """How many files the release has (counted from its entries only in a manifest that does not say)."""
        return self.files if self.files is not None else sum(entry.type == "file" for entry in self.entries)

    def last_used(self) -> datetime:
        """When it was last switched in (or its manifest last written), else built."""
        touched = datetime.fromtimestamp(self.touched_ns / 1e9, UTC)
        return max(parse_time(self.switched_at or self.built_at), touched)


def _well_formed(entry: Entry) -> bool:
    """Paths are only compared with what a walk of the folder finds, never opened as written: a manifest needs
    no more than well-typed entries."""
    if not isinstance(entry.path, str) or entry.type not in ("file", "dir", "symlink"):
        return False
    return entry.type != "file" or (isinstance(entry.size, int) and isinstance(entry.sha256, str))


def manifest_path(release: Path) -> Path:
    """Where a release's manifest is: `.NAME.manifest.json` beside it."""
    return release.with_name(f".{release.name}{MANIFEST_SUFFIX}")


_read: dict[str, tuple[tuple[int, int, int], ReleaseManifest]] = {}  # a run reads each manifest once


def read_manifest(release: Path) -> ReleaseManifest | None:
    """The release's manifest; None when it has none, or one that cannot be read (then it is not kept)."""
    path = manifest_path(release)
    try:
        st = os.stat(path)
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)  # a manifest is replaced, never changed in place
        cached = _read.get(str(path))
        if cached is not None and cached[0] == identity:
            manifest = cached[1]
        else:
            manifest = ReleaseManifest.from_bytes(path.read_bytes())
            _read[str(path)] = (identity, manifest)
        manifest.touched_ns = st.st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if manifest.release == release.name else None


def write_manifest(manifest: ReleaseManifest, folder: Path) -> None:
    """Write (or replace) the manifest of the release folder `folder`."""
    path = manifest_path(folder)
    atomic_write(path, manifest.to_bytes())
    st = os.stat(path)
    _read[str(path)] = ((st.st_ino, st.st_size, st.st_mtime_ns), manifest)  # read back as written, unparsed
    manifest.touched_ns = st.st_mtime_ns


def drop_manifest(release: Path) -> None:
    """Forget a release: it is no longer switched to without a check or a copy."""
    manifest_path(release).unlink(missing_ok=True)


def now() -> str:
    """The time as manifests record it."""
    return format_time(datetime.now(UTC))


# -- is it the tree wanted? ------------------------------------------------------------------------------


def _content(entries: dict[str, Entry], excluded: Excluded) -> dict[str, tuple]:
    """What two descriptions of a tree must agree on: each path's type, mode, size, sha256 and link target."""
    kept, visible = {}, visibility(excluded)
    for rel, entry in entries.items():
        if not visible(rel):
            continue
        mode = None if entry.type == "symlink" else entry.mode
        kept[rel] = (entry.type, mode, entry.size if entry.type == "file" else 0, entry.sha256, entry.target)
    return kept


def is_tree_of(manifest: ReleaseManifest, backup: Backup, excluded: Excluded) -> bool:
    """Whether the release's manifest lists exactly the backup's tree (what both leave out aside)."""
    if manifest.lists_tree_of(backup) and verified_entries_json(backup) is not None:
        return True  # the very entries found to be its tree, undamaged since
    wanted = tree_entries(backup, TREE)
    root = wanted.pop("", None)
    if root is None or root.mode != manifest.root_mode:
        return False
    if excluded not in manifest.compared:  # a run compares one manifest with several backups
        try:
            manifest.compared[excluded] = _content({entry.path: entry for entry in manifest.entries}, excluded)
        except ValueError:  # a damaged manifest describes no tree
            return False
    return _content(wanted, excluded) == manifest.compared[excluded]


# -- the kept releases ---------------------------------------------------------------------------------------


def release_folders(releases: Path) -> list[Path]:
    """The release folders (hidden names are half-built trees and manifests)."""
    if not releases.is_dir():
        return []
    return [item for item in releases.iterdir()
            if not item.name.startswith(".") and item.is_dir() and not item.is_symlink()]


def kept_releases(releases: Path) -> list[tuple[Path, ReleaseManifest]]:
    """The releases with a readable manifest, last used first."""
    found = [(folder, manifest) for folder in release_folders(releases)
             if (manifest := read_manifest(folder)) is not None]
    return sorted(found, key=lambda pair: (pair[1].last_used(), pair[0].name), reverse=True)


def release_for_backup(releases: Path, backup: Backup, commit: str | None, excluded: Excluded
                       ) -> tuple[Path, ReleaseManifest] | None:
    """The kept release whose tree is the backup's: built from it or from its commit, listing its very tree."""
    for folder, manifest in kept_releases(releases):
        named = backup.id in manifest.backups or (commit is not None and manifest.commit == commit)
        if named and is_tree_of(manifest, backup, excluded):
            return folder, manifest
    return None


def release_for_commit(releases: Path, commit: str) -> tuple[Path, ReleaseManifest] | None:
    """The kept release exported from `commit`, last used first."""
    return next(((folder, manifest) for folder, manifest in kept_releases(releases) if manifest.commit == commit),
                None)


def add_backup(folder: Path, backup: Backup, excluded: Excluded) -> bool:
    """Record that `backup` (a snapshot of the release) is the release's tree, when its file list says so."""
    manifest = read_manifest(folder)
    if manifest is None or not is_tree_of(manifest, backup, excluded):
        return False
    before = (list(manifest.backups), dict(manifest.trees))
    manifest.list_backup(backup)
    if (manifest.backups, manifest.trees) != before:
        write_manifest(manifest, folder)
    return True


def mark_switched(folder: Path) -> None:
    """Record that the release just went live (pruning goes by when releases were last used): its manifest's
    mtime is set to now, not the file rewritten (it holds every entry of the release)."""
    path = manifest_path(folder)
    try:
        os.utime(path)
    except OSError:  # not a kept release, or not ours to touch: only the order of pruning is at stake
        return
    cached = _read.get(str(path))
    if cached is not None:  # the same manifest, touched: still known without reading it again
        st = os.stat(path)
        _read[str(path)] = ((st.st_ino, st.st_size, st.st_mtime_ns), cached[1])
        cached[1].touched_ns = st.st_mtime_ns


def prune(releases: Path, keep: int, protected: list[Path]) -> list[Path]:
    """Remove the releases beyond the `keep` last used (by manifest, else by the folder's mtime), oldest first,
    never one of `protected` (the live release, the one it replaced); returns what was removed."""
    removed = []
    for folder in prunable(releases, keep, protected):
        drop_manifest(folder)  # first: a run stopped part-way leaves a folder, never a manifest of half a tree
        remove_tree(folder)
        removed.append(folder)
    for stray in releases.glob(f".*{MANIFEST_SUFFIX}"):  # manifests whose release is gone
        if not (releases / stray.name[1:-len(MANIFEST_SUFFIX)]).is_dir():
            stray.unlink(missing_ok=True)
    for stray in releases.glob(f".*{MANIFEST_SUFFIX}.tmp-*"):  # a write stopped part-way (all are made under
        stray.unlink(missing_ok=True)  # the store's lock, which the caller holds)
    return removed


def prunable(releases: Path, keep: int, protected: list[Path]) -> list[Path]:
    """The releases prune would remove, oldest first: beyond the `keep` last used, and not `protected`."""
    never = {os.path.realpath(path) for path in protected}

    def last_used(folder: Path) -> float:
        manifest = read_manifest(folder)
        return manifest.last_used().timestamp() if manifest else os.lstat(folder).st_mtime

    ordered = sorted(release_folders(releases), key=lambda folder: (last_used(folder), folder.name), reverse=True)
    return [folder for folder in reversed(ordered[keep:]) if os.path.realpath(folder) not in never]
