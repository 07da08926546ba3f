"""What a backup is: its manifest (one entry per payload item) and the check of a payload against it.

A backup is a folder holding its payload and `manifest.json`, written last (see common.store).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common.errors import ToolkitError
from common.files import relative_parts, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Entry:
    """One item of a backup's payload, as the manifest records it."""

    path: str  # relative to the backup folder
    type: str  # "file", "dir" or "symlink"
    mode: int = 0
    size: int = 0
    sha256: str | None = None
    target: str | None = None  # a symlink's target, as written
    uid: int | None = None  # owner, put back when restoring as root
    gid: int | None = None
    # The source file's identity when it was taken (code backups): a later backup links an unchanged file.
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    ino: int | None = None

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) for os.lchown, gid -1 when unrecorded; None when the owner was not recorded."""
        return None if self.uid is None else (self.uid, self.gid if self.gid is not None else -1)

    def to_json(self) -> dict:
        """The manifest form: only the fields that apply to this type."""
        # The instance's own dict: dataclasses.asdict deep-copies, which dominates a 20,000-entry manifest.
        return {name: value for name, value in self.__dict__.items() if value is not None}

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        """Read one manifest entry (fields this version does not know are ignored)."""
        try:
            return cls(**data)
        except TypeError:
            return cls(**{key: data.get(key) for key in cls.__dataclass_fields__})


@dataclass
class Backup:
    """A whole backup: its folder and what its manifest says."""

    path: Path
    id: str
    component: str
    created_at: datetime
    label: str | None
    source: dict
    entries: list[Entry]
    extra: dict = field(default_factory=dict)

    @property
    def files(self) -> list[Entry]:
        """The regular files of the payload."""
        return [entry for entry in self.entries if entry.type == "file"]

    @property
    def is_safety(self) -> bool:
        """Taken automatically before a restore, update, migrate or rollback (not by `backup`)."""
        return self.extra.get("kind") == "safety"

    @property
    def host(self) -> str | None:
        """The host the backup was taken on, as every component records it in its source."""
        host = self.source.get("host")
        return host if isinstance(host, str) else None

    @property
    def size(self) -> int:
        """Bytes of payload."""
        return sum(entry.size for entry in self.files)

    def summary(self) -> dict:
        """What `list` and `--json` show of a backup."""
        return {
            "id": self.id,
            "component": self.component,
            "created_at": format_time(self.created_at),
            "label": self.label,
            "safety": self.is_safety,
            "files": len(self.files),
            "size": self.size,
            "path": str(self.path),
        }


def format_time(moment: datetime) -> str:
    """UTC, ISO 8601, milliseconds, with a Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Read a time written by format_time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def backup_from_manifest(folder: Path, data: dict, entries: list[Entry] | None = None) -> Backup:
    """A Backup from a manifest's parsed JSON (`folder` is where it is, or would be, in a store).

    `entries`, when given, are the manifest's entries as objects already (a backup just written); otherwise
    they are read and checked with entries_problem, and a manifest that fails it raises UnsafeManifest."""
    if entries is None:
        entries = [Entry.from_json(item) for item in data["entries"]]
        problem = entries_problem(entries)
        if problem:
            raise UnsafeManifest(f"the manifest of {data['id']} is refused: {problem}")
    return Backup(
        path=folder,
        id=data["id"],
        component=data["component"],
        created_at=parse_time(data["created_at"]),
        label=data.get("label"),
        source=data.get("source") or {},
        entries=entries,
        extra={key: value for key, value in data.items() if key not in _MANIFEST_CORE},
    )


class UnsafeManifest(ToolkitError):
    """A manifest whose entries could lead a reader out of the backup folder, or that no backup could have."""


def entries_problem(entries: list[Entry]) -> str | None:
    """What makes a manifest's entries unfit to read or write, if anything: the one rule for every reader.

    Each path is relative, without `.`, `..` or empty parts, listed once, and directly inside the payload's
    top or inside a folder entry of the same manifest, so no path can lead through a symlink (of the
    backup or of a tree it is written to) or out of the folder. Files carry a size and sha256, symlinks a target.
    """
    folders = {entry.path for entry in entries if entry.type == "dir"}
    seen: set[str] = set()
    for entry in entries:
        rel = entry.path
        if not isinstance(rel, str) or relative_parts(rel) is None:
            return f"{rel!r} is not a plain relative path"
        if rel in seen or rel == MANIFEST:
            return f"{rel!r} twice, or in the manifest's own place"
        seen.add(rel)
        parent = rel.rpartition("/")[0]
        if parent and parent not in folders:
            return f"{rel!r} is not inside one of the backup's own folders"
        if entry.type not in ("file", "dir", "symlink"):
            return f"{rel!r} has an unknown type {entry.type!r}"
        if entry.type == "file" and not (isinstance(entry.sha256, str) and _SHA256.fullmatch(entry.sha256)
                                         and isinstance(entry.size, int) and entry.size >= 0):
            return f"{rel!r} has no sha256 or size"
        target = entry.target
        if entry.type == "symlink" and not (isinstance(target, str) and target and "\0" not in target):
            return f"{rel!r} is a symlink without a target"
        if entry.type != "symlink" and not (type(entry.mode) is int and 0 <= entry.mode <= 0o7777):
            return f"{rel!r} has no mode a file can have"
        if any(owner is not None and not (type(owner) is int and owner >= 0) for owner in (entry.uid, entry.gid)):
            return f"{rel!r} has an owner that is not a user or group id"
    return None


def load_backup(folder: Path) -> Backup:
    """Read a backup folder's manifest; one that entries_problem refuses raises UnsafeManifest."""
    try:
        return backup_from_manifest(folder, json.loads((folder / MANIFEST).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # a field of the wrong JSON type
        raise ToolkitError(f"{folder / MANIFEST} is unreadable or incomplete ({exc}): not a usable backup") from None


_MANIFEST_CORE = {"id", "component", "created_at", "label", "source", "entries"}  # the rest is `extra`


def check_backup(backup: Backup) -> list[str]:
    """Compare a backup's payload with its manifest; each problem is one line naming the file."""
    problems = []
    listed = {MANIFEST}
    for entry in backup.entries:
        listed.add(entry.path)
        path = backup.path / entry.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing from the backup")
            continue
        if entry.type == "file":
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{entry.path}: not a regular file")
            elif st.st_size != entry.size:
                problems.append(f"{entry.path}: size {st.st_size}, manifest says {entry.size} (damaged)")
            elif sha256_file(path) != entry.sha256:
                problems.append(f"{entry.path}: checksum mismatch (damaged)")
        elif entry.type == "dir" and not stat.S_ISDIR(st.st_mode):
            problems.append(f"{entry.path}: not a folder")
        elif entry.type == "symlink" and (not stat.S_ISLNK(st.st_mode) or os.readlink(path) != entry.target):
            problems.append(f"{entry.path}: symlink changed")
    for dirpath, dirnames, filenames in os.walk(backup.path):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), backup.path)
            if rel not in listed:
                problems.append(f"{rel}: in the backup folder but not in its manifest")
    return problems
