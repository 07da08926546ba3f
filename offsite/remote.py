"""Off-host copies of the backup store in S3-compatible object storage: content-addressed, manifest last.

Layout under REMOTE_URL (s3://BUCKET/PREFIX):

    PREFIX/blobs/<2 chars>/<name>               every payload file once; <name> is its sha256, or a keyed
                                                HMAC of it when REMOTE_ENCRYPTION_KEY_FILE is set
    PREFIX/<component>/manifests/<backup id>    the backup's manifest (compressed), uploaded after its blobs
    PREFIX/<component>/pins/<backup id>         a backup pinned from any host (backup_store/pins.py): every
                                                cleanup --remote keeps it; one object each, so two hosts
                                                pinning at once never undo each other's pin
    PREFIX/cleanup-candidates                   blobs no manifest named at a cleanup, and since when
                                                (verify and cleanup: offsite/upkeep.py)
    PREFIX/damaged/<name>                       a blob a deep verify or a pull found damaged: every push
                                                sends it again before relying on it (offsite/push.py)

A backup is on the remote once its manifest is: a push cut off at any moment leaves blobs that no manifest
names, which `list --remote` does not show and the next push finds and does not send again. A pull checks
every byte's sha256 while downloading into a staging folder of the local store, which becomes a backup
only when whole. A cleanup deletes a blob only once no manifest has named it for REMOTE_CLEANUP_GRACE_SECONDS
(seen by two cleanups), so a push that is reusing it has time to upload its manifest. Credentials come from
boto3's own chain (environment, profile, instance role) or the .env file: never from the command line, and
never printed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from backup_store.manifest import Backup, Entry, UnsafeManifest, backup_from_manifest
from common.errors import SettingError, ToolkitError
from common.files import size_and_sha256
from common.settings import Settings
from offsite import fetch_pool
from offsite.manifest_cache import ManifestCache
from offsite.remote_io import (
    ATTEMPTS,
    PARALLEL,
    SMALL_OBJECT,
    HashingReader,
    HashingWriter,
    ObjectMissing,
    RemoteMissing,
    Transfer,
    check_content,
    s3_call,
    transfer_config,
)
from offsite.sealing import KEY_SETTING, Sealer, SealError, WrongKey, sealed_fingerprint
from offsite.sealing import MAGIC as SEAL_MAGIC

LOCAL_ONLY_FIELDS = ("mtime_ns", "ctime_ns", "ino")  # a file's identity on this host: meaningless elsewhere
# Where the local store keeps the content, and the fingerprint of the tree's stat: a pulled copy has its
# payload in its own folder, and its next backup here reads every file.
LOCAL_ONLY_HEADER = ("payload", "fingerprint", "entries_sha256")
PINS = "pins"  # PREFIX/<component>/pins/<backup id>
CANDIDATES = "cleanup-candidates"  # blobs no manifest named at a cleanup, and since when
DAMAGED = "damaged"  # DAMAGED/<blob name>: a blob found damaged, which pushes send again before relying on it
GZIP_MAGIC = b"\x1f\x8b"
CREDENTIAL_SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                       "AWS_PROFILE")


@dataclass(frozen=True)
class RemoteConfig:
    """Where the off-host copies go, from REMOTE_URL, S3_ENDPOINT_URL and REMOTE_ENCRYPTION_KEY_FILE."""

    bucket: str
    prefix: str
    endpoint: str | None
    key_file: Path | None
    grace: timedelta = timedelta(hours=1)
    timeout: float = 30.0  # S3_TIMEOUT_SECONDS: to connect, and for each answer to come (per attempt)
    # AWS_* settings from the .env file, which boto3 does not read; the environment it reads itself.
    credentials: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteConfig | None:
        """None when REMOTE_URL is not set; a malformed one is a SettingError."""
        url = settings.text("REMOTE_URL")
        if url is None:
            return None
        match = re.fullmatch(r"s3://([^/]*)(?:/(.*))?", url.strip())
        if not match:
            raise SettingError(f"REMOTE_URL must look like s3://bucket/prefix, got {url!r}")
        problem = bucket_name_problem(match.group(1))
        if problem:
            raise SettingError(f"REMOTE_URL {url!r}: the bucket name {match.group(1)!r} {problem}")
        credentials = {name: value for name in CREDENTIAL_SETTINGS
                       if name not in os.environ and (value := settings.text(name))}
        return cls(match.group(1), (match.group(2) or "").strip("/"), settings.text("S3_ENDPOINT_URL"),
                   settings.path("REMOTE_ENCRYPTION_KEY_FILE"),
                   timedelta(seconds=settings.number("REMOTE_CLEANUP_GRACE_SECONDS", 3600.0, minimum=0)),
                   settings.number("S3_TIMEOUT_SECONDS", 30.0, minimum=1), credentials)


class UnreadableManifest(ToolkitError):
    """A remote manifest that cannot be read: damaged (`repairable` from a local copy of the backup), or
    sealed with another key or none, which is no damage and which no push replaces."""

    def __init__(self, message: str, repairable: bool = True):
        super().__init__(message)
        self.repairable = repairable


@dataclass
class RemoteBackup:
    """A backup as the remote has it: its manifest, and the object key of each payload file."""

    backup: Backup
    manifest_bytes: bytes
    data: dict  # the manifest's JSON
    blobs: dict[str, str] = field(default_factory=dict)  # entry path -> object key


class Remote:
    """The off-host copies of every component's backups, in one bucket and prefix."""

    def __init__(self, config: RemoteConfig, manifest_cache: Path | None = None):
        self.config = config
        self.sealer = Sealer.from_key_file(config.key_file) if config.key_file else None
        # Manifests read before, by key and ETag, and opened with this key (or none): a copy opened with one
        # key never stands for what another key, or no key, would find.
        self.manifests = ManifestCache(manifest_cache, self.sealer.fingerprint if self.sealer else "plain")
        self._session = None
        self._client = None
        self._present: dict[str, tuple[int, str]] | None = None  # see present_blobs
        self._present_mark: str | None = None
        self._damaged: set[str] = set()
        self._fetched: dict[str, tuple[str | None, bytes]] = {}  # manifests read ahead by a scan's workers

    @property
    def client(self):
        """A boto3 S3 client (thread-safe), made when first needed: boto3 is heavy to import."""
        if self._client is None:
            self._session = s3_call(lambda: s3_session(self.config))
            self._client = s3_call(lambda: s3_client(self._session, self.config))
        return self._client

    def call(self, method: str, **kwargs):
        """One client method on this bucket, through s3_call."""
        return s3_call(lambda: getattr(self.client, method)(Bucket=self.config.bucket, **kwargs))

    # -- names ----------------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """An object key under the prefix."""
        return "/".join(part for part in (self.config.prefix, *parts) if part)

    def blob_key(self, sha256: str) -> str:
        """The object holding content with this sha256."""
        name = self.sealer.name_for(sha256) if self.sealer else sha256
        return self.key("blobs", name[:2], name)

    def manifest_key(self, component: str, backup_id: str) -> str:
        """The object holding a backup's manifest."""
        return self.key(component, "manifests", backup_id)

    def pins(self, component: str) -> dict[str, bytes]:
        """The component's pins on the remote, by backup id: each one's JSON text (see backup_store.pins)."""
        prefix = self.key(component, PINS) + "/"
        return {item["Key"][len(prefix):]: self.pin(component, item["Key"][len(prefix):])
                for item in self._list(prefix)}

    def pin(self, component: str, backup_id: str) -> bytes:
        """One pin's JSON text, b"" when the backup is not pinned on the remote."""
        key = self.key(component, PINS, backup_id)
        try:
            raw = s3_call(lambda: self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read(),
                          RemoteMissing)
        except RemoteMissing:
            return b""
        try:
            return self.sealer.open_bytes(raw) if self.sealer else raw
        except SealError as exc:  # WrongKey among them
            raise ToolkitError(f"the pin {key} on {self.describe()} cannot be opened ({exc}): nothing is removed "
                               "until it can") from None

    def put_pin(self, component: str, backup_id: str, text: bytes | None) -> None:
        """Pin a backup on the remote with this JSON text (sealed when the remote is encrypted); None unpins it."""
        key = self.key(component, PINS, backup_id)
        if text is None:
            self.call("delete_object", Key=key)
        else:
            self.call("put_object", Key=key, Body=self.sealer.seal_bytes(text) if self.sealer else text)

    def stored_size(self, size: int) -> int:
        """How big the object for `size` bytes of content is on the remote."""
        return self.sealer.sealed_size(size) if self.sealer else size

    def size_fits(self, stored: int, size: int) -> bool:
        """Whether an object of `stored` bytes can hold `size` bytes of content (sealed in any format version)."""
        return stored in self.sealer.sealed_sizes(size) if self.sealer else stored == size

    def describe(self) -> str:
        """The remote, for messages (never credentials)."""
        endpoint = f" at {self.config.endpoint}" if self.config.endpoint else ""
        return f"s3://{self.config.bucket}/{self.config.prefix}{endpoint}"

    # -- reading the remote ------------------------------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in s3_call(lambda: list(paginator.paginate(Bucket=self.config.bucket, Prefix=prefix))):
            yield from page.get("Contents", [])

    def blob_sizes(self) -> dict[str, tuple[int, str]]:
        """Every blob's key, size and time of upload (ISO text): one listing of 1,000 keys a request."""
        return {item["Key"]: (item["Size"], item["LastModified"]) for item in self._list(self.key("blobs") + "/")}

    def backup_ids(self, component: str) -> list[str]:
        """The ids of the component's backups on the remote, newest first."""
        return sorted(self._listed(component), reverse=True)

    def _listed(self, component: str) -> dict[str, str | None]:
        """The component's backup ids on the remote, each with its manifest's ETag."""
        prefix = self.key(component, "manifests") + "/"
        return {item["Key"][len(prefix):]: item.get("ETag") for item in self._list(prefix)}

    def all_manifests(self, but: str | None = None) -> Iterator[tuple[str, str, str | None]]:
        """(component, backup id, the manifest's ETag) of every backup of every component on the remote but
        `but`'s: each component's manifests listed on their own, never the blobs or `but`'s (10,000 keys are
        ten requests, and several seconds on some servers)."""
        root = self.key() + "/" if self.config.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = s3_call(lambda: list(paginator.paginate(Bucket=self.config.bucket, Prefix=root, Delimiter="/")))
        # The folders, and the first part of any key below one: a server that ignores the delimiter lists
        # every key, and a component it missed would have its blobs look unnamed to a cleanup.
        names = [item["Prefix"] for page in pages for item in page.get("CommonPrefixes", [])]
        names += [item["Key"] for page in pages for item in page.get("Contents", [])]
        folders = sorted({name[len(root):].split("/", 1)[0] for name in names if "/" in name[len(root):]})
        for component in folders:
            if component not in ("blobs", DAMAGED, but):
                for backup_id, etag in self._listed(component).items():
                    yield component, backup_id, etag

    def read(self, component: str, backup_id: str, etag: str | None = None) -> RemoteBackup:
        """A backup's manifest from the remote (opened when encrypted), or from the copy kept of it when its
        ETag (from a listing) is the copy's; UnreadableManifest names what is wrong."""
        key = self.manifest_key(component, backup_id)
        what = f"the remote manifest of {component} backup {backup_id}"
        packed = self.manifests.get(key, etag)
        fetched = None
        if packed is None:
            fetched = self._fetched.pop(key, None)
            if fetched is None:
                response = s3_call(lambda: self.client.get_object(Bucket=self.config.bucket, Key=key),
                                   RemoteMissing, f"no backup {backup_id!r} of {component} on {self.describe()}")
                fetched = response.get("ETag"), s3_call(lambda: response["Body"].read())
            packed = self._open_manifest(fetched[1], what)
        try:
            plain = gzip.decompress(packed)
            data = json.loads(plain)
            backup = backup_from_manifest(Path(backup_id), data)
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadableManifest(f"{what} is unreadable, damaged ({exc})") from None
        except UnsafeManifest as exc:
            raise UnreadableManifest(f"{exc} (on {self.describe()})") from None
        if backup.id != backup_id or backup.component != component:
            raise UnreadableManifest(f"the remote manifest {key} describes {backup.component} {backup.id}: refused")
        if fetched is not None:  # kept only once it has read whole: damage is never kept as the object's bytes
            self.manifests.put(key, fetched[0], packed)
        return RemoteBackup(backup, plain, data, {e.path: self.blob_key(e.sha256) for e in backup.files})

    def _open_manifest(self, raw: bytes, what: str) -> bytes:
        """The manifest's compressed bytes: opened with the key, which it must have been sealed with."""
        if self.sealer is None:
            if raw.startswith(SEAL_MAGIC):
                fingerprint = sealed_fingerprint(raw)
                named = f" with the key of fingerprint {fingerprint}" if fingerprint else ""
                raise UnreadableManifest(f"{what} is encrypted{named}, and {KEY_SETTING} is not set: set it to the "
                                         "key it was pushed with", repairable=False)
            return raw
        if raw.startswith(GZIP_MAGIC):
            raise UnreadableManifest(f"{what} is not encrypted (it was pushed without {KEY_SETTING}); with "
                                     f"{KEY_SETTING} set, only encrypted copies are read", repairable=False)
        try:
            return self.sealer.open_bytes(raw)
        except WrongKey as exc:
            raise UnreadableManifest(f"{what}: {exc}", repairable=False) from None
        except SealError as exc:
            raise UnreadableManifest(f"{what} is damaged: {exc}") from None

    def scan(self, component: str | None = None, but: str | None = None, only: list[str] | None = None
             ) -> tuple[list[RemoteBackup], list[tuple[str, UnreadableManifest]]]:
        """The component's backups on the remote (those of `only` ids; every component's with None, but `but`'s),
        newest first, and the id of each manifest that cannot be read with why (one manifest must not hide the
        others). A remote of 10,000 backups is 10,000 requests: those not kept from an earlier scan are read
        PARALLEL at a time, and when there are many, read ahead by worker processes (offsite/fetch_pool.py)."""
        if component:
            listed = {backup_id: None for backup_id in only} if only is not None else self._listed(component)
            ids = [(component, backup_id, etag) for backup_id, etag in sorted(listed.items(), reverse=True)]
        else:
            ids = sorted(self.all_manifests(but), key=lambda item: item[1],
                         reverse=True)

        def read(item: tuple[str, str, str | None]) -> RemoteBackup | UnreadableManifest | None:
            try:
                return self.read(*item)
            except UnreadableManifest as exc:
                return exc
            except RemoteMissing:
                return None  # removed since the listing: a cleanup ran meanwhile

        unread = [key for component_id, backup_id, etag in ids
                  if self.manifests.get(key := self.manifest_key(component_id, backup_id), etag) is None]
        from concurrent.futures import ThreadPoolExecutor  # like boto3: loaded only when a remote is used

        try:
            if len(unread) >= fetch_pool.FROM_OBJECTS:
                signing = fetch_pool.Signing.of(self.client, self._session)
                self._fetched = fetch_pool.read_objects(signing, self.config.bucket, unread)
            with ThreadPoolExecutor(PARALLEL) as pool:
                found = list(pool.map(read, ids))
        finally:
            self._fetched = {}
        self.manifests.save()
        copies = [copy for copy in found if isinstance(copy, RemoteBackup)]
        unreadable = [(backup_id, copy) for (_, backup_id, _), copy in zip(ids, found, strict=True)
                      if isinstance(copy, UnreadableManifest)]
        return copies, unreadable

    # -- blobs: the one upload, the one download, the deep check, what is known damaged -----------------------

    def present_blobs(self, refresh: bool = False) -> dict[str, tuple[int, str]]:
        """blob_sizes(), listed once for a run that pushes many backups, and again when `refresh` or when a
        cleanup has run since (it may have removed a blob that was there)."""
        mark = self._cleanup_mark()
        if refresh or self._present is None or mark != self._present_mark:
            self._present, self._present_mark = self.blob_sizes(), mark
            self._damaged = self.damaged_blobs()
        return self._present

    def cleanup_ran(self) -> bool:
        """Whether a cleanup finished since present_blobs() last listed the blobs."""
        return self._cleanup_mark() != self._present_mark

    def sound(self, key: str, entry: Entry) -> bool:
        """Whether present_blobs() found `entry`'s object with its size, and it is not known to be damaged."""
        listed = (self._present or {}).get(key)
        return listed is not None and self.size_fits(listed[0], entry.size) and key not in self._damaged

    def upload(self, backup: Backup, key: str, entry: Entry, done: Transfer) -> None:
        """Send one payload file of a local backup as the object `key`, its checksum checked as it is read."""
        if entry.size < SMALL_OBJECT or backup.content(entry).span is not None:  # a pack's span: read whole
            self._put_small(backup, key, entry, done)
        else:
            self._put_large(backup, key, entry, done)
        if self._present is not None:
            self._present[key] = (self.stored_size(entry.size), "")
        if key in self._damaged:
            self.call("delete_object", Key=self._damaged_marker(key))
            self._damaged.discard(key)

    def _put_small(self, backup: Backup, key: str, entry: Entry, done: Transfer) -> None:
        data = backup.read_small(entry)
        check_content(backup.id, entry.path, (entry.size, entry.sha256), len(data), hashlib.sha256(data).hexdigest())
        self.call("put_object", Key=key, Body=self.sealer.seal_bytes(data) if self.sealer else data)
        done.add(objects=1, size=len(data))

    def _put_large(self, backup: Backup, key: str, entry: Entry, done: Transfer) -> None:
        path = Path(backup.payload(entry))
        if self.sealer:  # sealed as it is read: one stream, hashed on the way
            with open(path, "rb") as raw:
                reader = HashingReader(raw, done)
                body = self.sealer.sealing_reader(reader)
                s3_call(lambda: self.client.upload_fileobj(body, self.config.bucket, key, Config=transfer_config()))
            size, digest = reader.size, reader.digest.hexdigest()
        else:  # parts read in parallel by s3transfer; the checksum on another thread meanwhile
            from concurrent.futures import ThreadPoolExecutor  # like boto3: loaded only when a remote is used

            with ThreadPoolExecutor(1) as hasher:
                hashed = hasher.submit(size_and_sha256, path)
                s3_call(lambda: self.client.upload_file(str(path), self.config.bucket, key, Config=transfer_config(),
                                                        Callback=lambda sent: done.add(size=sent)))
                size, digest = hashed.result()
        try:
            check_content(backup.id, entry.path, (entry.size, entry.sha256), size, digest)
        except ToolkitError:
            self.call("delete_object", Key=key)
            raise
        done.add(objects=1)

    def blob_problem(self, key: str, entry: Entry) -> str | None:
        """What is wrong with the object holding `entry`'s content, read whole and hashed; None when it is sound.

        A damaged object is marked so (mark_damaged): no push reuses it before sending it again.
        """
        try:  # streamed through the hash, never held whole: a dump may be larger than memory
            writer = self.download(key, entry.size, HashingWriter(None, Transfer()), f"object {key} is missing")
        except ObjectMissing as exc:
            return str(exc)
        except SealError as exc:
            self.mark_damaged(key)
            return f"object {key}: {exc}"
        if writer.size != entry.size or writer.digest.hexdigest() != entry.sha256:
            self.mark_damaged(key)
            return f"object {key} does not match its checksum (changed or damaged on the remote)"
        return None

    def damaged_blobs(self) -> set[str]:
        """The blobs a deep verify or a pull found damaged, and no push has sent again since."""
        prefix = self.key(DAMAGED) + "/"
        names = (item["Key"][len(prefix):] for item in self._list(prefix))
        return {self.key("blobs", name[:2], name) for name in names if name and "/" not in name}

    def mark_damaged(self, key: str) -> None:
        """Note that the object `key` is damaged, for every host's next push to send it again."""
        self.call("put_object", Key=self._damaged_marker(key), Body=b"")
        self._damaged.add(key)

    def _damaged_marker(self, key: str) -> str:
        return self.key(DAMAGED, key.rsplit("/", 1)[1])

    def download(self, key: str, size: int, writer: HashingWriter, missing: str) -> HashingWriter:
        """Stream an object through `writer` (opened first when encrypted); large ones in parallel parts."""
        sink = self.sealer.opening_writer(writer) if self.sealer else writer
        if size >= SMALL_OBJECT:
            s3_call(lambda: self.client.download_fileobj(self.config.bucket, key, sink, Config=transfer_config()),
                    ObjectMissing, missing)
        else:
            body = s3_call(lambda: self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"],
                           ObjectMissing, missing)
            s3_call(lambda: [sink.write(chunk) for chunk in body.iter_chunks(1024 * 1024)])
        sink.close()
        return writer

    def _cleanup_mark(self) -> str | None:
        """The ETag of the record a cleanup rewrites at its end, or None when no cleanup ever ran."""
        try:
            return s3_call(lambda: self.client.head_object(Bucket=self.config.bucket,
                                                           Key=self.key(CANDIDATES))["ETag"], RemoteMissing)
        except RemoteMissing:
            return None


