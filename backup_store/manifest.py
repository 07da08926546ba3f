"""What a backup is: its manifest (one entry per payload item) and the check of a payload against it.

A backup is a folder holding `manifest.json`, written last (see backup_store.store), and its payload: in
the folder itself (format 1), or, for a backup whose manifest says `"payload": "shared"` (format 2), each
file's content in the store's `objects/` folder named by its sha256 (see backup_store.objects), so
backups with the same files share them and an unchanged backup writes only its manifest.
The manifest's `entries` come last, so its header can be read without parsing a 20,000-entry list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from backup_store.objects import OBJECTS, locate
from backup_store.packs import Content, read_content
from common.errors import ToolkitError
from common.files import size_and_sha256

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # the payload in the backup's own folder
SHARED_FORMAT = 2  # the files' content in the store's objects/ folder
SHARED = "shared"  # the manifest's `payload` when the content is shared
ENTRIES_KEY = b'"entries": '  # the manifest's last key (json.dumps' own spacing)
_NAMED_SHA256 = re.compile(r'"sha256": "([^"]*)"')  # a file entry's checksum, as json.dumps writes it
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
        data = self.__dict__.copy()
        for name, value in self.__dict__.items():
            if value is None:
                del data[name]
        return data

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
    entries: list[Entry]  # read from the manifest when first used, for a backup loaded with lazy=True
    extra: dict = field(default_factory=dict)
    objects: Path | None = None  # where the files' content is, for a backup of the shared format

    @property
    def files(self) -> Sequence[Entry]:
        """The regular files of the payload (counted without reading the entries, when the manifest says)."""
        if self._unread() and isinstance(self.extra.get("files"), int):
            return _Files(self)
        return [entry for entry in self.entries if entry.type == "file"]

    def _unread(self) -> bool:
        return callable(self.__dict__.get("_entries"))

    def entries_json(self) -> bytes | None:
        """The manifest's entries as JSON text, as read, while they have not been parsed (else None)."""
        loader = self.__dict__.get("_entries")
        return loader.segment if isinstance(loader, EntriesLoader) else None

    def payload(self, entry: Entry) -> str:
        """The file that is a file entry's content, whole: its own, or a loose object (ValueError for one in a
        pack, which only content() finds)."""
        content = self.content(entry)
        if content.span is not None:
            raise ValueError(f"{entry.path}: its content is in the pack {content.path}, not a file of its own")
        return content.path

    def content(self, entry: Entry, fresh: bool = False) -> Content:
        """Where a file entry's content lies: a whole file, or a span of a pack (see backup_store.packs).

        The packs are those this process last listed; a reader without the store's lock that does not find
        the content there asks again with `fresh` (a cleanup may have moved it to another pack meanwhile)."""
        if self.objects is not None:
            return locate(str(self.objects), entry.sha256 or "", fresh)
        return Content(f"{self.path}/{entry.path}")

    def read_small(self, entry: Entry) -> bytes:
        """A file entry's content, read whole (for small ones); looked for again once if it is not where it was."""
        try:
            return read_content(self.content(entry))
        except FileNotFoundError:
            if self.objects is None:
                raise
            return read_content(self.content(entry, fresh=True))

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
        """Bytes of payload (the files' sizes added up, shared content counted in every backup)."""
        if self._unread() and isinstance(self.extra.get("size"), int):
            return self.extra["size"]
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


def _get_entries(backup: Backup) -> list[Entry]:
    entries = backup.__dict__["_entries"]
    if callable(entries):
        entries = backup.__dict__["_entries"] = entries()
    return entries


def _set_entries(backup: Backup, entries: list[Entry] | Callable[[], list[Entry]]) -> None:
    backup.__dict__["_entries"] = entries


# A property set after the dataclass is made: __init__ still takes `entries`, a list or a loader called once.
Backup.entries = property(_get_entries, _set_entries)  # type: ignore[assignment]


class _Files(Sequence[Entry]):
    """A backup's files, counted from its manifest's header; the entries are read only to go through them."""

    def __init__(self, backup: Backup):
        self._backup = backup

    def _list(self) -> list[Entry]:
        return [entry for entry in self._backup.entries if entry.type == "file"]

    def __len__(self) -> int:
        return self._backup.extra["files"] if self._backup._unread() else len(self._list())

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - Sequence's own signature
        return self._list()[index]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._list())


