"""The backup store: one folder per backup, a manifest written last, a lock, retention.

A folder is a backup only once it has its manifest: it is built under a `.staging-` name and renamed
into place when whole, so a run killed at any moment leaves nothing that `list` or `restore` would take.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import __version__
from common.copier import CopyJob, copy_all
from common.errors import LockBusy, ToolkitError, UsageError
from common.files import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    atomic_write,
    copy_and_hash,
    file_mode,
    flush_filesystem,
    flushing_meanwhile,
    fsync_dir,
    make_private_dir,
    sha256_file,
)
from common.settings import Settings

MANIFEST = "manifest.json"
_SAFE_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[A-Za-z0-9_.-]+")
MANIFEST_FORMAT = 1
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
LOCK_FILE = ".lock"


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


class Staging:
    """A backup under construction: payload goes in, then `BackupStore.new_backup` seals it."""

    def __init__(self, path: Path, backup_id: str):
        self.path = path
        self.backup_id = backup_id
        self.entries: list[Entry] = []
        self.source: dict = {}
        self.extra: dict = {}
        self.skipped: list[str] = []  # sockets, fifos and devices are not configuration or code
        self.unsynced = False  # whether files were copied in without fsync (flushed once when sealing)
        self.backup: Backup | None = None  # the sealed backup, once new_backup has renamed it into place
        self._copies: list[CopyJob] = []  # queued while add_tree walks, made on every core once it has walked

    def add_tree(
        self,
        src: Path,
        dest: str,
        exclude: Callable[[str], bool] | None = None,
        regular: Callable[[str, str, os.stat_result], Entry] | None = None,
    ) -> None:
        """Copy the folder `src` to `dest` in the payload; symlinks are kept as links, never followed.

        `regular`, when given, puts each regular file into the payload itself (given the file's path,
        its path in the payload and its lstat) and returns its entry, instead of the plain copy; it may
        leave the copy to `copy_later`.
        """
        self._add_dir(str(src), dest, "", exclude, regular)
        copies, self._copies = self._copies, []
        if copies:
            self.unsynced = True
            with flushing_meanwhile(self.path):  # the payload reaches the disk as it is copied, not all at the seal
                copy_all(copies)

    def copy_later(self, src: str, dest: str, entry: Entry, mode: int = PRIVATE_FILE,
                   copied: Callable[[int], None] | None = None) -> None:
        """Queue the copy of the regular file `src` to `dest` in the payload, made before add_tree returns.

        `entry` gets the size and sha256 of what was copied; `copied(size)`, when given, is called then.
        """

        def done(size: int, digest: str) -> None:
            entry.size, entry.sha256 = size, digest
            if copied is not None:
                copied(size)

        self._copies.append(CopyJob(src, os.path.join(self.path, dest), mode, None, done))

    def add_file(self, src: Path, dest: str) -> None:
        """Copy one regular file (or symlink) to `dest` in the payload."""
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            self._add_symlink(src, dest, st)
        elif stat.S_ISREG(st.st_mode):
            self._add_regular(src, dest, st)
        else:
            raise UsageError(f"{src} is not a regular file")

    def adopt(self, rel: str) -> None:
        """Record a file or folder a tool wrote straight into the staging folder and made durable itself.

        pg_dump fsyncs its own output (unless --no-sync), so adopted files need no flush from us.
        """
        path = self.path / rel
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, PRIVATE_DIR)
            self.entries.append(Entry(rel, "dir", mode=PRIVATE_DIR))
            for name in sorted(os.listdir(path)):
                self.adopt(f"{rel}/{name}")
        elif stat.S_ISREG(st.st_mode):
            os.chmod(path, PRIVATE_FILE)
            self.entries.append(Entry(rel, "file", mode=PRIVATE_FILE, size=st.st_size, sha256=sha256_file(path)))
        else:
            raise ToolkitError(f"{path} is neither a file nor a folder: not adopted into the backup")

    def _add_dir(
        self,
        src: str,
        dest: str,
        rel: str,
        exclude: Callable[[str], bool] | None,
        regular: Callable[[str, str, os.stat_result], Entry] | None = None,
    ) -> None:
        # Plain strings, not Path objects: this runs once per file of a 20,000-file tree.
        os.mkdir(os.path.join(self.path, dest), PRIVATE_DIR)
        st = os.lstat(src)
        self.entries.append(Entry(dest, "dir", mode=file_mode(st), uid=st.st_uid, gid=st.st_gid))
        with os.scandir(src) as listing:
            items = sorted(listing, key=lambda item: item.name)
        for item in items:
            item_rel = f"{rel}/{item.name}" if rel else item.name
            if exclude is not None and exclude(item_rel):
                continue
            item_dest = f"{dest}/{item.name}"
            st = item.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self._add_symlink(item.path, item_dest, st)
            elif stat.S_ISDIR(st.st_mode):
                self._add_dir(item.path, item_dest, item_rel, exclude, regular)
            elif stat.S_ISREG(st.st_mode) and regular is not None:
                self.entries.append(regular(item.path, item_dest, st))
            elif stat.S_ISREG(st.st_mode):
                entry = Entry(item_dest, "file", mode=file_mode(st), size=st.st_size, uid=st.st_uid, gid=st.st_gid)
                self.entries.append(entry)
                self.copy_later(item.path, item_dest, entry)
            else:
                self.skipped.append(item.path)

    def _add_regular(self, src: str | Path, dest: str, st: os.stat_result) -> None:
        self.unsynced = True
        size, digest = copy_and_hash(src, os.path.join(self.path, dest))
        self.entries.append(
            Entry(dest, "file", mode=file_mode(st), size=size, sha256=digest, uid=st.st_uid, gid=st.st_gid)
        )

    def _add_symlink(self, src: str | Path, dest: str, st: os.stat_result) -> None:
        target = os.readlink(src)
        os.symlink(target, os.path.join(self.path, dest))
        self.entries.append(Entry(dest, "symlink", target=target, uid=st.st_uid, gid=st.st_gid))


class BackupStore:
    """The backups of one component in one folder (BACKUP_DIR, CODE_BACKUP_DIR, CONFIG_BACKUP_DIR)."""

    def __init__(self, root: Path, component: str):
        self.root = root
        self.component = component
        self._lock_fd: int | None = None
        # Set when off-host copies are configured: given an id not found here, brings it into the store
        # and says whether it did (see common.remote).
        self.fetch: Callable[[str], bool] | None = None

    # -- the lock -----------------------------------------------------------------------------------

    @contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the store's lock for a run that writes; a second run fails at once with LockBusy."""
        make_private_dir(self.root)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "a run that has just started"
            os.close(fd)
            raise LockBusy(f"another run holds the lock on {self.root}: {holder}; try again later") from None
        since = format_time(datetime.now(UTC))
        holder = f"pid {os.getpid()}, {_user()}@{socket.gethostname()}, '{command}', since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    @property
    def locked(self) -> bool:
        """Whether this process holds the lock."""
        return self._lock_fd is not None

    # -- writing ------------------------------------------------------------------------------------

    @contextmanager
    def new_backup(self, label: str | None = None, name: str | None = None, safety: bool = False
                   ) -> Iterator[Staging]:
        """Build a backup in a staging folder; on a clean exit its manifest is written and it is renamed in.

        The caller holds the lock. `name` (e.g. the database name) is added to the id after the component.
        `safety` marks the backup a command takes of what it is about to replace, which `latest` passes over.
        """
        if not self.locked:
            raise RuntimeError("new_backup needs the store lock")
        created = datetime.now(UTC)
        backup_id = self._new_id(created, name)
        staging = Staging(self.root / f"{STAGING_PREFIX}{backup_id}", backup_id)
        os.mkdir(staging.path, PRIVATE_DIR)
        try:
            yield staging
            # Payload first, durably; then the manifest; then the rename that makes it a backup.
            if staging.unsynced:
                flush_filesystem(staging.path)
            manifest = {
                **staging.extra,  # first, so it cannot take the place of the fields below
                "format": MANIFEST_FORMAT,
                "id": backup_id,
                "component": self.component,
                "created_at": format_time(created),
                "tool_version": __version__,
                "label": label,
                "kind": "safety" if safety else "backup",
                "source": staging.source,
                "entries": [entry.to_json() for entry in staging.entries],
            }
            # No indent: the C encoder is several times faster, and `list`/--json are the way to read it.
            atomic_write(staging.path / MANIFEST, (json.dumps(manifest) + "\n").encode())
            os.rename(staging.path, self.root / backup_id)
            fsync_dir(self.root)
            # What load_backup would read back, without reading a 20,000-entry manifest again.
            extra = {key: value for key, value in manifest.items() if key not in _MANIFEST_CORE}
            staging.backup = Backup(self.root / backup_id, backup_id, self.component,
                                    parse_time(manifest["created_at"]), label, staging.source, staging.entries, extra)
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            raise

    @contextmanager
    def receive(self, backup_id: str) -> Iterator[Path]:
        """Stage a backup that arrives whole from elsewhere (a pull), under its own id; the caller holds the lock.

        The caller writes the payload into the yielded folder and the manifest last; on a clean exit the
        folder is made durable and renamed into place, on any failure it is removed.
        """
        if not self.locked:
            raise RuntimeError("receive needs the store lock")
        if not _SAFE_ID.fullmatch(backup_id):
            raise ToolkitError(f"{backup_id!r} is not a backup id: refused")
        if (self.root / backup_id).exists():
            raise UsageError(f"backup {backup_id} is already in {self.root}")
        staging = self.root / f"{STAGING_PREFIX}{backup_id}"
        shutil.rmtree(staging, ignore_errors=True)  # a pull that died before; we hold the lock
        os.mkdir(staging, PRIVATE_DIR)
        try:
            yield staging
            if not (staging / MANIFEST).is_file():
                raise RuntimeError("receive: the manifest was not written")
            flush_filesystem(staging)
            os.rename(staging, self.root / backup_id)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _new_id(self, created: datetime, name: str | None) -> str:
        stamp = created.strftime("%Y%m%dT%H%M%S.") + f"{created.microsecond // 1000:03d}Z"
        base = f"{stamp}-{self.component}"
        if name:
            base += "-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "x")[:40]
        candidate, n = base, 1
        while (self.root / candidate).exists() or (self.root / f"{STAGING_PREFIX}{candidate}").exists():
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    # -- reading ------------------------------------------------------------------------------------

    def backup_folders(self) -> list[str]:
        """The folders that hold a manifest, newest first (ids begin with their UTC time, so names sort by it)."""
        if not self.root.is_dir():
            return []
        with os.scandir(self.root) as listing:
            folders = [
                item.path
                for item in listing
                if not item.name.startswith(".")
                and item.is_dir(follow_symlinks=False)
                and os.path.exists(os.path.join(item.path, MANIFEST))
            ]
        return sorted(folders, key=os.path.basename, reverse=True)

    def _loaded(self) -> Iterator[Backup]:
        """The whole backups, newest first, each manifest read only when it is reached."""
        for folder in self.backup_folders():
            try:
                yield load_backup(Path(folder))
            except ToolkitError:
                continue

    def backups(self) -> list[Backup]:
        """Every whole backup in the store, newest first; folders without a readable manifest are not backups."""
        found = list(self._loaded())
        found.sort(key=lambda backup: (backup.created_at, backup.id), reverse=True)
        return found

    def newest(self) -> Backup | None:
        """The newest whole backup of any kind, reading one manifest where the store holds many."""
        return next(self._loaded(), None)

    def latest(self, match: Callable[[Backup], bool] | None = None) -> Backup | None:
        """The newest backup taken with `backup` (safety backups only when there is nothing else).

        Passing over safety backups keeps `restore latest` meaning "the restore point I took", so a
        retried restore does not bring back the state the first one saved before replacing it.
        """
        fallback = None
        for backup in self._loaded():
            if match is not None and not match(backup):
                continue
            if not backup.is_safety:
                return backup
            fallback = fallback or backup
        return fallback

    def resolve(self, ref: str, match: Callable[[Backup], bool] | None = None) -> Backup:
        """Find a backup by `latest` (among those `match` accepts), its id, its folder, or a file inside it."""
        if ref == "latest":
            newest = self.latest(match)
            if newest is None:
                raise UsageError(f"no backups in {self.root} yet: take one with `backup`")
            return newest
        if "/" not in ref and not ref.startswith("."):
            candidate = self.root / ref
            if (candidate / MANIFEST).is_file():
                return load_backup(candidate)
            if self.fetch is not None and self.fetch(ref):  # only off-host (REMOTE_URL): pulled first
                return load_backup(candidate)
        path = Path(ref)
        if path.exists():
            for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
                if (folder / MANIFEST).is_file():
                    return load_backup(folder)
            raise UsageError(f"{ref} is not inside a backup (no {MANIFEST} in it or above it)")
        raise UsageError(f"no backup {ref!r} in {self.root}: `list` shows the backups")

    # -- retention ----------------------------------------------------------------------------------

    def retention_plan(self, days: int, keep: int, now: datetime | None = None) -> tuple[list[Backup], list[Backup]]:
        """Split the backups into (to remove, to keep): older than `days`, beyond the newest `keep`."""
        return retention_split(self.backups(), days, keep, now)

    def remove(self, backup: Backup) -> None:
        """Delete a backup: renamed out of sight first, so a half-deleted one is never taken for whole."""
        doomed = self.root / f"{DELETING_PREFIX}{backup.id}-{secrets.token_hex(3)}"
        os.rename(backup.path, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed)

    def remove_leftovers(self) -> list[str]:
        """Remove staging and deleting folders of runs that died; only safe while holding the lock."""
        if not self.locked:
            raise RuntimeError("remove_leftovers needs the store lock")
        removed = []
        for item in sorted(self.root.iterdir()):
            if item.name.startswith((STAGING_PREFIX, DELETING_PREFIX)) and item.is_dir():
                shutil.rmtree(item)
                removed.append(item.name)
        return removed


