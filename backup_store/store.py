"""The backup store: one folder per backup, a manifest written last, a lock, retention.

A folder is a backup only once it has its manifest: it is built under a `.staging-` name and renamed
into place when whole, so a run killed at any moment leaves nothing that `list` or `restore` would take.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from backup_store.locks import handed_down, release_lock, take_lock
from backup_store.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    SHARED,
    SHARED_FORMAT,
    Backup,
    EntriesLoader,
    Entry,
    backup_from_manifest,
    check_backup,
    format_time,
    load_backup,
    manifest_bytes,
)
from backup_store.objects import OBJECTS, sweep_unreferenced
from backup_store.staging import Staging
from common import __version__
from common.errors import ToolkitError, UsageError
from common.files import PRIVATE_DIR, atomic_write, flush_filesystem, fsync_dir, make_private_dir

# What a backup id looks like: one path component that sorts by time (see new_backup_id). Ids made before
# the host and the random part were added (`20261125T013000.123Z-db-ariesone-2`) match too.
BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[A-Za-z0-9_.-]{1,200}")
_TEMP_FILE = re.compile(r"\..+\.tmp-[0-9a-f]{8}")  # common.files.temp_name
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
LOCK_FILE = ".lock"


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
        """Hold the store's lock for a run that writes; a second run fails at once with LockBusy.

        Under a lock handed down by the run that started this one (a point restore holds every store's lock
        for its steps), the run proceeds under that lock and leaves it held."""
        make_private_dir(self.root)
        path = self.root / LOCK_FILE
        inherited = handed_down(path)
        fd = inherited if inherited is not None else take_lock(path, command)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            if inherited is None:
                release_lock(fd)

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
        backup_id = new_backup_id(self.component, name, created)
        while (self.root / backup_id).exists() or (self.root / f"{STAGING_PREFIX}{backup_id}").exists():
            backup_id = new_backup_id(self.component, name, created)  # 32 random bits: a retry never loops
        staging = Staging(self.root / f"{STAGING_PREFIX}{backup_id}", backup_id)
        os.mkdir(staging.path, PRIVATE_DIR)
        try:
            yield staging
            # Payload first, durably; then the manifest; then the rename that makes it a backup.
            if staging.unsynced:
                flush_filesystem(staging.path)
            atomic_write(staging.path / MANIFEST, self._manifest(staging, backup_id, created, label, safety))
            os.rename(staging.path, self.root / backup_id)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            raise

    def _manifest(self, staging: Staging, backup_id: str, created: datetime, label: str | None,
                  safety: bool) -> bytes:
        """The sealed backup's manifest text; `staging.backup` becomes what load_backup would read back."""
        files = [entry for entry in staging.entries if entry.type == "file"]
        header = {
            **staging.extra,  # first, so it cannot take the place of the fields below
            "format": SHARED_FORMAT if staging.objects else MANIFEST_FORMAT,
            "id": backup_id,
            "component": self.component,
            "created_at": format_time(created),
            "tool_version": __version__,
            "label": label,
            "kind": "safety" if safety else "backup",
            "source": staging.source,
        }
        if staging.objects:
            header["payload"] = SHARED
        if staging.fingerprint:
            header["fingerprint"] = staging.fingerprint
        entries_json = staging.entries_json
        if entries_json is None:
            header.update(files=len(files), size=sum(entry.size for entry in files))
            # No indent: the C encoder is several times faster, and `list`/--json are the way to read it.
            entries_json = json.dumps([entry.to_json() for entry in staging.entries]).encode()
            entries = staging.entries
        else:  # the entries of an earlier backup, as they are: read back (and checked) only when used
            header.update(files=staging.reused_counts[0], size=staging.reused_counts[1])
            entries = EntriesLoader(self.root / backup_id / MANIFEST, entries_json, entries_json, backup_id)
        # Damage to the entries is found before a later snapshot writes them again as they are.
        header["entries_sha256"] = hashlib.sha256(entries_json).hexdigest()
        # What load_backup would read back, without reading a 20,000-entry manifest again.
        staging.backup = backup_from_manifest(self.root / backup_id, header, entries)
        return manifest_bytes(header, entries_json)

    @contextmanager
    def receive(self, backup_id: str) -> Iterator[Path]:
        """Stage a backup that arrives whole from elsewhere (a pull), under its own id; the caller holds the lock.

        The caller writes the payload into the yielded folder and the manifest last; on a clean exit the
        folder is made durable and renamed into place, on any failure it is removed.
        """
        if not self.locked:
            raise RuntimeError("receive needs the store lock")
        if not BACKUP_ID.fullmatch(backup_id):
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

    def _loaded(self, strict: bool = False, lazy: bool = False) -> Iterator[Backup]:
        """The whole backups, newest first, each manifest read only when it is reached.

        A folder whose manifest cannot be read (or is refused) is passed over; with `strict` it stops the
        walk instead, for choices such as `latest` that would otherwise fall back to an older backup unsaid.
        With `lazy`, only each manifest's header is read (see load_backup).
        """
        for folder in self.backup_folders():
            try:
                yield load_backup(Path(folder), lazy=lazy)
            except ToolkitError as exc:
                if strict:
                    raise ToolkitError(f"backup {os.path.basename(folder)} cannot be read ({exc}), so which backup "
                                       "is the newest is not known: restore one by its id, or move that folder "
                                       "out of the store") from None

    def scan(self, keep_entries: bool = True, headers: bool = False) -> tuple[list[Backup], list[tuple[str, str]]]:
        """Every whole backup in the store, newest first, and the folders whose manifest cannot be read or is
        refused, with why (they are not backups: nothing restores or removes them).

        Without `keep_entries`, each manifest is still read whole and checked, but its entries are let go
        once checked (read again if used): a store of many large manifests is never held at once. With
        `headers`, only each manifest's header is read (what retention decides by: id, time, kind, source);
        the entries are read and checked if used."""
        found, unreadable = [], []
        for folder in self.backup_folders():
            try:
                backup = load_backup(Path(folder), lazy=headers)
            except ToolkitError as exc:
                unreadable.append((os.path.basename(folder), str(exc)))
                continue
            if not keep_entries and not headers:
                backup.entries = partial(_entries_read_again, backup.path)
            found.append(backup)
        found.sort(key=lambda backup: (backup.created_at, backup.id), reverse=True)
        return found, unreadable

    def backups(self) -> list[Backup]:
        """Every whole backup in the store, newest first; folders without a readable manifest are not backups."""
        return self.scan()[0]

    def newest(self) -> Backup | None:
        """The newest whole backup of any kind, reading one manifest's header where the store holds many.

        Its entries are read, and checked, when first used: that raises ToolkitError for a manifest whose
        header reads but whose entries do not, or are refused."""
        return next(self._loaded(lazy=True), None)

    def latest(self, match: Callable[[Backup], bool] | None = None) -> Backup | None:
        """The newest backup taken with `backup` (among those `match` accepts); never a safety backup.

        Passing over safety backups keeps `restore latest` meaning "the restore point I took", so a
        retried restore does not bring back the state the first one saved before replacing it.
        """
        for backup in self._loaded(strict=True):
            if not backup.is_safety and (match is None or match(backup)):
                return backup
        return None

    def resolve(self, ref: str, match: Callable[[Backup], bool] | None = None, lazy: bool = False) -> Backup:
        """Find a backup by `latest` (among those `match` accepts), its id, its folder, or a file inside it.

        With `lazy`, a backup named by its id has only its manifest's header read now (see load_backup)."""
        if ref == "latest":
            newest = self.latest(match)
            if newest is not None:
                return newest
            if any(backup.is_safety and (match is None or match(backup)) for backup in self._loaded()):
                raise UsageError(f"no backup taken with `backup` in {self.root}, only safety backups, which "
                                 "`latest` never means: `list` shows them; restore one by its id")
            raise UsageError(f"no backups in {self.root} yet: take one with `backup`")
        if "/" not in ref and not ref.startswith("."):
            candidate = self.root / ref
            if (candidate / MANIFEST).is_file():
                return load_backup(candidate, lazy=lazy)
            if self.fetch is not None and self.fetch(ref):  # only off-host (REMOTE_URL): pulled first
                return load_backup(candidate)
        path = Path(ref)
        if path.exists():
            for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
                if (folder / MANIFEST).is_file():
                    return load_backup(folder)
            raise UsageError(f"{ref} is not inside a backup (no {MANIFEST} in it or above it)")
        raise UsageError(f"no backup {ref!r} in {self.root}: `list` shows the backups")

    def remove(self, backup: Backup) -> None:
        """Delete a backup: renamed out of sight first, so a half-deleted one is never taken for whole."""
        doomed = self.root / f"{DELETING_PREFIX}{backup.id}-{os.urandom(3).hex()}"
        os.rename(backup.path, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed)

    def leftovers(self) -> list[str]:
        """What runs that died left in the store (unless a run holding the lock is writing it now): staging and
        deleting folders, and the temporary files of atomic writes (a `deployed.json` cut off, say)."""
        if not self.root.is_dir():
            return []
        found = []
        with os.scandir(self.root) as listing:  # one item per backup: 10,000 in a large store
            for item in listing:
                if item.name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
                    if item.is_dir(follow_symlinks=False):
                        found.append(item.name)
                elif item.name.startswith(".") and _TEMP_FILE.fullmatch(item.name) and item.is_file(
                        follow_symlinks=False):
                    found.append(item.name)
        return sorted(found)

    def sweep_objects(self) -> int | None:
        """Remove the shared payload objects no backup names any more (see backup_store.objects); how many.

        Only holding the lock. While any backup's manifest cannot be read, nothing is removed (None):
        it may name any object. One manifest is read at a time; only the names it holds are kept."""
        if not self.locked:
            raise RuntimeError("sweep_objects needs the store lock")
        if not (self.root / OBJECTS).is_dir():
            return 0
        referenced: set[str] = set()
        for folder in self.backup_folders():
            try:
                backup = load_backup(Path(folder))
            except ToolkitError:
                return None
            if backup.objects is not None:
                referenced.update(entry.sha256 for entry in backup.entries if entry.type == "file" and entry.sha256)
        return sweep_unreferenced(str(self.root / OBJECTS), referenced)

    def remove_leftovers(self) -> list[str]:
        """Remove what leftovers() names; only safe while holding the lock."""
        if not self.locked:
            raise RuntimeError("remove_leftovers needs the store lock")
        names = self.leftovers()
        for name in names:
            path = self.root / name
            if path.is_dir():  # leftovers() names no symlink
                shutil.rmtree(path)
            else:
                path.unlink()
        return names