def format_time(moment: datetime) -> str:
    """UTC, ISO 8601, milliseconds, with a Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Read a time written by format_time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def backup_from_manifest(folder: Path, data: dict,
                         entries: list[Entry] | Callable[[], list[Entry]] | None = None) -> Backup:
    """A Backup from a manifest's parsed JSON (`folder` is where it is, or would be, in a store).

    `entries`, when given, are the manifest's entries as objects already (a backup just written), or a
    loader that reads them when first used; otherwise they are read and checked with checked_entries, and a
    manifest that fails it raises UnsafeManifest."""
    if entries is None:
        entries = checked_entries(data["entries"], data["id"])
    return Backup(
        path=folder,
        id=data["id"],
        component=data["component"],
        created_at=parse_time(data["created_at"]),
        label=data.get("label"),
        source=data.get("source") or {},
        entries=entries,
        extra={key: value for key, value in data.items() if key not in _MANIFEST_CORE},
        objects=folder.parent / OBJECTS if data.get("payload") == SHARED else None,
    )


def checked_entries(items: list, backup_id: str) -> list[Entry]:
    """Entries from a manifest's JSON list, checked with entries_problem (UnsafeManifest when it fails)."""
    entries = [Entry.from_json(item) for item in items]
    problem = entries_problem(entries)
    if problem:
        raise UnsafeManifest(f"the manifest of {backup_id} is refused: {problem}")
    return entries


class UnsafeManifest(ToolkitError):
    """A manifest whose entries could lead a reader out of the backup folder, or that no backup could have."""


def entries_problem(entries: list[Entry]) -> str | None:
    """What makes a manifest's entries unfit to read or write, if anything: the one rule for every reader.

    Each path is relative, without `.`, `..` or empty parts, listed once, and directly inside the payload's
    top or inside a folder entry of the same manifest, so no path can lead through a symlink (of the
    backup or of a tree it is written to) or out of the folder. Files carry a size and sha256, symlinks a target.
    """
    # One pass, plain string tests: this runs on every manifest read, 20,000 entries for a code tree.
    folders = {entry.path for entry in entries if entry.type == "dir"}
    seen: set[str] = set()
    sha256 = _SHA256.fullmatch
    for entry in entries:
        rel, kind = entry.path, entry.type
        if not isinstance(rel, str):
            return f"{rel!r} is not a plain relative path"
        wrapped = f"/{rel}/"  # no empty, `.` or `..` part, not absolute: as common.files.relative_parts
        if "//" in wrapped or "/./" in wrapped or "/../" in wrapped or "\0" in rel:
            return f"{rel!r} is not a plain relative path"
        if rel in seen or rel == MANIFEST:
            return f"{rel!r} twice, or in the manifest's own place"
        seen.add(rel)
        parent = rel.rpartition("/")[0]
        if parent and parent not in folders:
            return f"{rel!r} is not inside one of the backup's own folders"
        if kind == "file":
            if not (type(entry.sha256) is str and sha256(entry.sha256) and type(entry.size) is int and entry.size >= 0):
                return f"{rel!r} has no sha256 or size"
        elif kind == "symlink":
            target = entry.target
            if not (isinstance(target, str) and target and "\0" not in target):
                return f"{rel!r} is a symlink without a target"
        elif kind != "dir":
            return f"{rel!r} has an unknown type {kind!r}"
        if kind != "symlink" and not (type(entry.mode) is int and 0 <= entry.mode <= 0o7777):
            return f"{rel!r} has no mode a file can have"
        uid, gid = entry.uid, entry.gid
        if (uid is not None and not (type(uid) is int and uid >= 0)) or (
                gid is not None and not (type(gid) is int and gid >= 0)):
            return f"{rel!r} has an owner that is not a user or group id"
    return None