def open_store(settings: Settings, store_setting: tuple[str, str], component: str) -> BackupStore:
    """A component's store from its setting; with REMOTE_URL set, an id found only off-host is pulled first."""
    store = BackupStore(settings.path(*store_setting), component)
    if settings.text("REMOTE_URL"):
        from common.remote import pull_when_missing

        store.fetch = pull_when_missing(settings, store)
    return store


def retention_split(backups: list[Backup], days: int, keep: int, now: datetime | None = None
                    ) -> tuple[list[Backup], list[Backup]]:
    """The retention rule, wherever the backups are: older than `days` and beyond the newest `keep` go."""
    if keep < 1:
        raise UsageError("--keep must be at least 1: the newest backup is never removed")
    if days < 0:
        raise UsageError("DAYS must be 0 or more")
    newest_first = sorted(backups, key=lambda backup: (backup.created_at, backup.id), reverse=True)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    remove = [backup for backup in newest_first[keep:] if backup.created_at < cutoff]
    return remove, [backup for backup in newest_first if backup not in remove]


def backup_from_manifest(folder: Path, data: dict) -> Backup:
    """A Backup from a manifest's parsed JSON (`folder` is where it is, or would be, in a store)."""
    return Backup(
        path=folder,
        id=data["id"],
        component=data["component"],
        created_at=parse_time(data["created_at"]),
        label=data.get("label"),
        source=data.get("source") or {},
        entries=[Entry.from_json(item) for item in data["entries"]],
        extra={key: value for key, value in data.items() if key not in _MANIFEST_CORE},
    )


def load_backup(folder: Path) -> Backup:
    """Read a backup folder's manifest."""
    try:
        return backup_from_manifest(folder, json.loads((folder / MANIFEST).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
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


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
