"""Pushing a backup: the objects the remote lacks or holds damaged, then the manifest, last.

A push relies on the objects already there only when they are listed with their size and not known to be
damaged (a deep verify or a pull marks what it finds changed); `repair` also reads each one back and hashes
it. What fails is sent again from the local backup, whose checksums are checked as it is read.
"""

from __future__ import annotations

import gzip
import json

from backup_store.manifest import MANIFEST, Backup, Entry
from offsite.remote import Remote, UnreadableManifest, remote_manifest_data
from offsite.remote_io import PARALLEL, SMALL_OBJECT, PushRefused, RemoteMissing, Transfer, s3_call


def push(remote: Remote, backup: Backup, done: Transfer | None = None, repair: bool = False) -> Transfer:
    """Send what of `backup` the remote lacks or holds damaged (`repair`: each object it has is read back and
    hashed too, and a damaged manifest is replaced), then its manifest unless the remote has it already.
    PushRefused when the remote holds the id for other content, or a manifest it cannot read."""
    done = done or Transfer()
    local = remote_manifest_data(backup.path / MANIFEST)
    there = _holds(remote, backup, local, repair)
    remote.present_blobs()
    _send_missing(remote, backup, done, deep=repair)
    if remote.cleanup_ran():  # a cleanup finished meanwhile: it may have taken a blob this push relied on
        remote.present_blobs(refresh=True)
        _send_missing(remote, backup, done)
    if not there:
        _put_manifest(remote, backup, local, done)
    return done


def _holds(remote: Remote, backup: Backup, local: dict, repair: bool) -> bool:
    """Whether the remote has this very backup already; PushRefused when its id names other content there, or
    a manifest that cannot be read (`repair`: one that is damaged is replaced)."""
    manifest_key = remote.manifest_key(backup.component, backup.id)
    try:
        s3_call(lambda: remote.client.head_object(Bucket=remote.config.bucket, Key=manifest_key), RemoteMissing)
    except RemoteMissing:
        return False
    try:
        there = remote.read(backup.component, backup.id)
    except UnreadableManifest as exc:
        if repair and exc.repairable:
            return False  # damaged: this host's copy takes its place
        hint = f"; `push --repair {backup.id}` replaces it with this host's copy" if exc.repairable else ""
        raise PushRefused(f"{exc}: not pushed{hint}") from None
    if there.data != local:
        raise PushRefused(f"backup {backup.id} is already on {remote.describe()} with other content (made on "
                          f"{there.backup.host or 'another host'}): not pushed, the remote copy is "
                          "left as it is; this host's backup stays in the local store")
    return True


def _put_manifest(remote: Remote, backup: Backup, local: dict, done: Transfer) -> None:
    """Upload the manifest, then read it back: another push of the same id at the same moment loses no backup
    unsaid (object storage has no "create only if absent" that every server honours)."""
    manifest_key = remote.manifest_key(backup.component, backup.id)
    packed = gzip.compress(json.dumps(local).encode(), compresslevel=6, mtime=0)
    body = remote.sealer.seal_bytes(packed) if remote.sealer else packed
    remote.call("put_object", Key=manifest_key, Body=body)
    done.add(objects=1, size=len(body))
    stored = s3_call(lambda: remote.client.get_object(Bucket=remote.config.bucket, Key=manifest_key)["Body"].read(),
                     RemoteMissing, f"the manifest of {backup.id} vanished from {remote.describe()} as it was pushed")
    if stored != body and remote.read(backup.component, backup.id).data != local:
        raise PushRefused(f"backup {backup.id} was pushed to {remote.describe()} at the same moment by another run "
                          "with other content, whose copy the remote now holds: this host's backup stays in "
                          "the local store")


def _send_missing(remote: Remote, backup: Backup, done: Transfer, deep: bool = False) -> None:
    """Upload each file whose object is not listed with its size or is known damaged (`deep`: or does not
    hash to its sha256 when read back)."""
    objects: dict[str, Entry] = {}
    for entry in backup.files:
        objects.setdefault(remote.blob_key(entry.sha256), entry)
    sound = {key for key, entry in objects.items() if remote.sound(key, entry)}
    if deep:
        sound -= {key for key in _each(objects, sound, lambda key: remote.blob_problem(key, objects[key])) if key}
    wanted = {key: entry for key, entry in objects.items() if key not in sound}
    done.skipped = len(backup.files) - len(wanted)
    done.total_bytes += sum(entry.size for entry in wanted.values())
    _each(objects, set(wanted), lambda key: remote.upload(backup, key, wanted[key], done))


def _each(objects: dict[str, Entry], keys: set[str], work) -> list[str | None]:
    """Run `work(key)` for each key: small objects 16 at a time, large ones one at a time (each in parallel
    parts, so memory stays bounded). Returns the keys for which it returned something true."""
    from concurrent.futures import ThreadPoolExecutor  # like boto3: loaded only when a remote is used

    small = [key for key in keys if objects[key].size < SMALL_OBJECT]
    with ThreadPoolExecutor(PARALLEL) as pool:
        found = [key for key, said in zip(small, pool.map(work, small), strict=True) if said]
    return found + [key for key in keys if objects[key].size >= SMALL_OBJECT and work(key)]
