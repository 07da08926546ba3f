"""What every operation on a code tree shares: what a snapshot leaves out, when a file's stat can be trusted,
and removing a tree.

Snapshots (deployed_code.snapshot), builds (deployed_code.build) and kept releases (deployed_code.releases)
use these, so that a backup, a release's manifest and a check of it leave out the same paths and trust a
file's stat by the same rule.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from common.files import PRIVATE_DIR

ALWAYS_EXCLUDED = (".git", "__pycache__")
# A file modified this close to the moment its stat is read could be modified again within the same timestamp
# tick without its mtime moving ("racy" in git's words): its stat cannot stand for its content, so it is not
# recorded and the next look hashes it. Some filesystems keep mtimes to a second or two (FAT: 2 s).
RACY_NS = 2_000_000_000


def not_racy_before() -> int:
    """The mtime (ns) before which a file whose stat is read from now on may be known by its stat (see RACY_NS):
    the one rule for snapshots and kept releases alike."""
    return time.time_ns() - RACY_NS


def code_excluder(patterns: Iterable[str] = ()) -> Callable[[str], bool]:
    """A test for paths (relative to the tree, `/`-separated) that a code snapshot leaves out.

    `.git` and `__pycache__` are always left out, at any depth. Each pattern (CODE_EXCLUDE) is an
    fnmatch pattern tried against the item's name and against its relative path, so `*.log` and
    `node_modules` match at any depth and `build/tmp` only there; a trailing `/` is ignored. A leading
    `/` ties a pattern to the tree's top: `/.env` is only the top-level `.env` (LINKED_PATHS are left out so).
    """
    wanted = [pattern.strip().rstrip("/") for pattern in patterns]
    wanted = [pattern for pattern in wanted if pattern]
    if not wanted:  # the usual case, once per path of a 20,000-file tree
        return lambda rel: rel.rpartition("/")[2] in ALWAYS_EXCLUDED
    anywhere = [pattern for pattern in wanted if not pattern.startswith("/")]
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


def visibility(excluded: Callable[[str], bool]) -> Callable[[str], bool]:
    """A test for paths of a flat list: neither left out nor inside a folder left out (each folder asked once)."""
    folders: dict[str, bool] = {"": True}

    def visible(rel: str) -> bool:
        parent = rel.rpartition("/")[0]
        seen = folders.get(parent)
        if seen is None:
            seen = folders[parent] = visible(parent)
        return seen and not excluded(rel)

    return visible


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