def s3_session(config: RemoteConfig):
    """A boto3 session with the remote's credentials (boto3's own chain, or the .env file's AWS_* settings)."""
    import boto3
    import botocore.session

    session = botocore.session.get_session()
    # Timestamps stay text: parsing 1,000 of them per listing page dominated an unchanged push.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    creds = config.credentials
    return boto3.Session(
        botocore_session=session, profile_name=creds.get("AWS_PROFILE"),
        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=creds.get("AWS_SESSION_TOKEN"), region_name=creds.get("AWS_DEFAULT_REGION"))


def s3_client(session, config: RemoteConfig):
    """A boto3 S3 client for the remote, with the toolkit's timeouts, retries and connection pool."""
    from botocore.config import Config

    return session.client("s3", endpoint_url=config.endpoint, config=Config(
        max_pool_connections=PARALLEL, retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        connect_timeout=config.timeout, read_timeout=config.timeout,
        s3={"addressing_style": "path"} if config.endpoint else None))


def bucket_name_problem(name: str) -> str | None:
    """Why S3 would refuse `name` as a bucket name, if it would (3-63 of a-z 0-9 . -, a letter or digit at each end)."""
    if not 3 <= len(name) <= 63:
        return f"has {len(name)} characters; S3 bucket names have 3 to 63"
    if not re.fullmatch(r"[a-z0-9.\-]+", name):
        return "may hold only lowercase letters, digits, dots and hyphens"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "must begin and end with a letter or a digit"
    return None


def remote_manifest_data(path: Path) -> dict:
    """The manifest as the remote keeps it (compressed, on upload): without what only meant something here.

    A file's mtime, ctime and inode say whether the next backup here may link it unchanged; elsewhere
    they mean nothing, and they are most of what an unchanged backup would send.
    """
    data = json.loads(path.read_bytes())
    for name in LOCAL_ONLY_HEADER:
        data.pop(name, None)
    for entry in data["entries"]:
        for name in LOCAL_ONLY_FIELDS:
            entry.pop(name, None)
    return data
