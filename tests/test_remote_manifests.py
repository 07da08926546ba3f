"""Remote manifests that cannot be read: damaged, or sealed with another key or none. Each is named, none
hides the others, and no cleanup removes an object one of them might name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from remote_sites import CodeSite, ConfigSite, remote_ids
from s3_server import Bucket

from offsite import fetch_pool
from offsite.remote import Remote, RemoteConfig


def make_key(path: Path) -> Path:
    path.write_text(os.urandom(32).hex())
    os.chmod(path, 0o600)
    return path


def test_a_damaged_manifest_is_named_hides_no_other_backup_and_keeps_every_object(tmp_path: Path, remote: Bucket):
    code = CodeSite(tmp_path / "code", remote)
    config = ConfigSite(tmp_path / "config", remote, REMOTE_CLEANUP_GRACE_SECONDS="0")
    damaged, sound = code.backup(), code.backup()
    assert code.run("push", "--all").returncode == 0
    key = f"backups/code/manifests/{damaged}"
    client = remote.client()
    body = client.get_object(Bucket=remote.name, Key=key)["Body"].read()
    client.put_object(Bucket=remote.name, Key=key, Body=body[:len(body) // 2])
    old = config.backup()
    (config.config / "app.yml").write_text("server:\n  port: 9090\n")
    config.backup()
    assert config.run("push", "--all").returncode == 0

    result = code.run("--json", "list", "--remote")
    assert result.returncode == 0, result.stderr
    assert [b["id"] for b in json.loads(result.stdout)["backups"]] == [sound]
    assert f"code backup {damaged} is unreadable" in result.stderr
    result = code.run("verify", "--remote")
    assert result.returncode == 3 and damaged in result.stdout

    blobs = remote.blobs()
    result = config.run("--json", "cleanup", "0", "--keep", "1", "--remote")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed"] == [old] and report["objects_removed"] == 0 and damaged in result.stderr
    assert remote.blobs() == blobs  # the old app.yml too: the damaged manifest might name it

    result = code.run("push", damaged)
    assert result.returncode == 1 and f"push --repair {damaged}" in result.stderr
    result = code.run("--json", "verify", "--remote", "--repair")
    assert result.returncode == 0, result.stdout
    store = code.root / "code_backups"
    assert json.loads(result.stdout)["repaired"] == [f"the manifest of {damaged} sent again from {store}"]
    assert sorted(remote_ids(code.run)) == sorted([damaged, sound])
    result = config.run("--json", "cleanup", "0", "--keep", "1", "--remote")
    assert json.loads(result.stdout)["objects_removed"] == 1  # every manifest reads again: the old app.yml goes


def test_backups_pushed_with_two_keys_are_each_named_with_the_other_key(tmp_path: Path, remote: Bucket):
    key_a, key_b = make_key(tmp_path / "a.key"), make_key(tmp_path / "b.key")
    site = ConfigSite(tmp_path / "site", remote, REMOTE_CLEANUP_GRACE_SECONDS="0")
    with_a = site.backup()
    assert site.run("push", REMOTE_ENCRYPTION_KEY_FILE=str(key_a)).returncode == 0
    (site.config / "app.yml").write_text("server:\n  port: 9090\n")
    with_b = site.backup()
    assert site.run("push", REMOTE_ENCRYPTION_KEY_FILE=str(key_b)).returncode == 0

    for key, readable, other in ((key_a, with_a, with_b), (key_b, with_b, with_a)):
        result = site.run("--json", "list", "--remote", REMOTE_ENCRYPTION_KEY_FILE=str(key))
        assert result.returncode == 0, result.stderr
        assert [b["id"] for b in json.loads(result.stdout)["backups"]] == [readable]
        assert other in result.stderr and "encrypted with another key" in result.stderr
        result = site.run("verify", "--remote", REMOTE_ENCRYPTION_KEY_FILE=str(key))
        assert result.returncode == 3 and other in result.stdout and "encrypted with another key" in result.stdout
        blobs = remote.blobs()
        result = site.run("--json", "cleanup", "0", "--keep", "1", "--remote", REMOTE_ENCRYPTION_KEY_FILE=str(key))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["objects_removed"] == 0 and remote.blobs() == blobs
        result = site.run("push", other, REMOTE_ENCRYPTION_KEY_FILE=str(key), REMOTE_URL=remote.env["REMOTE_URL"])
        assert result.returncode == 1 and "encrypted with another key" in result.stderr  # never replaced

    result = site.run("list", "--remote")  # no key at all
    assert result.returncode == 0 and "Not a gzipped file" not in result.stderr
    assert f"{with_a} is encrypted" in result.stderr and "REMOTE_ENCRYPTION_KEY_FILE is not set" in result.stderr
    shutil.rmtree(site.store / with_b)
    result = site.run("pull", with_b, REMOTE_ENCRYPTION_KEY_FILE=str(key_a))
    assert result.returncode == 1 and with_b in result.stderr and "encrypted with another key" in result.stderr
    result = site.run("pull", with_b, REMOTE_ENCRYPTION_KEY_FILE=str(key_b))
    assert result.returncode == 0, result.stderr


def test_the_local_copy_of_remote_manifests_never_hides_a_change_on_the_remote(tmp_path: Path, remote: Bucket):
    config = ConfigSite(tmp_path, remote)
    changed, other = config.backup(), config.backup()
    assert config.run("push", "--all").returncode == 0
    assert sorted(remote_ids(config.run)) == sorted([changed, other])
    assert (config.store / ".remote-manifests.json").is_file()  # read once, kept by key and ETag
    client = remote.client()
    key = f"backups/config/manifests/{changed}"
    body = client.get_object(Bucket=remote.name, Key=key)["Body"].read()
    client.put_object(Bucket=remote.name, Key=key, Body=body[:len(body) // 2])

    result = config.run("--json", "list", "--remote")
    assert result.returncode == 0, result.stderr
    assert [b["id"] for b in json.loads(result.stdout)["backups"]] == [other]
    assert f"config backup {changed} is unreadable" in result.stderr


def remote_config(remote: Bucket) -> RemoteConfig:
    env = remote.env
    return RemoteConfig(remote.name, "backups", env["S3_ENDPOINT_URL"], None, credentials={
        name: env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})


def test_worker_processes_read_every_object_byte_for_byte_and_leave_out_what_is_missing(remote: Bucket,
                                                                                      monkeypatch):
    client = remote.client()
    written = {f"many/{n:03d}": os.urandom(n * 37) for n in range(40)}
    for key, body in written.items():
        client.put_object(Bucket=remote.name, Key=key, Body=body)
    monkeypatch.setattr(fetch_pool, "FROM_OBJECTS", 10)

    env = remote.env
    signing = fetch_pool.Signing(env["S3_ENDPOINT_URL"], env["AWS_DEFAULT_REGION"], env["AWS_ACCESS_KEY_ID"],
                                 env["AWS_SECRET_ACCESS_KEY"], None, 30.0)

    read = fetch_pool.read_objects(signing, remote.name, [*written, "many/gone"])

    assert {key: body for key, (_, body) in read.items()} == written
    assert all(etag.strip('"') == hashlib.md5(written[key]).hexdigest() for key, (etag, _) in read.items())
    # Bytes that are not what the server's MD5 ETag says are never handed on; a multipart ETag checks nothing.
    etag, body = read["many/001"]
    assert fetch_pool._matches(etag, body) and not fetch_pool._matches(etag, body[:-1] + b"?")
    assert fetch_pool._matches('"0123456789abcdef0123456789abcdef-2"', body)


def test_a_scan_shared_out_among_workers_finds_what_one_process_finds(tmp_path: Path, remote: Bucket, monkeypatch):
    config = ConfigSite(tmp_path / "config", remote)
    for port in range(12):
        (config.config / "app.yml").write_text(f"server:\n  port: {9000 + port}\n")
        config.backup()
    assert config.run("push", "--all").returncode == 0
    alone, unreadable = Remote(remote_config(remote)).scan("config")
    assert len(alone) == 12 and unreadable == []

    monkeypatch.setattr(fetch_pool, "FROM_OBJECTS", 5)
    shared, unreadable = Remote(remote_config(remote)).scan("config")

    assert unreadable == []
    assert [(c.backup.id, c.manifest_bytes, c.blobs) for c in shared] == \
        [(c.backup.id, c.manifest_bytes, c.blobs) for c in alone]
