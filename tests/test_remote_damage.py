"""Damage on the remote: found, never relied on, and sent again from a local store that has the content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from remote_sites import ConfigSite
from s3_server import Bucket


def blob_key(site: ConfigSite, backup_id: str, suffix: str) -> str:
    """The object key of the payload file of `backup_id` whose path ends with `suffix` (no encryption)."""
    manifest = json.loads((site.store / backup_id / "manifest.json").read_text())
    sha256 = next(e["sha256"] for e in manifest["entries"] if e["path"].endswith(suffix))
    return f"backups/blobs/{sha256[:2]}/{sha256}"


def change(remote: Bucket, key: str, alter) -> None:
    """Rewrite an object through the S3 API, as anyone with access to the bucket could."""
    client = remote.client()
    body = client.get_object(Bucket=remote.name, Key=key)["Body"].read()
    client.put_object(Bucket=remote.name, Key=key, Body=alter(body))


def same_size_damage(body: bytes) -> bytes:
    return bytes([body[0] ^ 1]) + body[1:]


def pushed(result) -> dict:
    assert result.returncode == 0, result.stderr
    return next(iter(json.loads(result.stdout)["pushed"].values()))


def test_push_sends_again_what_was_deleted_or_cut_short_on_the_server(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    remote.client().delete_object(Bucket=remote.name, Key=blob_key(site, backup_id, "app.yml"))
    change(remote, blob_key(site, backup_id, "cache.json"), lambda body: body[:5])
    assert site.run("verify", "--remote").returncode == 3

    sent = pushed(site.run("--json", "push", "--all"))
    assert sent["objects"] == 2  # the two files; the manifest was there already
    assert site.run("verify", "--remote", "--deep").returncode == 0
    assert pushed(site.run("--json", "push", "--all"))["objects"] == 0  # sound now: nothing moves


def test_a_blob_found_damaged_is_sent_again_before_a_backup_relies_on_it(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path / "a", remote, REMOTE_AUTO_PUSH="1")
    other_host = ConfigSite(tmp_path / "b", remote)
    first = site.backup()
    change(remote, blob_key(site, first, "cache.json"), same_size_damage)
    result = other_host.run("pull", first)  # another host finds the damage: the blob is marked on the remote
    assert result.returncode == 1 and "does not match its checksum" in result.stderr

    second = site.backup()  # the same cache.json: it would have reused the damaged blob
    result = site.run("verify", "--remote", "--deep")
    assert result.returncode == 0, result.stdout
    for backup_id in (first, second):
        result = other_host.run("pull", backup_id)
        assert result.returncode == 0, result.stderr
        assert (other_host.store / backup_id / "config" / "services" / "cache.json").read_bytes() == \
            (site.config / "services" / "cache.json").read_bytes()


def test_deep_verify_marks_damage_and_the_next_push_sends_it_again(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    change(remote, blob_key(site, backup_id, "cache.json"), same_size_damage)
    assert pushed(site.run("--json", "push"))["objects"] == 0  # sizes hold: nothing says it is damaged yet
    result = site.run("verify", "--remote", "--deep")
    assert result.returncode == 3 and "cache.json" in result.stdout
    assert pushed(site.run("--json", "push"))["objects"] == 1  # known damaged now: sent again
    assert site.run("verify", "--remote", "--deep").returncode == 0


def test_push_repair_reads_back_what_it_relies_on(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    change(remote, blob_key(site, backup_id, "app.yml"), same_size_damage)
    assert pushed(site.run("--json", "push", "--repair"))["objects"] == 1
    assert site.run("verify", "--remote", "--deep").returncode == 0
    assert site.run("push", "--repair", REMOTE_URL="").returncode == 2


def test_verify_repair_sends_again_from_the_local_store_and_names_what_it_cannot(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    change(remote, blob_key(site, backup_id, "cache.json"), same_size_damage)
    remote.client().delete_object(Bucket=remote.name, Key=blob_key(site, backup_id, "app.yml"))
    assert site.run("verify", "--repair").returncode == 2  # --repair goes with --remote

    result = site.run("--json", "verify", "--remote", "--deep", "--repair")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["problems"] == [] and len(report["repaired"]) == 2
    assert site.run("verify", "--remote", "--deep").returncode == 0

    key = blob_key(site, backup_id, "app.yml")
    shutil.rmtree(site.store / backup_id)  # no local copy any more: nothing to repair from
    remote.client().delete_object(Bucket=remote.name, Key=key)
    result = site.run("verify", "--remote", "--deep", "--repair")
    assert result.returncode == 3 and "app.yml" in result.stdout and "not repaired" in result.stdout
