"""Where a new code tree is built beside DEPLOYMENT_DIR, how it is switched in, and what a stopped run leaves.

- A plain folder (DEPLOYMENT_DIR is the tree): the new tree is built beside it as `.NAME.tmp-X`, renamed
  when whole to the name a replaced tree is kept under (`.NAME.replaced-TIME-X`), and exchanged with the
  live folder in one renameat2(RENAME_EXCHANGE); the old tree is then under that name until `cleanup`
  removes it (deleting 20,000 files costs about as much as copying them, and it does not belong between
  an operator and a restored service).
- A symlink layout (`current -> releases/X`): the new tree is built in the releases folder as
  `.current.tmp-X`, renamed to its release name when whole, and `current` is replaced by a new symlink
  in one rename. The old release folder stays, a kept release until KEEP_RELEASES prunes it
  (deployed_code.releases).
- Nothing at DEPLOYMENT_DIR yet, or an empty folder (a new host): a plain folder is made, or, for a
  DEPLOYMENT_DIR named `current` or a symlink to nothing, a symlink layout with its releases folder.
So only a tree still being built, or one whose run was killed, is ever under a `.tmp-` name: `leftovers`
finds them. Restore and rollback hold the store's lock from before such a tree is made until it is
switched in or removed, and cleanup removes them only while holding that lock.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.errors import UsageError
from common.files import fsync_dir, temp_name
from common.libc import last_errno, libc_function
from common.signals import stop_signals_held
from deployed_code.tree import remove_tree

SYMLINK_LAYOUT_LINK = "current"  # a DEPLOYMENT_DIR of this name that does not exist yet is made a symlink...
RELEASES = "releases"  # ...to a release folder in this folder beside it


def releases_folder(live: Path) -> Path | None:
    """The symlink layout's folder of releases (where `live` points, even at nothing; or `releases` beside a
    `current` not made yet); None for a plain folder."""
    if live.is_symlink():
        return Path(os.path.realpath(live)).parent
    if live.name == SYMLINK_LAYOUT_LINK and (not os.path.lexists(live) or _empty_folder(live)):
        return live.parent / RELEASES
    return None


def _empty_folder(path: Path) -> bool:
    try:
        return not path.is_symlink() and path.is_dir() and next(os.scandir(path), None) is None
    except OSError:
        return False


def nothing_to_save(live: Path) -> str | None:
    """Why there is no tree at `live` to take a safety backup of (a new host), or None when there is one."""
    if not os.path.lexists(live):
        return f"{live} does not exist yet: nothing to save"
    if live.is_symlink() and not live.is_dir():
        return f"{live} points at nothing ({os.readlink(live)}): nothing to save"
    if _empty_folder(Path(os.path.realpath(live))):
        return f"{live} is empty: nothing to save"
    return None


def build_path(live: Path) -> Path:
    """A new hidden name to build the next tree under, where it will be switched in from (missing folders made)."""
    releases = releases_folder(live)
    beside = releases / live.name if releases is not None else live
    beside.parent.mkdir(parents=True, exist_ok=True)
    return temp_name(beside)


def switch_and_keep(built: Path, live: Path, release: str, before_switch: Callable[[Path], None] | None = None
                    ) -> tuple[Switched, Path | None]:
    """Switch the tree at `built` in at `live`; return how, and where the plain folder it replaced is kept.

    In a symlink layout the new release folder is named `release` (`-2`, `-3` ... when taken). `before_switch`
    is given the tree under its final name just before the switch (a release's manifest is written then).
    A switch that fails or is stopped before the new tree is live removes it; a stop signal waits for the
    switch to end. An empty folder it replaced is removed.
    """
    releases = releases_folder(live)
    if releases is not None:
        ready = _free_name(releases, release)
    elif os.path.lexists(live):
        ready = aside_path(live)  # after the exchange the replaced tree is here: nothing renames it later
    else:
        ready = built
    new_inode = os.lstat(built).st_ino
    try:
        with stop_signals_held():
            if ready != built:
                os.rename(built, ready)
                fsync_dir(ready.parent)
            if before_switch is not None:
                before_switch(ready)
            switched = switch_in(ready, live, aside=aside_path(live), link=releases is not None)
    except BaseException:
        _remove_unless_live(new_inode, live, [built, ready])
        raise
    kept = switched.previous if switched.how in ("exchange", "renames") else None
    if kept is not None and _empty_folder(kept):
        os.rmdir(kept)  # an empty DEPLOYMENT_DIR of a new host: nothing to keep
        kept = None
    return switched, kept


def _free_name(folder: Path, name: str) -> Path:
    target, n = folder / name, 1
    while os.path.lexists(target):
        n += 1
        target = folder / f"{name}-{n}"
    return target


def _remove_unless_live(inode: int, live: Path, places: list[Path]) -> None:
    """Remove the new tree (known by its inode) from wherever it is, unless it is the live one."""
    try:
        if os.stat(live).st_ino == inode:
            return
    except OSError:
        pass
    for place in places:
        try:
            st = os.lstat(place)
        except FileNotFoundError:
            continue
        if st.st_ino == inode and stat.S_ISDIR(st.st_mode):
            remove_tree(place)
            return


# -- switch -------------------------------------------------------------------------------------------


@dataclass
class Switched:
    """How a new tree went in."""

    previous: Path | None  # where the tree that was live now is (None: nothing was live)
    seconds: float  # the switch itself, renames and directory fsync
    how: str  # "symlink", "exchange", "renames" (no atomic exchange available) or "rename" (nothing was live)

    def to_json(self) -> dict:
        """For --json."""
        return {"previous": str(self.previous) if self.previous else None, "seconds": self.seconds, "how": self.how}


def switch_in(new: Path, live: Path, aside: Path | None = None, link: bool = False) -> Switched:
    """Make the folder `new` the live tree at `live`, in one step.

    - `live` a symlink (`current -> releases/X`): a temporary symlink to `new` is renamed over it, so
      `live` points at the old release or the new one, never at nothing. The link stays relative or
      absolute as it was. `previous` is the old release, which the caller keeps or removes.
    - `live` a real folder: the two folders are exchanged by renameat2(RENAME_EXCHANGE), so `live` is
      always the whole old tree or the whole new one; afterwards the old tree is at `new`'s path
      (`previous`). Without an atomic exchange (not Linux, or a filesystem without it) two renames are
      made: the old tree is moved to `aside` (default: a hidden sibling), then the new one in.
    - nothing at `live`: with `link`, a relative symlink to `new` is made there; else `new` is renamed to it.
      With `link`, an empty folder at `live` is removed first (it served nothing).
    `new` and `live` must be on the same filesystem (build beside `live`).
    """
    if new.is_symlink() or not new.is_dir():
        raise UsageError(f"{new} is not a folder: nothing to switch in")
    started = time.perf_counter()
    if link and _empty_folder(live):
        os.rmdir(live)  # an empty folder served nothing: the symlink layout's link takes its place
    if live.is_symlink() or (link and not os.path.lexists(live)):
        old_target = os.readlink(live) if live.is_symlink() else None
        previous = Path(os.path.normpath(live.parent / old_target)) if old_target is not None else None
        if old_target is not None and os.path.isabs(old_target):
            link_to = str(new.absolute())
        else:
            link_to = os.path.relpath(os.path.realpath(new), os.path.realpath(live.parent))
        temp = temp_name(live)
        os.symlink(link_to, temp)
        try:
            os.replace(temp, live)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        how = "symlink"
    elif os.path.lexists(live):
        if not live.is_dir():
            raise UsageError(f"{live} is neither a folder nor a symlink: not replaced")
        if _exchange(new, live):
            previous, how = new, "exchange"
        else:
            previous, how = aside or temp_name(live), "renames"
            os.rename(live, previous)
            try:
                os.rename(new, live)
            except BaseException:
                os.rename(previous, live)
                raise
    else:
        os.rename(new, live)
        previous, how = None, "rename"
    fsync_dir(live.parent)
    if how != "symlink" and os.path.realpath(new.parent) != os.path.realpath(live.parent):
        fsync_dir(new.parent)
    return Switched(previous, time.perf_counter() - started, how)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the system or filesystem cannot (then the caller renames)."""
    argtypes = ("int", "char_p", "int", "char_p", "uint")
    renameat2 = libc_function("renameat2", argtypes)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = last_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# -- what is left beside the live tree ------------------------------------------------------------------

_REPLACED = re.compile(r"\.replaced-(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]+$")
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_TEMP = re.compile(r"\.tmp-[0-9a-f]{8}$")  # common.files.temp_name


def aside_path(live: Path) -> Path:
    """A new name beside `live` for the tree a switch replaces: `.<live name>.replaced-<UTC time>-<random>`."""
    stamp = datetime.now(UTC).strftime(_STAMP)
    return live.with_name(f".{live.name}.replaced-{stamp}-{os.urandom(3).hex()}")


def replaced_trees(live: Path) -> list[tuple[Path, datetime]]:
    """The trees set aside beside `live` and when, newest first."""
    found = []
    prefix = f".{live.name}.replaced-"
    if not live.parent.is_dir():
        return []
    for item in live.parent.iterdir():
        match = _REPLACED.search(item.name)
        if item.name.startswith(prefix) and match and item.is_dir() and not item.is_symlink():
            found.append((item, datetime.strptime(match.group(1), _STAMP).replace(tzinfo=UTC)))
    return sorted(found, key=lambda pair: (pair[1], pair[0].name), reverse=True)


def leftovers(live: Path) -> list[Path]:
    """What restores and rollbacks stopped before their switch left: half-built `.NAME.tmp-*` trees beside
    `live` and in its releases folder, and temporary symlinks (a run that is building one now has it too)."""
    prefix = f".{live.name}.tmp-"
    places = {os.path.realpath(live.parent): live.parent}
    releases = releases_folder(live)
    if releases is not None:
        places.setdefault(os.path.realpath(releases), releases)
    found = []
    for place in places.values():
        if not place.is_dir():
            continue
        for item in place.iterdir():
            if item.name.startswith(prefix) and _TEMP.search(item.name) and (item.is_symlink() or item.is_dir()):
                found.append(item)
    return sorted(found)