def load_backup(folder: Path, lazy: bool = False) -> Backup:
    """Read a backup folder's manifest; one that entries_problem refuses raises UnsafeManifest.

    With `lazy`, only the header is read now: the entries are read and checked when first used (raising
    then), and the number and size of the files come from the header where it has them."""
    manifest = folder / MANIFEST
    try:
        with open(os.path.join(folder, MANIFEST), "rb") as file:  # not Path.read_bytes: 10,000 a cleanup
            raw = file.read()
        split = split_manifest(raw) if lazy else None
        if split is None:
            return backup_from_manifest(folder, json.loads(raw))
        header, segment = split
        return backup_from_manifest(folder, header, EntriesLoader(manifest, raw, segment, header["id"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # a field of the wrong JSON type
        raise ToolkitError(f"{manifest} is unreadable or incomplete ({exc}): not a usable backup") from None


class EntriesLoader:
    """Reads a manifest's entries (`segment`, their JSON text; `raw`, the whole manifest's) when a lazily
    loaded backup first needs them."""

    def __init__(self, manifest: Path, raw: bytes, segment: bytes, backup_id: str):
        self.manifest, self.raw, self.segment, self.backup_id = manifest, raw, segment, backup_id

    def __call__(self) -> list[Entry]:
        try:
            try:
                items = json.loads(self.segment)
            except ValueError:  # entries that are not the manifest's last key: the manifest read whole
                items = json.loads(self.raw)["entries"]
            return checked_entries(items, self.backup_id)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ToolkitError(f"{self.manifest} is unreadable or incomplete ({exc}): not a usable backup") from None


def split_manifest(raw: bytes) -> tuple[dict, bytes] | None:
    """A manifest's header (its entries left empty) and the JSON text of its entries, without parsing them.

    The entries are the last key (they hold no such key themselves, and no string in them an unescaped
    quote, so the last `"entries": [` is theirs). None when the text is not laid out so."""
    start = raw.rfind(ENTRIES_KEY + b"[")
    if start < 0:
        return None
    segment = raw[start + len(ENTRIES_KEY):].rstrip()
    if not segment.endswith(b"}"):
        return None
    try:
        header = json.loads(raw[:start] + ENTRIES_KEY + b"[]}")
    except ValueError:
        return None
    return (header, segment[:-1]) if isinstance(header, dict) else None


def verified_entries_json(backup: Backup) -> bytes | None:
    """The backup's entries as the JSON text its manifest holds, when that text has the sha256 its header
    records (entries_sha256); None when it has not (damaged), the header has none, or it cannot be read."""
    entries_json = backup.entries_json()
    if entries_json is None:
        try:
            split = split_manifest((backup.path / MANIFEST).read_bytes())
        except OSError:
            return None
        if split is None or split[0].get("id") != backup.id:
            return None
        entries_json = split[1]
    digest = backup.extra.get("entries_sha256")
    if not isinstance(digest, str) or hashlib.sha256(entries_json).hexdigest() != digest:
        return None
    return entries_json


def named_sha256s(entries_json: bytes) -> list[str]:
    """The sha256 of each file entry in a manifest's entries (their JSON text as json.dumps wrote it), without
    parsing them: a quote inside a JSON string is escaped, so `"sha256": "` is only ever that key."""
    return _NAMED_SHA256.findall(entries_json.decode("ascii", "replace"))  # json.dumps writes ASCII


def manifest_bytes(header: dict, entries_json: bytes) -> bytes:
    """A manifest's text: the header, then `entries` (JSON text already) as its last key, as split_manifest reads."""
    head = json.dumps({key: value for key, value in header.items() if key != "entries"}).encode()
    return head[:-1] + (b", " if len(head) > 2 else b"") + ENTRIES_KEY + entries_json + b"}\n"


_MANIFEST_CORE = {"id", "component", "created_at", "label", "source", "entries"}  # the rest is `extra`


def check_backup(backup: Backup) -> list[str]:
    """Compare a backup's payload with its manifest; each problem is one line naming the file."""
    problems = []
    listed = {MANIFEST}
    hashed: dict[Content, str] = {}  # shared content: each hashed once, however many files name it
    for entry in backup.entries:
        listed.add(entry.path)
        if backup.objects is not None:  # its folders and symlinks are in the manifest only
            if entry.type == "file" and (problem := _shared_problem(backup, entry, hashed)):
                problems.append(f"{entry.path}: {problem}")
            continue
        path = backup.path / entry.path
        try:
            problem = _payload_problem(entry, path, hashed)
        except FileNotFoundError:
            problem = "missing from the backup"
        if problem:
            problems.append(f"{entry.path}: {problem}")
    for dirpath, dirnames, filenames in os.walk(backup.path):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), backup.path)
            if (backup.objects is not None or rel not in listed) and rel != MANIFEST:
                problems.append(f"{rel}: in the backup folder but not in its manifest")
    return problems


def _shared_problem(backup: Backup, entry: Entry, hashed: dict[Content, str]) -> str | None:
    """What is wrong with the shared content a file entry names; looked for again once if it is not where this
    process last saw it (a cleanup may have moved it to another pack meanwhile: a check holds no lock)."""
    try:
        return _content_problem(entry, backup.content(entry), hashed)
    except FileNotFoundError:
        pass
    try:
        return _content_problem(entry, backup.content(entry, fresh=True), hashed)
    except FileNotFoundError:
        return "missing from the backup"


def _payload_problem(entry: Entry, path: Path, hashed: dict[Content, str]) -> str | None:
    """What is wrong with one item of a backup that keeps its payload in its own folder."""
    if entry.type == "file":
        return _content_problem(entry, Content(str(path)), hashed)
    st = os.lstat(path)
    if entry.type == "dir" and not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if entry.type == "symlink" and (not stat.S_ISLNK(st.st_mode) or os.readlink(path) != entry.target):
        return "symlink changed"
    return None


def _content_problem(entry: Entry, content: Content, hashed: dict[Content, str]) -> str | None:
    """What is wrong with the content a file entry names (FileNotFoundError when its file is not there)."""
    st = os.lstat(content.path)
    size = st.st_size if content.span is None else content.span[1]
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if size != entry.size:
        return f"size {size}, manifest says {entry.size} (damaged)"
    if _sha256_of(content, hashed) != entry.sha256:
        return "checksum mismatch (damaged)"
    return None


def _sha256_of(content: Content, hashed: dict[Content, str]) -> str:
    """The sha256 of what `content` holds, hashed once a check (a pack's index vouches for its span's length)."""
    if content not in hashed:
        hashed[content] = size_and_sha256(content.path, content.span)[1]
    return hashed[content]