def _entries_read_again(folder: Path) -> list[Entry]:
    """A backup's entries, read from its manifest again (for a scan that let them go)."""
    return load_backup(folder).entries


def resolve_component(store: BackupStore, ref: str, match: Callable[[Backup], bool] | None = None,
                      lazy: bool = False) -> Backup:
    """store.resolve, refusing another component's backup."""
    backup = store.resolve(ref, match, lazy)
    if backup.component != store.component:
        raise UsageError(f"{ref} is a {backup.component} backup, not a {store.component} backup")
    return backup


def refuse_damaged(backup: Backup) -> None:
    """Stop before anything changes if the backup's payload does not match its manifest."""
    problems = check_backup(backup)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ToolkitError(f"backup {backup.id} is damaged: {problems[0]}{more}; refused, nothing changed")


def new_backup_id(component: str, name: str | None, created: datetime) -> str:
    """A new id: UTC time to the millisecond (so ids sort by time), component, `name`, host, 32 random bits.

    The host and the random part keep apart the ids that two hosts, or two runs, make in the same
    millisecond: they share one remote prefix, where an id must name one backup only.
    """
    stamp = created.strftime("%Y%m%dT%H%M%S.") + f"{created.microsecond // 1000:03d}Z"
    parts = [stamp, component]
    if name:
        parts.append(_id_part(name, 40))
    parts += [_id_part(os.uname().nodename.split(".")[0], 32), os.urandom(4).hex()]
    return "-".join(parts)


def _id_part(text: str, limit: int) -> str:
    """`text` as a piece of an id: letters, digits, `_`, `.` and `-` only, at most `limit` of them."""
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-") or "x")[:limit]
