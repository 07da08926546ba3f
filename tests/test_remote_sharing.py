"""Several hosts and runs on one remote prefix: ids that never collide, and a push that never overwrites."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from helpers import script_argv
from remote_sites import ConfigSite, remote_ids
from s3_server import Bucket

from backup_store.store import BACKUP_ID, new_backup_id

OLD_STYLE_ID = "20261125T013000.123Z-config"  # what ids looked like before the host and random part


def rename_backup(store: Path, old: str, new: str) -> None:
    """Give a backup another id, as a host that made the same id as another one would have it."""
    os.rename(store / old, store / new)
    manifest = store / new / "manifest.json"
    data = json.loads(manifest.read_text())
    data["id"] = new
    manifest.write_text(json.dumps(data))


def test_ids_made_in_the_same_millisecond_differ_and_still_sort_by_time():
    moment = datetime(2026, 11, 25, 1, 30, 0, 123456, tzinfo=UTC)
    ids = {new_backup_id("db", "ariesone", moment) for _ in range(1000)}
    assert len(ids) == 1000  # a host and 32 random bits: two runs in one millisecond still differ
    host = socket.gethostname().split(".")[0]
    for backup_id in ids:
        assert BACKUP_ID.fullmatch(backup_id) and backup_id.startswith("20261125T013000.123Z-db-ariesone-")
        assert f"-{host[:32]}-" in backup_id or not re.fullmatch(r"[A-Za-z0-9-]+", host)
    later = new_backup_id("db", "ariesone", moment + timedelta(milliseconds=1))
    assert all(later > backup_id for backup_id in ids)
    # A name that would be a path of its own is one plain component inside the id.
    odd = new_backup_id("db", "../../etc/x y", moment)
    assert BACKUP_ID.fullmatch(odd) and "/" not in odd and " " not in odd
    # Ids made before the host and the random part are still ids everywhere (restore points name them).
    for old in (OLD_STYLE_ID, "20261125T013000.123Z-db-ariesone", "20261125T013000.123Z-db-ariesone-2"):
        assert BACKUP_ID.fullmatch(old)
    assert not BACKUP_ID.fullmatch("20261125T013000.123Z-" + "x" * 240)  # too long for a folder name


def test_two_sites_backing_up_and_pushing_at_once_each_restore_their_own(tmp_path: Path, remote: Bucket):
    sites = [ConfigSite(tmp_path / name, remote) for name in ("a", "b")]
    for name, site in zip(("a", "b"), sites, strict=True):
        (site.config / "app.yml").write_text(f"host: {name}\n")
    originals = [site.state() for site in sites]
    runs = [subprocess.Popen(script_argv(site.script, "--json", "backup", "--push"), env={**os.environ, **site.env},
                             cwd=site.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for site in sites]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    ids = [json.loads(stdout)["backup"]["id"] for stdout, _ in outputs]
    assert ids[0] != ids[1]
    assert sorted(remote_ids(sites[0].run)) == sorted(ids)
    for site, backup_id, original in zip(sites, ids, originals, strict=True):
        shutil.rmtree(site.store / backup_id)  # only on the remote now: the restore pulls it
        (site.config / "app.yml").write_text("broken\n")
        result = site.run("restore", backup_id, "--yes")
        assert result.returncode == 0, result.stderr
        assert site.state() == original


def test_a_push_never_overwrites_an_id_the_remote_holds_for_other_content(tmp_path: Path, remote: Bucket):
    host_a, host_b = ConfigSite(tmp_path / "a", remote), ConfigSite(tmp_path / "b", remote)
    (host_b.config / "app.yml").write_text("host: b\n")
    a_state = host_a.state()
    # Two hosts of an older version made the same id in the same millisecond.
    rename_backup(host_a.store, host_a.backup(), OLD_STYLE_ID)
    rename_backup(host_b.store, host_b.backup(), OLD_STYLE_ID)
    assert host_a.run("push", OLD_STYLE_ID).returncode == 0
    assert host_a.run("push", OLD_STYLE_ID).returncode == 0  # its own backup again: nothing to do
    before = remote.objects()

    result = host_b.run("push", OLD_STYLE_ID)
    assert result.returncode == 1 and "already on" in result.stderr and "other content" in result.stderr
    assert remote.objects() == before
    other = host_b.backup()  # one of B's own, pushed in the same run as the refused one
    result = host_b.run("--json", "push", "--all")
    assert result.returncode == 1 and OLD_STYLE_ID in result.stderr
    assert list(json.loads(result.stdout)["pushed"]) == [other]
    assert sorted(remote_ids(host_a.run)) == sorted([OLD_STYLE_ID, other])

    # A's backup, old id and all, is still A's on the remote.
    shutil.rmtree(host_a.store / OLD_STYLE_ID)
    (host_a.config / "app.yml").write_text("broken\n")
    result = host_a.run("restore", OLD_STYLE_ID, "--yes")
    assert result.returncode == 0, result.stderr
    assert host_a.state() == a_state
