"""Off-host copies of the backup store in S3-compatible object storage: content-addressed, manifest last.

Layout under REMOTE_URL (s3://BUCKET/PREFIX):

    PREFIX/blobs/<2 chars>/<name>               every payload file once; <name> is its sha256, or a keyed
                                                HMAC of it when REMOTE_ENCRYPTION_KEY_FILE is set
    PREFIX/<component>/manifests/<backup id>    the backup's manifest, uploaded after all its blobs

A backup is on the remote once its manifest is: a push cut off at any moment leaves blobs that no manifest
names, which `list --remote` does not show and the next push finds and does not send again. A pull checks
every byte's sha256 while downloading into a staging folder of the local store, which becomes a backup
only when whole. Credentials come from boto3's own chain (environment, profile, instance role): never
from the command line, and never printed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from common.errors import SettingError, ToolkitError, UsageError
from common.files import PRIVATE_DIR, atomic_write
from common.settings import Settings
from common.store import MANIFEST, Backup, BackupStore, Entry, backup_from_manifest, load_backup, retention_split

PAYLOAD_MODE = 0o400  # pulled payload files are read-only, like a code backup's
SMALL_OBJECT = 8 * 1024 * 1024  # below this a file goes up or down in one request, above in parallel parts
PART_SIZE = 8 * 1024 * 1024
PARALLEL = 16  # requests in flight: small objects, or the parts of a large one
LOCAL_ONLY_FIELDS = ("mtime_ns", "ctime_ns", "ino")


@dataclass(frozen=True)
class RemoteConfig:
    """Where the off-host copies go, from REMOTE_URL, S3_ENDPOINT_URL and REMOTE_ENCRYPTION_KEY_FILE."""

    bucket: str
    prefix: str
    endpoint: str | None
    key_file: Path | None
    # A blob no manifest names yet may belong to a push still running: cleanup leaves it this long.
    grace: timedelta = timedelta(hours=1)

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteConfig | None:
        """None when REMOTE_URL is not set; a malformed one is a SettingError."""
        url = settings.text("REMOTE_URL")
        if url is None:
            return None
        match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", url.strip())
        if not match:
            raise SettingError(f"REMOTE_URL must look like s3://bucket/prefix, got {url!r}")
        return cls(match.group(1), (match.group(2) or "").strip("/"), settings.text("S3_ENDPOINT_URL"),
                   settings.path("REMOTE_ENCRYPTION_KEY_FILE"),
                   timedelta(seconds=settings.number("REMOTE_CLEANUP_GRACE_SECONDS", 3600.0, minimum=0)))


@dataclass
class Transfer:
    """What a push or pull moved, updated as it goes (for progress and the report)."""

    objects: int = 0
    bytes: int = 0
    skipped: int = 0  # already there
    total_bytes: int = 0

    def to_json(self) -> dict:
        """For --json."""
        return {"objects": self.objects, "bytes": self.bytes, "skipped": self.skipped}


@dataclass
class RemoteBackup:
    """A backup as the remote has it: its manifest, and the object name of each payload file."""

    backup: Backup
    manifest_bytes: bytes
    blobs: dict[str, str] = field(default_factory=dict)  # entry path -> object key


class Remote:
    """The off-host copies of every component's backups, in one bucket and prefix."""

    def __init__(self, config: RemoteConfig):
        from common.sealing import Sealer

        self.config = config
        self.sealer = Sealer.from_key_file(config.key_file) if config.key_file else None
        self._client = None

    @property
    def client(self):
        """A boto3 S3 client, made when first needed (boto3 is heavy to import)."""
        if self._client is None:
            import boto3
            import botocore.session
            from botocore.config import Config

            session = botocore.session.get_session()
            # Timestamps stay text: parsing 1,000 of them per listing page dominated an unchanged push.
            session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
            self._client = boto3.Session(botocore_session=session).client(
                "s3", endpoint_url=self.config.endpoint,
                config=Config(max_pool_connections=PARALLEL, retries={"max_attempts": 5, "mode": "standard"},
                              s3={"addressing_style": "path"} if self.config.endpoint else None),
            )
        return self._client

    # -- names ----------------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(part for part in (self.config.prefix, *parts) if part)

    def blob_key(self, sha256: str) -> str:
        """The object holding content with this sha256."""
        name = self.sealer.name_for(sha256) if self.sealer else sha256
        return self._key("blobs", name[:2], name)

    def manifest_key(self, component: str, backup_id: str) -> str:
        """The object holding a backup's manifest."""
        return self._key(component, "manifests", backup_id)

    def stored_size(self, size: int) -> int:
        """How big the object for `size` bytes of content is on the remote."""
        return self.sealer.sealed_size(size) if self.sealer else size

    # -- reading the remote ------------------------------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in _s3_call(lambda: list(paginator.paginate(Bucket=self.config.bucket, Prefix=prefix))):
            yield from page.get("Contents", [])

    def blob_sizes(self) -> dict[str, tuple[int, str]]:
        """Every blob's key, size and time of upload (ISO text): one listing of 1,000 keys a request."""
        return {item["Key"]: (item["Size"], item["LastModified"]) for item in self._list(self._key("blobs") + "/")}

    def backup_ids(self, component: str) -> list[str]:
        """The ids of the component's backups on the remote, newest first."""
        prefix = self._key(component, "manifests") + "/"
        return sorted((item["Key"][len(prefix):] for item in self._list(prefix)), reverse=True)

    def read(self, component: str, backup_id: str) -> RemoteBackup:
        """A backup's manifest from the remote (opened when encrypted)."""
        key = self.manifest_key(component, backup_id)
        raw = _s3_call(lambda: self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read(),
                       missing=f"no backup {backup_id!r} of {component} on {self.describe()}")
        packed = self.sealer.open_bytes(raw) if self.sealer else raw
        try:
            plain = gzip.decompress(packed)
            backup = backup_from_manifest(Path(backup_id), json.loads(plain))
        except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise ToolkitError(f"the remote manifest of {backup_id} is unreadable ({exc})") from None
        if backup.id != backup_id or backup.component != component:
            raise ToolkitError(f"the remote manifest {key} describes {backup.component} {backup.id}: refused")
        return RemoteBackup(backup, plain, {e.path: self.blob_key(e.sha256) for e in backup.files if e.sha256})

    def describe(self) -> str:
        """The remote, for messages (never credentials)."""
        return f"s3://{self.config.bucket}/{self.config.prefix}" + (f" at {self.config.endpoint}"
                                                                    if self.config.endpoint else "")

    # -- push ------------------------------------------------------------------------------------------------

    def push(self, backup: Backup, progress: Transfer | None = None) -> Transfer:
        """Upload what of `backup` the remote does not have, then its manifest. Already pushed: nothing moves."""
        done = progress or Transfer()
        manifest_key = self.manifest_key(backup.component, backup.id)
        if self._exists(manifest_key):
            done.skipped = len(backup.files)
            return done
        present = self.blob_sizes()
        wanted: dict[str, Entry] = {}
        for entry in backup.files:
            key = self.blob_key(entry.sha256)
            if present.get(key, (None,))[0] == self.stored_size(entry.size) or key in wanted:
                done.skipped += 1
            else:
                wanted[key] = entry
        done.total_bytes = sum(entry.size for entry in wanted.values())
        small = [(key, entry) for key, entry in wanted.items() if entry.size < SMALL_OBJECT]
        large = [(key, entry) for key, entry in wanted.items() if entry.size >= SMALL_OBJECT]
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda item: self._put_small(backup, *item, done), small))
        for key, entry in large:  # one at a time, each in parallel parts: memory stays bounded
            self._put_large(backup, key, entry, done)
        manifest = remote_manifest(backup.path / MANIFEST)
        body = self.sealer.seal_bytes(manifest) if self.sealer else manifest
        _s3_call(lambda: self.client.put_object(Bucket=self.config.bucket, Key=manifest_key, Body=body))
        done.objects += 1
        done.bytes += len(body)
        return done

    def _exists(self, key: str) -> bool:
        try:
            _s3_call(lambda: self.client.head_object(Bucket=self.config.bucket, Key=key), missing="")
        except RemoteMissing:
            return False
        return True

    def _put_small(self, backup: Backup, key: str, entry: Entry, done: Transfer) -> None:
        data = (backup.path / entry.path).read_bytes()
        _check_content(backup, entry, len(data), hashlib.sha256(data).hexdigest())
        body = self.sealer.seal_bytes(data) if self.sealer else data
        _s3_call(lambda: self.client.put_object(Bucket=self.config.bucket, Key=key, Body=body))
        done.objects += 1
        done.bytes += len(data)

    def _put_large(self, backup: Backup, key: str, entry: Entry, done: Transfer) -> None:
        from boto3.s3.transfer import TransferConfig

        with open(backup.path / entry.path, "rb") as raw:
            reader = _HashingReader(raw, done)
            body = self.sealer.sealing_reader(reader) if self.sealer else reader
            config = TransferConfig(multipart_threshold=SMALL_OBJECT, multipart_chunksize=PART_SIZE,
                                    max_concurrency=PARALLEL, use_threads=True)
            _s3_call(lambda: self.client.upload_fileobj(body, self.config.bucket, key, Config=config))
        try:
            _check_content(backup, entry, reader.size, reader.digest.hexdigest())
        except ToolkitError:
            _s3_call(lambda: self.client.delete_object(Bucket=self.config.bucket, Key=key))
            raise
        done.objects += 1

    # -- pull ------------------------------------------------------------------------------------------------

    def pull(self, store: BackupStore, backup_id: str, progress: Transfer | None = None) -> Backup:
        """Download a backup into the local store (the caller holds its lock), every byte's sha256 checked.

        A missing or changed object refuses the pull; the local store is then as it was.
        """
        done = progress or Transfer()
        remote = self.read(store.component, backup_id)
        backup = remote.backup
        done.total_bytes = sum(entry.size for entry in backup.files)
        with store.receive(backup_id) as staging:
            for entry in sorted(backup.entries, key=lambda e: e.path.count("/")):  # folders before their files
                target = _inside(staging, entry.path, backup_id)
                if entry.type == "dir":
                    os.makedirs(target, PRIVATE_DIR, exist_ok=True)
                elif entry.type == "symlink" and entry.target is not None:
                    os.symlink(entry.target, target)
            files = [entry for entry in backup.files if entry.sha256]
            small = [entry for entry in files if entry.size < SMALL_OBJECT]
            with ThreadPoolExecutor(PARALLEL) as pool:
                list(pool.map(lambda entry: self._get(backup, entry, staging, done, parallel=False), small))
            for entry in files:
                if entry.size >= SMALL_OBJECT:
                    self._get(backup, entry, staging, done, parallel=True)
            atomic_write(staging / MANIFEST, remote.manifest_bytes)
        return load_backup(store.root / backup_id)

    def _get(self, backup: Backup, entry: Entry, staging: Path, done: Transfer, parallel: bool) -> None:
        target = _inside(staging, entry.path, backup.id)
        key = self.blob_key(entry.sha256)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            writer = _HashingWriter(out, done)
            sink = self.sealer.opening_writer(writer) if self.sealer else writer
            if parallel:
                from boto3.s3.transfer import TransferConfig

                config = TransferConfig(multipart_threshold=SMALL_OBJECT, multipart_chunksize=PART_SIZE,
                                        max_concurrency=PARALLEL, use_threads=True)
                _s3_call(lambda: self.client.download_fileobj(self.config.bucket, key, sink, Config=config),
                         missing=f"object {key} ({entry.path} of {backup.id}) is missing on the remote")
            else:
                body = _s3_call(lambda: self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read(),
                                missing=f"object {key} ({entry.path} of {backup.id}) is missing on the remote")
                sink.write(body)
            sink.close()
            os.fchmod(out.fileno(), PAYLOAD_MODE)
        if writer.size != entry.size or writer.digest.hexdigest() != entry.sha256:
            raise ToolkitError(f"object {key} ({entry.path} of {backup.id}) does not match its checksum: it was "
                               "changed or damaged on the remote; pull refused, the local store is as it was")

    # -- verify and cleanup ------------------------------------------------------------------------------------

    def verify(self, component: str, deep: bool) -> tuple[list[str], int]:
        """Problems of the component's remote backups (every object exists with its size; `deep`: its sha256)."""
        sizes = self.blob_sizes()
        problems, ids = [], self.backup_ids(component)
        checked: dict[str, str | None] = {}
        for backup_id in ids:
            try:
                remote = self.read(component, backup_id)
            except ToolkitError as exc:
                problems.append(f"{backup_id}: {exc}")
                continue
            for entry in remote.backup.files:
                key = remote.blobs[entry.path]
                size = sizes.get(key, (None,))[0]
                if size is None:
                    problems.append(f"{backup_id}: {entry.path}: object {key} is missing")
                elif size != self.stored_size(entry.size):
                    problems.append(f"{backup_id}: {entry.path}: object {key} has {size} bytes, "
                                    f"expected {self.stored_size(entry.size)}")
                elif deep:
                    if key not in checked:
                        checked[key] = self._deep_problem(key, entry)
                    if checked[key]:
                        problems.append(f"{backup_id}: {entry.path}: {checked[key]}")
        return problems, len(ids)

    def _deep_problem(self, key: str, entry: Entry) -> str | None:
        writer = _HashingWriter(io.BytesIO(), Transfer(), keep=False)
        sink = self.sealer.opening_writer(writer) if self.sealer else writer
        try:
            body = _s3_call(lambda: self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read())
            sink.write(body)
            sink.close()
        except ToolkitError as exc:
            return f"object {key}: {exc}"
        if writer.size != entry.size or writer.digest.hexdigest() != entry.sha256:
            return f"object {key} does not match its checksum (changed or damaged on the remote)"
        return None

    def cleanup(self, component: str, days: int, keep: int, dry_run: bool) -> tuple[list[str], list[str], int]:
        """Remove the component's remote backups older than `days` beyond the newest `keep`, then every blob
        that no remaining manifest of any component names. Returns (removed ids, kept ids, blobs removed)."""
        backups = [self.read(component, backup_id).backup for backup_id in self.backup_ids(component)]
        remove, kept = retention_split(backups, days, keep)
        if dry_run:
            return [b.id for b in remove], [b.id for b in kept], 0
        for backup in remove:  # manifests first: a backup half-removed is never listed as whole
            key = self.manifest_key(component, backup.id)
            _s3_call(lambda key=key: self.client.delete_object(Bucket=self.config.bucket, Key=key))
        return [b.id for b in remove], [b.id for b in kept], self._remove_unreferenced()

    def _remove_unreferenced(self) -> int:
        named: set[str] = set()
        root = self._key() + "/" if self.config.prefix else ""
        for item in self._list(root):
            parts = item["Key"][len(root):].split("/")
            if len(parts) == 3 and parts[1] == "manifests":  # <component>/manifests/<id>
                named.update(self.read(parts[0], parts[2]).blobs.values())
        cutoff = datetime.now(UTC) - self.config.grace
        doomed = [key for key, (_, when) in self.blob_sizes().items()
                  if key not in named and datetime.fromisoformat(when.replace("Z", "+00:00")) < cutoff]
        for start in range(0, len(doomed), 1000):
            batch = [{"Key": key} for key in doomed[start:start + 1000]]
            _s3_call(lambda batch=batch: self.client.delete_objects(Bucket=self.config.bucket,
                                                                    Delete={"Objects": batch, "Quiet": True}))
        return len(doomed)


