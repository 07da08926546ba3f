"""A kept release's folder described for its manifest, and checked against it (see deployed_code.releases).

The check is git's check of its index: a file whose size, mtime, ctime and inode are as recorded is taken as
unchanged; the others are hashed, all of them with `--verify-all`. A manifest also keeps the stat
fingerprint of the whole folder (every path with its type, mode, size, mtime, ctime, inode and link target)
from when every file in it was known by its stat: a walk that gives the same fingerprint finds the release
unchanged without reading the manifest's 20,000 entries.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backup_store.manifest import Backup, Entry
from common.files import file_mode, sha256_file
from deployed_code.releases import Excluded, ReleaseManifest, write_manifest
from deployed_code.tree import not_racy_before, visibility


def describe(folder: Path, excluded: Excluded, known: dict[str, str] | None = None, name: str | None = None,
             commit: str | None = None, backups: list[Backup] | None = None) -> ReleaseManifest:
    """The manifest of the release in `folder` (to be named `name`), as it is on disk now.

    `known` gives files' sha256 by path where they were just checked (a build) or hashed as written (an
    export); every other file is read here."""
    known = known or {}
    trusted_before = not_racy_before()
    entries = []
    items = sorted(_walk(folder, excluded))
    for rel, st in items:
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(rel, "dir", mode=file_mode(st)))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(rel, "symlink", target=os.readlink(folder / rel)))
        elif stat.S_ISREG(st.st_mode):
            entry = Entry(rel, "file", mode=file_mode(st), size=st.st_size,
                          sha256=known.get(rel) or sha256_file(folder / rel))
            if st.st_mtime_ns < trusted_before:
                entry.mtime_ns, entry.ctime_ns, entry.ino = st.st_mtime_ns, st.st_ctime_ns, st.st_ino
            entries.append(entry)
    root = os.lstat(folder)
    manifest = ReleaseManifest.of(name or folder.name, file_mode(root), entries, commit, list(backups or []))
    manifest.stat_fingerprint = stat_fingerprint(folder, root, items, trusted_before)
    return manifest


@dataclass
class ReleaseCheck:
    """What a check of a release against its manifest found."""

    problems: list[str]  # what differs, one line each, by path
    hashed: int  # files read
    recorded: int  # files read, unchanged, and old enough to be known by their stat: the manifest's entries now say so
    fingerprinted: bool = False  # the manifest's stat fingerprint is now the folder's, as just walked


def check_release(folder: Path, manifest: ReleaseManifest, excluded: Excluded, verify_all: bool = False
                  ) -> ReleaseCheck:
    """The release folder against its manifest. A walk that gives the manifest's stat fingerprint finds it whole
    at once (unless `verify_all`). Otherwise a file whose size, mtime, ctime and inode are as recorded is not
    read, unless `verify_all`; a file read and found unchanged gets its stat recorded in the manifest's entries,
    and a folder found whole its fingerprint (in memory: keep_what_was_learnt writes them, never a dry run)."""
    trusted_before = not_racy_before()  # before any lstat: the rule holds for stats read from now on
    root = os.lstat(folder)
    items = sorted(_walk(folder, excluded))
    fingerprint = stat_fingerprint(folder, root, items, trusted_before)
    if fingerprint is not None and fingerprint == manifest.stat_fingerprint and not verify_all:
        return ReleaseCheck([], 0, 0)  # every path, type, mode and file stat as when all were known by their stat
    visible = visibility(excluded)
    wanted = {entry.path: entry for entry in manifest.entries if visible(entry.path)}
    problems, hashed, recorded, seen = [], 0, 0, set()
    if file_mode(root) != manifest.root_mode:
        problems.append(f"{folder.name}: its mode changed")
    for rel, st in items:
        seen.add(rel)
        entry = wanted.get(rel)
        if entry is None:
            problems.append(f"{rel}: added since the release was built")
        elif entry.type == "dir":
            if not stat.S_ISDIR(st.st_mode) or file_mode(st) != entry.mode:
                problems.append(f"{rel}: not the folder the release had")
        elif entry.type == "symlink":
            if not stat.S_ISLNK(st.st_mode) or os.readlink(folder / rel) != entry.target:
                problems.append(f"{rel}: not the symlink the release had")
        elif not stat.S_ISREG(st.st_mode) or file_mode(st) != entry.mode:
            problems.append(f"{rel}: not the file the release had (type or mode changed)")
        elif st.st_size != entry.size:
            problems.append(f"{rel}: changed (size {st.st_size}, the release had {entry.size})")
        elif verify_all or not _same_stat(entry, st):
            hashed += 1
            if sha256_file(folder / rel) != entry.sha256:
                problems.append(f"{rel}: changed (its content differs from the release's manifest)")
            elif st.st_mtime_ns < trusted_before and not _same_stat(entry, st):
                # A write after this lstat moves the mtime past it: the stat now stands for what was read.
                entry.mtime_ns, entry.ctime_ns, entry.ino = st.st_mtime_ns, st.st_ctime_ns, st.st_ino
                recorded += 1
    problems += [f"{rel}: missing" for rel in sorted(wanted.keys() - seen)]
    if problems or fingerprint is None or fingerprint == manifest.stat_fingerprint:
        return ReleaseCheck(problems, hashed, recorded)
    # Whole, and every file now known by its stat (none racy): the next check can go by the fingerprint.
    manifest.stat_fingerprint = fingerprint
    return ReleaseCheck(problems, hashed, recorded, fingerprinted=True)


def keep_what_was_learnt(folder: Path, manifest: ReleaseManifest, check: ReleaseCheck) -> None:
    """Write into the release's manifest the files' stats and the fingerprint a check that passed recorded."""
    if check.recorded:
        manifest.entries_changed()
    if check.recorded or check.fingerprinted:
        write_manifest(manifest, folder)


def stat_fingerprint(folder: Path, root: os.stat_result, items: list[tuple[str, os.stat_result]],
                     trusted_before: int) -> str | None:
    """The sha256 of every item's path, type and mode, a file's size, mtime, ctime and inode, a link's target
    (items sorted by path); None when a file is too recently modified to be known by its stat."""
    fields = [f"{root.st_mode}"]
    for rel, st in items:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if st.st_mtime_ns >= trusted_before:
                return None
            fields.append(f"{rel}\0{mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0")
        elif stat.S_ISLNK(mode):
            fields.append(f"{rel}\0{mode}\0\0\0\0\0{os.readlink(os.path.join(folder, rel))}")
        else:
            fields.append(f"{rel}\0{mode}\0\0\0\0\0")
    # Seven fields in every record and no NUL in a path or target: two different folders never give one text.
    return hashlib.sha256("\0".join(fields).encode("utf-8", "surrogateescape")).hexdigest()


def _same_stat(entry: Entry, st: os.stat_result) -> bool:
    return (entry.mtime_ns is not None and entry.mtime_ns == st.st_mtime_ns and entry.ctime_ns == st.st_ctime_ns
            and entry.ino == st.st_ino)


def _walk(folder: Path, excluded: Excluded) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under `folder` but what `excluded` leaves out; no link followed.

    One lstat per item, read by scandir's entry: this runs once per file of a 20,000-file release."""
    folders = [(str(folder), "")]
    while folders:
        path, prefix = folders.pop()
        with os.scandir(path) as listing:
            for item in listing:
                rel = prefix + item.name
                if excluded(rel):
                    continue
                st = item.stat(follow_symlinks=False)
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    folders.append((item.path, rel + "/"))
