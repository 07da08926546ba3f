"""Off-host copies against a real S3 server (rclone serve s3 on 127.0.0.1), with every script's real store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from helpers import database_state, run_script, script_argv, tree_snapshot
from remote_sites import CodeSite, ConfigSite, remote_ids
from s3_server import SECRET_KEY, Bucket, LocalS3

# -- round trips --------------------------------------------------------------------------------------------


def test_config_round_trip_and_restore_of_an_id_only_on_the_remote(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    original = site.state()
    backup_id = site.backup()
    result = site.run("--json", "push", backup_id)
    assert result.returncode == 0, result.stderr
    assert remote_ids(site.run) == [backup_id]
    shutil.rmtree(site.store / backup_id)
    (site.config / "app.yml").write_text("broken: [\n")
    (tmp_path / ".env").write_text("API_TOKEN=wrong\n")

    result = site.run("restore", backup_id, "--yes")  # not here any more: pulled from the remote first
    assert result.returncode == 0, result.stderr
    assert site.state() == original
    assert (site.store / backup_id / "manifest.json").is_file()


def test_code_round_trip_keeps_symlinks_and_empty_folders(tmp_path: Path, remote: Bucket):
    site = CodeSite(tmp_path, remote)
    original = tree_snapshot(site.deploy)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    shutil.rmtree(tmp_path / "code_backups" / backup_id)
    result = site.run("pull", backup_id)
    assert result.returncode == 0, result.stderr
    shutil.rmtree(site.deploy)
    site.deploy.mkdir()
    assert site.run("restore", backup_id, "--yes", "--no-backup").returncode == 0
    assert tree_snapshot(site.deploy) == original


def test_database_dump_round_trip(tmp_path: Path, remote: Bucket, pg_db):
    with pg_db.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY, note text);"
                    " INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i;")
    original = database_state(pg_db)
    env = {**pg_db.env, "BACKUP_DIR": str(tmp_path / "db_backups"), **remote.env}

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_script("database_rollback.py", *args, env=env, cwd=tmp_path)

    result = run("--json", "backup", "--push")
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["backup"]["id"]
    assert remote_ids(run) == [backup_id]
    shutil.rmtree(tmp_path / "db_backups" / backup_id)
    with pg_db.connect() as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM t WHERE id % 2 = 0; DROP TABLE IF EXISTS nothing;")
    result = run("restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert database_state(pg_db) == original


# -- what goes up ---------------------------------------------------------------------------------------------


def test_second_push_of_an_unchanged_code_backup_uploads_only_its_manifest(tmp_path: Path, remote: Bucket):
    site = CodeSite(tmp_path, remote)
    site.backup()
    assert site.run("push").returncode == 0
    before = remote.objects()
    site.backup()
    written = {path: path.stat().st_mtime_ns for path in remote.folder.rglob("*") if path.is_file()}
    result = site.run("--json", "push")
    assert result.returncode == 0, result.stderr
    assert {path: path.stat().st_mtime_ns for path in written} == written  # nothing was written again
    after = remote.objects()
    new = set(after) - set(before)
    assert len(new) == 1 and "/code/manifests/" in new.pop()  # the server got exactly one new object
    assert {key: after[key] for key in before} == before
    pushed = next(iter(json.loads(result.stdout)["pushed"].values()))
    assert pushed["objects"] == 1 and pushed["skipped"] == 200  # the 200 files, the manifest the only upload


def test_config_edit_pushes_only_the_changed_file(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote, REMOTE_AUTO_PUSH="1")
    site.backup()
    blobs = remote.blobs()
    (site.config / "app.yml").write_text("server:\n  port: 9090\n")
    site.backup()
    assert len(set(remote.blobs()) - set(blobs)) == 1
    assert len(remote_ids(site.run)) == 2


def test_server_killed_mid_push_leaves_nothing_listed_and_the_next_push_completes(tmp_path: Path):
    server = LocalS3(tmp_path / "s3")
    server.start()
    try:
        remote = Bucket(server)
        site = CodeSite(tmp_path / "site", remote, big=160)
        backup_id = site.backup()
        push = subprocess.Popen(script_argv("code_rollback.py", "push"), env={**os.environ, **site.env},
                                cwd=site.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(remote.blobs()) < 50:  # the small files are up; the large one is on its way
            assert push.poll() is None, push.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polling the server's folder, bounded by the deadline
        server.kill()
        _, stderr = push.communicate(timeout=120)
        assert push.returncode == 1 and "Traceback" not in stderr
        server.start()
        assert remote_ids(site.run) == []  # no manifest: nothing a restore could take
        partial = remote.blobs()

        result = site.run("--json", "push")
        assert result.returncode == 0, result.stderr
        assert remote_ids(site.run) == [backup_id]
        pushed = json.loads(result.stdout)["pushed"][backup_id]
        manifest = json.loads((site.root / "code_backups" / backup_id / "manifest.json").read_text())
        sizes = {e["sha256"]: e["size"] for e in manifest["entries"] if e["type"] == "file"}
        whole = [key for key, size in partial.items() if sizes.get(key.rsplit("/", 1)[1]) == size]
        assert whole and pushed["skipped"] == len(whole)  # what was whole on the server was not sent again
        assert pushed["objects"] == len(sizes) - len(whole) + 1
        assert site.run("verify", "--remote", "--deep").returncode == 0
    finally:
        server.stop()


# -- damage, retention, encryption, secrets ------------------------------------------------------------------


def test_an_object_changed_on_the_server_is_refused_on_pull_and_named_by_deep_verify(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    manifest = json.loads((site.store / backup_id / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if e["path"].endswith("cache.json"))
    blob = next(path for path in remote.folder.rglob(entry["sha256"]))
    blob.write_bytes(blob.read_bytes().replace(b"60", b"99"))  # same size, other content

    assert site.run("verify", "--remote").returncode == 0  # sizes hold; only --deep reads the bytes
    result = site.run("verify", "--remote", "--deep")
    assert result.returncode == 3 and "cache.json" in result.stdout
    shutil.rmtree(site.store / backup_id)
    result = site.run("pull", backup_id)
    assert result.returncode == 1 and "does not match its checksum" in result.stderr
    assert not [p for p in site.store.iterdir() if p.name.startswith((backup_id, ".staging"))]


def test_remote_cleanup_keeps_every_blob_a_kept_manifest_names(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote, REMOTE_AUTO_PUSH="1", REMOTE_CLEANUP_GRACE_SECONDS="0")
    old = site.backup()
    only_old = remote.blobs()
    (site.config / "app.yml").write_text("server:\n  port: 9090\n")
    new = site.backup()
    # With the default grace, a blob no manifest names is only noted: a push may be about to name it again.
    result = site.run("--json", "cleanup", "0", "--keep", "1", "--remote", REMOTE_CLEANUP_GRACE_SECONDS="3600")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == [old] and json.loads(result.stdout)["objects_removed"] == 0
    assert set(only_old) <= set(remote.blobs())
    # A damaged record of what earlier cleanups noted is started afresh, never a failed cleanup.
    remote.client().put_object(Bucket=remote.name, Key="backups/cleanup-candidates", Body=b"[not json")
    result = site.run("--json", "cleanup", "0", "--keep", "1", "--remote")
    assert result.returncode == 0, result.stderr
    assert remote_ids(site.run) == [new]
    removed = set(only_old) - set(remote.blobs())
    assert len(removed) == 1  # the old app.yml: no kept manifest names it
    assert site.run("verify", "--remote", "--deep").returncode == 0  # every blob of `new` is still there
    shutil.rmtree(site.store / new)
    assert site.run("pull", new).returncode == 0


def test_with_encryption_the_server_holds_no_plaintext(tmp_path: Path, remote: Bucket):
    key = tmp_path / "remote.key"
    key.write_text(os.urandom(32).hex() + "\n")
    os.chmod(key, 0o600)
    site = ConfigSite(tmp_path, remote, REMOTE_ENCRYPTION_KEY_FILE=str(key))
    original = site.state()
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    stored = b"".join(path.read_bytes() for path in remote.folder.rglob("*") if path.is_file())
    lines = [line for path in site.config.rglob("*") if path.is_file() for line in path.read_text().splitlines()]
    lines += (tmp_path / ".env").read_text().splitlines()
    for line in [*lines, "albatross", "cache.internal", "plaintext-token-value-123", backup_id.split("-")[0]]:
        assert line.encode() not in stored, line
    manifest = json.loads((site.store / backup_id / "manifest.json").read_text())
    assert not any(e.get("sha256") and e["sha256"] in str(remote.objects()) for e in manifest["entries"])

    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    os.chmod(other, 0o600)
    result = site.run("list", "--remote", REMOTE_ENCRYPTION_KEY_FILE=str(other))
    assert result.returncode == 0 and "encrypted with another key" in result.stderr and backup_id in result.stderr
    shutil.rmtree(site.store / backup_id)
    (site.config / "app.yml").write_text("changed\n")
    assert site.run("restore", backup_id, "--yes").returncode == 0
    assert site.state() == original


def test_credentials_never_appear_in_output_logs_or_metrics(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote, METRICS_FILE=str(tmp_path / "metrics.prom"))
    backup_id = site.backup()
    outputs = [site.run("-v", "--json", "push"), site.run("-v", "list", "--remote"),
               site.run("-v", "verify", "--remote", "--deep"), site.run("-v", "--json", "cleanup", "0", "--remote")]
    shutil.rmtree(site.store / backup_id)
    outputs.append(site.run("-v", "pull", backup_id))
    outputs.append(site.run("-v", "push", AWS_SECRET_ACCESS_KEY=SECRET_KEY + "-wrong"))  # refused: still unsaid
    assert [o.returncode for o in outputs] == [0, 0, 0, 0, 0, 1]
    assert "credentials" in outputs[-1].stderr
    seen = "".join(o.stdout + o.stderr for o in outputs)
    seen += (site.store / "audit.log").read_text() + (tmp_path / "metrics.prom").read_text()
    assert SECRET_KEY not in seen and "AWS_SECRET_ACCESS_KEY=" not in seen


def test_a_long_push_shows_progress_on_a_terminal_and_nothing_on_stdout(tmp_path: Path, remote: Bucket):
    import pty

    site = CodeSite(tmp_path, remote, big=300)
    site.backup()
    leader, follower = pty.openpty()
    push = subprocess.Popen(script_argv("code_rollback.py", "push"), env={**os.environ, **site.env}, cwd=site.root,
                            stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = push.communicate(timeout=120)
    os.close(leader)
    assert push.returncode == 0
    assert b"pushing" in seen and b"MiB/s" in seen and b"left" in seen
    assert stdout.startswith("pushed ") and "\r" not in stdout and "MiB/s" not in stdout


def test_a_hostile_manifest_cannot_write_outside_the_store(tmp_path: Path, remote: Bucket):
    import gzip


    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    manifest = json.loads((site.store / backup_id / "manifest.json").read_text())
    blob = next(e for e in manifest["entries"] if e["type"] == "file")
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest["entries"] = [{"path": "tree", "type": "dir", "mode": 0o700},
                           {"path": "tree/link", "type": "symlink", "target": str(outside)},
                           {**blob, "path": "tree/link/evil"}]
    remote.client().put_object(Bucket=remote.name, Key=f"backups/config/manifests/{backup_id}",
                  Body=gzip.compress(json.dumps(manifest).encode()))
    shutil.rmtree(site.store / backup_id)

    result = site.run("pull", backup_id)
    assert result.returncode == 1 and "refused" in result.stderr and "tree/link/evil" in result.stderr
    assert list(outside.iterdir()) == [] and not (site.store / backup_id).exists()

    manifest["entries"] = [{"path": "config", "type": "dir", "mode": 0o700}, {**blob, "sha256": None}]
    remote.client().put_object(Bucket=remote.name, Key=f"backups/config/manifests/{backup_id}",
                               Body=gzip.compress(json.dumps(manifest).encode()))
    result = site.run("pull", backup_id)
    assert result.returncode == 1 and "has no sha256" in result.stderr
    assert site.run("verify", "--remote").returncode == 3  # named, not a crash


def test_dry_run_never_downloads_and_a_missing_object_is_damage_not_bad_input(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    shutil.rmtree(site.store / backup_id)
    result = site.run("--dry-run", "restore", backup_id)
    assert result.returncode == 2 and "a dry run does not download it" in result.stderr
    assert not (site.store / backup_id).exists()

    remote.client().delete_object(Bucket=remote.name, Key=next(iter(remote.blobs())))
    result = site.run("pull", backup_id)
    assert result.returncode == 1 and "is missing on the remote" in result.stderr
    assert not (site.store / backup_id).exists()


def test_a_push_that_fails_after_a_backup_keeps_the_backup_and_says_so(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote, S3_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    result = site.run("--json", "backup", "--push")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    backup_id = report["backup"]["id"]
    assert "the push failed" in report["push_error"] and (site.store / backup_id / "manifest.json").is_file()


def test_an_encrypted_large_file_goes_up_and_comes_back_in_parallel_parts(tmp_path: Path, remote: Bucket):
    key = tmp_path / "remote.key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    site = CodeSite(tmp_path, remote, big=20)  # 20 MiB: above the 8 MiB threshold for parts
    site.env["REMOTE_ENCRYPTION_KEY_FILE"] = str(key)
    original = tree_snapshot(site.deploy)
    backup_id = site.backup()
    assert site.run("push").returncode == 0
    assert max(remote.blobs().values()) > 20 * 1024 * 1024  # the sealed large file, frames and all
    assert site.run("verify", "--remote", "--deep").returncode == 0
    shutil.rmtree(tmp_path / "code_backups" / backup_id)
    shutil.rmtree(site.deploy)
    site.deploy.mkdir()
    result = site.run("restore", backup_id, "--yes", "--no-backup")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(site.deploy) == original


def test_bad_settings_and_a_second_run_at_once_change_nothing(tmp_path: Path, remote: Bucket):
    from backup_store.store import BackupStore

    site = ConfigSite(tmp_path, remote)
    backup_id = site.backup()
    result = site.run("push", REMOTE_URL="http://not-s3/")
    assert result.returncode == 2 and "REMOTE_URL must look like s3://bucket/prefix" in result.stderr
    result = site.run("push", REMOTE_URL="")
    assert result.returncode == 2 and "REMOTE_URL is not set" in result.stderr
    assert site.run("verify", "--deep").returncode == 2  # --deep only means something with --remote
    (site.config / "app.yml").write_text("server:\n  port: 9090\n")
    second = site.backup()
    result = site.run("--json", "push", "--all")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["pushed"]) == {backup_id, second}
    assert sorted(remote_ids(site.run)) == sorted([backup_id, second])
    shutil.rmtree(site.store / backup_id)
    with BackupStore(site.store, "config").lock("a restore in progress"):
        assert site.run("pull", backup_id).returncode == 75
    assert not (site.store / backup_id).exists()
    assert site.run("pull", backup_id).returncode == 0