def pull_when_missing(settings: Settings, store: BackupStore) -> Callable[[str], bool]:
    """A BackupStore.fetch: an id found only on the remote is pulled into the store (under its lock)."""
    def fetch(backup_id: str) -> bool:
        config = RemoteConfig.from_settings(settings)
        if config is None:
            return False
        remote = Remote(config)
        try:
            if store.locked:
                remote.pull(store, backup_id)
            else:
                with store.lock(f"pull of {backup_id}"):
                    remote.pull(store, backup_id)
        except RemoteMissing:
            return False
        return True

    return fetch


# -- helpers ----------------------------------------------------------------------------------------------------


def remote_manifest(path: Path) -> bytes:
    """The manifest as the remote keeps it: without what only meant something on this host, compressed.

    A file's mtime, ctime and inode say whether the next backup here may link it unchanged; elsewhere
    they mean nothing, and they are most of what an unchanged backup would send.
    """
    data = json.loads(path.read_bytes())
    for entry in data["entries"]:
        for name in LOCAL_ONLY_FIELDS:
            entry.pop(name, None)
    return gzip.compress(json.dumps(data).encode(), compresslevel=6, mtime=0)


class RemoteMissing(UsageError):
    """The object or backup is not on the remote (404)."""


def _s3_call(call: Callable, missing: str | None = None):
    """Run one boto3 call; its errors become one line naming what failed, never the credentials."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if missing is not None and code in ("404", "NoSuchKey", "NotFound"):
            raise RemoteMissing(missing or "not found") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            raise ToolkitError(f"the object storage refused the credentials or the access ({code}): check "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile") from None
        raise ToolkitError(f"object storage error {code}: {exc.response.get('Error', {}).get('Message', '')}") from None
    except BotoCoreError as exc:
        raise ToolkitError(f"object storage unreachable or misconfigured: {type(exc).__name__}: {exc}") from None


def _check_content(backup: Backup, entry: Entry, size: int, digest: str) -> None:
    if size != entry.size or digest != entry.sha256:
        raise ToolkitError(f"{backup.id}: {entry.path} does not match its checksum in the local store "
                           "(damaged): not pushed; `verify` names the damage")


def _inside(staging: Path, rel: str, backup_id: str) -> Path:
    parts = rel.split("/")
    if rel.startswith("/") or "\0" in rel or any(part in ("", ".", "..") for part in parts):
        raise ToolkitError(f"the remote manifest of {backup_id} has an entry {rel!r} that would leave the "
                           "backup folder: refused")
    return staging.joinpath(*parts)


class _HashingReader(io.RawIOBase):
    """Reads a file for an upload, hashing what it hands over and counting it for progress."""

    def __init__(self, raw: BinaryIO, done: Transfer):
        self.raw, self.done = raw, done
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        self.done.bytes += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _HashingWriter:
    """Takes a download's bytes in order (not seekable, so parts arrive in order), hashing what it writes."""

    def __init__(self, out: BinaryIO, done: Transfer, keep: bool = True):
        self.out, self.done, self.keep = out, done, keep
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.done.bytes += len(data)
        if self.keep:
            self.out.write(data)
        return len(data)

    def close(self) -> None:
        """Nothing to release: the caller owns the file."""
