"""Pulling a backup from the remote into the local store, every byte's sha256 checked on the way."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from backup_store.manifest import MANIFEST, Backup, Entry, load_backup
from backup_store.store import BackupStore
from common.components import Component
from common.errors import ToolkitError, UsageError
from common.files import PRIVATE_DIR, atomic_write, flushing_meanwhile
from common.settings import Settings
from offsite.remote import Remote, RemoteConfig
from offsite.remote_io import PARALLEL, SMALL_OBJECT, HashingWriter, RemoteMissing, Transfer
from offsite.sealing import SealError

PAYLOAD_MODE = 0o400  # pulled payload files are read-only, like a code backup's


def pull(remote: Remote, store: BackupStore, backup_id: str, done: Transfer | None = None) -> Backup:
    """Download a backup into the local store (the caller holds its lock), every byte's sha256 checked.

    Folders first, then files (never through a link), symlinks last; a missing or changed object
    refuses the pull, is marked damaged on the remote, and the local store is as it was.
    """
    from concurrent.futures import ThreadPoolExecutor  # like boto3: loaded only when a remote is used

    done = done or Transfer()
    copy = remote.read(store.component, backup_id)
    backup = copy.backup
    paths = {entry.path: entry.path.split("/") for entry in backup.entries}  # checked by read()
    done.total_bytes = sum(entry.size for entry in backup.files)
    # Flushed to disk as it arrives, so making the pulled backup durable at the end costs little.
    with store.receive(backup_id) as staging, flushing_meanwhile(staging):
        for entry in sorted(backup.entries, key=lambda e: e.path.count("/")):
            if entry.type == "dir":
                os.mkdir(staging.joinpath(*paths[entry.path]), PRIVATE_DIR)
        files = backup.files
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda e: _get(remote, backup, e, staging.joinpath(*paths[e.path]), done),
                          [e for e in files if e.size < SMALL_OBJECT]))
        for entry in files:
            if entry.size >= SMALL_OBJECT:
                _get(remote, backup, entry, staging.joinpath(*paths[entry.path]), done)
        for entry in backup.entries:
            if entry.type == "symlink":
                os.symlink(entry.target, staging.joinpath(*paths[entry.path]))
        atomic_write(staging / MANIFEST, copy.manifest_bytes)
    return load_backup(store.root / backup_id)


def _get(remote: Remote, backup: Backup, entry: Entry, target: Path, done: Transfer) -> None:
    key = remote.blob_key(entry.sha256)
    what = f"object {key} ({entry.path} of {backup.id})"
    damaged = (f"{what} does not match its checksum: it was changed or damaged on the remote; pull refused, "
               "the local store is as it was; `verify --remote --deep --repair` on a host that has the backup, "
               "or its next push, sends it again")
    # O_EXCL|O_NOFOLLOW: a name already there, link or not, is never written through.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        try:
            writer = remote.download(key, entry.size, HashingWriter(out, done, background=entry.size >= SMALL_OBJECT),
                                     f"{what} is missing on the remote")
        except SealError as exc:
            remote.mark_damaged(key)
            raise ToolkitError(f"{damaged} ({exc})") from None
        os.fchmod(out.fileno(), PAYLOAD_MODE)
    if writer.size != entry.size or writer.digest.hexdigest() != entry.sha256:
        remote.mark_damaged(key)
        raise ToolkitError(damaged)


_downloads_allowed = True


def forbid_downloads() -> None:
    """For a dry run: a backup found only on the remote is reported, not pulled."""
    global _downloads_allowed
    _downloads_allowed = False


def pull_when_missing(settings: Settings, store: BackupStore) -> Callable[[str], bool]:
    """A BackupStore.fetch: an id found only on the remote is pulled into the store (under its lock)."""
    def fetch(backup_id: str) -> bool:
        config = RemoteConfig.from_settings(settings)
        if config is None:
            return False
        remote = Remote(config)
        if not _downloads_allowed:
            try:
                remote.read(store.component, backup_id)
            except RemoteMissing:
                return False
            raise UsageError(f"backup {backup_id} is only on {remote.describe()}: a dry run does not download it; "
                             f"`pull {backup_id}` first to see what a restore would do")
        try:
            if store.locked:
                pull(remote, store, backup_id)
            else:
                with store.lock(f"pull of {backup_id}"):
                    pull(remote, store, backup_id)
        except RemoteMissing:
            return False
        return True

    return fetch


def open_store(settings: Settings, component: Component) -> BackupStore:
    """A component's store as every command opens it: with REMOTE_URL set, an id found only off-host is
    pulled into it first."""
    store = BackupStore(component.store_path(settings), component.name)
    if settings.text("REMOTE_URL"):
        store.fetch = pull_when_missing(settings, store)
    return store
