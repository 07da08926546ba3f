"""LINKED_PATHS: files and folders every release shares, kept once in `shared/` and symlinked into each release.

What a release tool calls linked files and linked dirs: `.env`, `config/database.yml`, `storage/`, `uploads/`
are not code, and must not go back when the code does. Each is kept in the `shared` folder beside the
releases folder (beside DEPLOYMENT_DIR for a plain folder) and linked into every new release before it is
switched in (a relative link, so the whole deployment can move). Backups leave them out, so a restore or
rollback never brings an old `.env` back; verify names a link that is missing or leads elsewhere.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from common.errors import SettingError, ToolkitError, UsageError
from common.files import relative_parts
from deployed_code.layout import releases_folder
from deployed_code.tree import remove_tree

SETTING = "LINKED_PATHS"
SHARED = "shared"


@dataclass(frozen=True)
class LinkedPath:
    """One linked path: where it is in a release (relative, `/`-separated), and whether it is a folder."""

    rel: str
    folder: bool

    @property
    def pattern(self) -> str:
        """The exclusion pattern that leaves exactly this path out of snapshots (see code_excluder)."""
        return "/" + glob.escape(self.rel)


def parse_linked(value: str | None) -> list[LinkedPath]:
    """LINKED_PATHS, space or comma separated, a trailing `/` for a folder; a bad entry is a SettingError."""
    found: list[LinkedPath] = []
    for item in (part for part in re.split(r"[,\s]+", value or "") if part):
        rel = item.rstrip("/")
        if not rel or relative_parts(rel) is None:
            raise SettingError(f"{SETTING}: {item!r} is not a path inside a release (relative, without `..`)",
                               SETTING)
        for other in found:
            if rel == other.rel or rel.startswith(other.rel + "/") or other.rel.startswith(rel + "/"):
                raise SettingError(f"{SETTING}: {item!r} and {other.rel!r} overlap: name each path once", SETTING)
        found.append(LinkedPath(rel, item.endswith("/")))
    return found


def shared_folder(live: Path) -> Path:
    """The `shared` folder: beside the releases folder in a symlink layout, beside DEPLOYMENT_DIR otherwise."""
    releases = releases_folder(live)
    return (releases.parent if releases is not None else live.parent) / SHARED


def check_shared(shared: Path, linked: list[LinkedPath]) -> None:
    """Before anything changes: each linked file must be in `shared`, and nothing there may be of the other kind."""
    for item in linked:
        path = shared / item.rel
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if item.folder:
                continue  # made when linking
            raise UsageError(f"{SETTING}: {path} is missing: put the file there, it is linked into every release "
                             f"as {item.rel}; nothing changed") from None
        if item.folder != stat.S_ISDIR(st.st_mode):
            kind = "a folder" if item.folder else "a file"
            raise UsageError(f"{SETTING}: {path} should be {kind} (a trailing / means a folder); nothing changed")


def link_shared(release: Path, shared: Path, linked: list[LinkedPath]) -> None:
    """Link each shared path into a release that is not live yet (a new one, or a kept one switched back in),
    replacing what the release has there; a link already right is left as it is, missing shared folders are
    made. A parent in the release that is not a real folder is refused."""
    for item in linked:
        source = shared / item.rel
        if item.folder:
            source.mkdir(parents=True, exist_ok=True)
        parent = release
        for part in item.rel.split("/")[:-1]:
            parent = parent / part
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise ToolkitError(f"{SETTING}: {item.rel} cannot be linked into {release}: {parent.name} there "
                                   "is not a folder; nothing was switched")
            if not parent.exists():
                parent.mkdir()
        link, target = release / item.rel, os.path.relpath(os.path.realpath(source), os.path.realpath(parent))
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if os.path.lexists(link):
            remove_tree(link)  # what the release brought there (a placeholder, an old copy) gives way to the share
        os.symlink(target, link)


def link_problems(live: Path, shared: Path, linked: list[LinkedPath]) -> list[str]:
    """For verify: each linked path of the live release that is not a link to its shared copy, or whose shared
    copy is gone."""
    root = Path(os.path.realpath(live))
    problems = []
    for item in linked:
        link, source = root / item.rel, shared / item.rel
        if not os.path.lexists(link):
            problems.append(f"linked {item.rel} is missing (should link to {source})")
        elif not link.is_symlink():
            problems.append(f"linked {item.rel} is not a link (should link to {source})")
        elif os.path.realpath(link) != os.path.realpath(source):
            problems.append(f"linked {item.rel} points at {os.readlink(link)}, not {source}")
        elif not source.exists():
            problems.append(f"linked {item.rel}: {source} is missing")
    return problems
