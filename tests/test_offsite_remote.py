"""Off-host copies (offsite/) called directly against the suite's real S3 server: push then pull gives the backup
back byte for byte, a push sends only what the remote lacks, and verify names an object that is missing or
changed there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import ACCESS_KEY, SECRET_KEY, Bucket
from test_backup_store import contents, make_source, take

from backup_store.manifest import MANIFEST, Backup, check_backup
from backup_store.store import BackupStore
from common.errors import ToolkitError
from offsite.pull import pull
from offsite.push import push
from offsite.remote import LOCAL_ONLY_FIELDS, Remote, RemoteConfig
from offsite.upkeep import verify


def payload(backup: Backup) -> dict:
    """The backup's folder but its manifest (which the remote keeps without what only means something here)."""
    return {rel: found for rel, found in contents(backup.path).items() if rel != MANIFEST}


def remote_of(bucket: Bucket, key_file: Path | None = None) -> Remote:
    """The toolkit's view of the test bucket, as REMOTE_URL=s3://BUCKET/backups would give it."""
    credentials = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                   "AWS_DEFAULT_REGION": "us-east-1"}
    return Remote(RemoteConfig(bucket.name, "backups", bucket.server.endpoint, key_file, credentials=credentials))


@pytest.fixture
def backup(tmp_path: Path) -> Backup:
    source = make_source(tmp_path / "src")
    (source / "conf.d" / "same-as-cache.json").write_bytes((source / "conf.d" / "cache.json").read_bytes())
    return take(BackupStore(tmp_path / "here", "config"), source)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_push_then_pull_gives_the_backup_back_byte_for_byte(tmp_path: Path, remote: Bucket, backup: Backup,
                                                           encrypted: bool):
    key_file = None
    if encrypted:
        key_file = tmp_path / "remote.key"
        key_file.write_text(os.urandom(32).hex() + "\n")
        key_file.chmod(0o600)
    remote_copy = remote_of(remote, key_file)  # one client, as one run makes: each costs a model load
    sent = push(remote_copy, backup)
    blobs = {entry.sha256 for entry in backup.files}
    assert len(blobs) < len(backup.files)  # two files with one content: one object
    assert (sent.objects, sent.skipped) == (len(blobs) + 1, len(backup.files) - len(blobs))  # and the manifest
    assert len(remote.blobs()) == len(blobs)
    if encrypted:  # the server sees neither the content nor its hash
        assert not any(entry.sha256 in key for entry in backup.files for key in remote.objects())
    remote_copy.present_blobs(refresh=True)  # what the server lists, not what this push noted it sent
    again = push(remote_copy, backup)
    assert (again.objects, again.bytes, again.skipped) == (0, 0, len(backup.files))

    there = BackupStore(tmp_path / "there", "config")
    with there.lock("pull"):
        pulled = pull(remote_copy, there, backup.id)
    assert pulled.path == there.root / backup.id and check_backup(pulled) == []
    assert payload(pulled) == payload(backup)
    assert [(e.path, e.type, e.mode, e.size, e.sha256, e.target) for e in pulled.entries] == [
        (e.path, e.type, e.mode, e.size, e.sha256, e.target) for e in backup.entries]
    assert all(getattr(entry, name) is None for entry in pulled.entries for name in LOCAL_ONLY_FIELDS)
    assert (pulled.id, pulled.created_at, pulled.source, pulled.label) == (
        backup.id, backup.created_at, backup.source, backup.label)
    assert {os.stat(pulled.path / entry.path).st_mode & 0o777 for entry in pulled.files} == {0o400}
    assert there.leftovers() == []


def test_verify_names_an_object_missing_or_changed_on_the_remote(tmp_path: Path, remote: Bucket, backup: Backup):
    remote_copy = remote_of(remote)
    push(remote_copy, backup)
    by_path = {entry.path: remote_copy.blob_key(entry.sha256) for entry in backup.files}
    missing, changed = by_path["tree/app.yml"], by_path["tree/conf.d/deep/blob.bin"]
    # As anyone with access to the bucket could: one object deleted, one changed in place (same size).
    remote_copy.call("delete_object", Key=missing)
    damaged = bytearray(remote_copy.call("get_object", Key=changed)["Body"].read())
    damaged[100] ^= 1
    remote_copy.call("put_object", Key=changed, Body=bytes(damaged))

    report = verify(remote_copy, "config", deep=False)
    assert report.backups == 1 and report.problems == [f"{backup.id}: tree/app.yml: object {missing} is missing"]
    report = verify(remote_copy, "config", deep=True)
    assert sorted(report.problems) == sorted([
        f"{backup.id}: tree/app.yml: object {missing} is missing",
        f"{backup.id}: tree/conf.d/deep/blob.bin: object {changed} does not match its checksum (changed or damaged "
        "on the remote)"])
    assert remote_copy.damaged_blobs() == {changed}  # every host's next push sends it again first

    there = BackupStore(tmp_path / "there", "config")
    with there.lock("pull"), pytest.raises(ToolkitError, match="missing on the remote|does not match its checksum"):
        pull(remote_copy, there, backup.id)
    assert there.backups() == [] and there.leftovers() == []

