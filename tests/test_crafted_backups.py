"""A backup folder crafted to write or read outside its tree is refused by every command that reads a manifest.

Each crafted manifest's checksums match its payload, so only the path rule can stop it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import run_script
from test_code_rollback import CodeWorkspace
from test_config_rollback import APP_YML, Workspace
from test_database_rollback import DbWorkspace

EVIL = b"written by a crafted backup\n"


def craft(backup: Path, where: Path, change) -> Path:
    """A copy of the backup folder at `where` whose manifest entries `change(entries)` rewrote."""
    shutil.copytree(backup, where, symlinks=True)
    manifest_path = where / "manifest.json"
    os.chmod(manifest_path, 0o600)
    manifest = json.loads(manifest_path.read_text())
    manifest["entries"] = change(manifest["entries"])
    manifest_path.write_text(json.dumps(manifest))
    return where


def evil_file(path: str) -> dict:
    return {"path": path, "type": "file", "mode": 0o644, "size": len(EVIL), "sha256": hashlib.sha256(EVIL).hexdigest()}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "a" / "b")  # CONFIG_DIR/../../../X is tmp_path/X
    ws.config.mkdir(parents=True)
    (ws.config / "app.yml").write_text(APP_YML)
    ws.env_file.write_text("A=1\n")
    assert ws.run("backup").returncode == 0
    return ws


def _only_backup(store: Path) -> Path:
    (folder,) = [p for p in store.iterdir() if (p / "manifest.json").is_file()]
    return folder


def test_config_restore_refuses_dot_dot_in_a_manifest(ws: Workspace, tmp_path: Path):
    crafted = craft(_only_backup(ws.store), tmp_path / "crafted" / "deep" / "b1",
                    lambda entries: [*entries, evil_file("config/../../../X")])
    (tmp_path / "crafted" / "X").write_bytes(EVIL)  # where the payload path leads from the crafted folder
    before = ws.live()

    for args in (["restore", str(crafted), "--yes"], ["restore", str(crafted), "--dry-run"]):
        result = ws.run(*args)
        assert result.returncode == 1 and "refused" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "X").exists() and ws.live() == before
    assert ws.backup_ids() and len(ws.backup_ids()) == 1  # not even a safety backup was taken


def test_config_restore_refuses_a_path_under_a_symlink_of_the_backup(ws: Workspace, tmp_path: Path):
    # A relative link leads somewhere else from the backup than from CONFIG_DIR: the payload is read
    # through it from tmp_path/outside, and a restore that followed it would write into tmp_path/a/outside.
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil").write_bytes(EVIL)
    target = tmp_path / "a" / "outside"
    target.mkdir()

    def change(entries):
        return [*entries, {"path": "config/link", "type": "symlink", "target": "../../outside"},
                evil_file("config/link/evil")]

    crafted = craft(_only_backup(ws.store), tmp_path / "crafted", change)
    os.symlink("../../outside", crafted / "config" / "link")
    before = ws.live()

    result = ws.run("restore", str(crafted), "--yes")
    assert result.returncode == 1 and "config/link/evil" in result.stderr and "refused" in result.stderr
    assert list(target.iterdir()) == [] and ws.live() == before


def test_config_restore_refuses_a_tree_that_is_a_symlink(ws: Workspace, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()

    def change(entries):
        kept = [e for e in entries if not e["path"].startswith("config")]
        return [*kept, {"path": "config", "type": "symlink", "target": str(outside)}]

    crafted = craft(_only_backup(ws.store), tmp_path / "crafted", change)
    shutil.rmtree(crafted / "config")
    os.symlink(outside, crafted / "config")
    before = ws.live()

    result = ws.run("restore", str(crafted), "--yes")
    assert result.returncode == 1 and "not a folder" in result.stderr
    assert ws.live() == before and ws.config.is_dir() and not ws.config.is_symlink()


def test_code_restore_refuses_a_path_under_a_symlink_of_the_backup(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    assert cw.run("backup").returncode == 0
    # Read through the link from tmp_path/crafted/outside; written through it, it would land in tmp_path/outside.
    (tmp_path / "crafted" / "outside").mkdir(parents=True)
    (tmp_path / "crafted" / "outside" / "evil.py").write_bytes(EVIL)
    target = tmp_path / "outside"
    target.mkdir()

    def change(entries):
        return [*entries, {"path": "tree/pkg/link", "type": "symlink", "target": "../../outside"},
                evil_file("tree/pkg/link/evil.py")]

    crafted = craft(_only_backup(cw.store), tmp_path / "crafted" / "b1", change)
    (crafted / "tree" / "pkg").mkdir(parents=True, exist_ok=True)  # a code backup's folder holds only its manifest
    os.symlink("../../outside", crafted / "tree" / "pkg" / "link")
    before = cw.tree()
    for args in (["restore", str(crafted), "--yes"], ["restore", str(crafted), "--dry-run"]):
        result = cw.run(*args)
        assert result.returncode == 1 and "refused" in result.stderr, result.stderr
    assert list(target.iterdir()) == [] and cw.tree() == before


def test_database_restore_refuses_a_dump_that_is_a_symlink(pg_db, tmp_path: Path):
    dbw = DbWorkspace(pg_db, tmp_path)
    dbw.sql("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
    assert dbw.run("backup").returncode == 0
    other = tmp_path / "other.dump"
    shutil.copy(_only_backup(dbw.store) / "db.dump", other)
    dbw.sql("INSERT INTO t VALUES (2)")

    def change(entries):
        return [{"path": "db.dump", "type": "symlink", "target": str(other)} if e["path"] == "db.dump" else e
                for e in entries]

    crafted = craft(_only_backup(dbw.store), tmp_path / "crafted", change)
    os.unlink(crafted / "db.dump")
    os.symlink(other, crafted / "db.dump")

    result = dbw.run("restore", str(crafted), "--yes")
    assert result.returncode == 1, result.stderr
    assert dbw.sql("SELECT n FROM t ORDER BY n") == [(1,), (2,)]


def test_a_restore_point_naming_a_path_instead_of_a_backup_id_is_refused(ws: Workspace, tmp_path: Path):
    env = {**ws.env, "POINTS_DIR": str(tmp_path / "points")}
    result = run_script("rollback.py", "--json", "backup", env=env, cwd=ws.root)
    assert result.returncode == 0, result.stderr
    point = json.loads(result.stdout)["point"]
    part = point["parts"]["config"]
    # A whole, consistent backup, but outside the config store, reached from it through `..`.
    shutil.copytree(ws.store / part, tmp_path / "elsewhere" / part)
    point_manifest = tmp_path / "points" / point["id"] / "manifest.json"
    os.chmod(point_manifest, 0o600)
    data = json.loads(point_manifest.read_text())
    data["parts"]["config"] = f"../../../elsewhere/{part}"
    point_manifest.write_text(json.dumps(data))
    before = ws.live()

    result = run_script("rollback.py", "restore", point["id"], "--yes", env=env, cwd=ws.root)
    assert result.returncode == 1 and "not a backup id" in result.stderr, result.stderr
    assert ws.live() == before


def test_latest_never_falls_back_past_a_newer_backup_it_cannot_read(ws: Workspace):
    (ws.config / "app.yml").write_text("port: 2\n")
    assert ws.run("backup", "--label", "before release").returncode == 0
    newer = max(p for p in ws.store.iterdir() if (p / "manifest.json").is_file())
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["entries"].append({"path": "config/pipe", "type": "fifo"})  # what a later version might write
    os.chmod(newer / "manifest.json", 0o600)
    (newer / "manifest.json").write_text(json.dumps(manifest))
    (ws.config / "app.yml").write_text("port: 3\n")
    before = ws.live()

    result = ws.run("restore", "latest", "--yes")
    assert result.returncode == 1 and f"backup {newer.name} cannot be read" in result.stderr
    assert ws.live() == before
    listing = ws.run("--json", "list")
    assert [u["id"] for u in json.loads(listing.stdout)["unreadable"]] == [newer.name]
    assert f"cannot read backup {newer.name}" in ws.run("list").stdout


@pytest.mark.parametrize("field, value", [("mode", "rwx"), ("mode", 0o70000), ("uid", -1), ("uid", "root")])
def test_a_manifest_field_of_the_wrong_kind_is_refused_before_anything_changes(ws: Workspace, tmp_path: Path,
                                                                               field: str, value):
    def change(entries):
        return [{**e, field: value} if e["path"] == "config/app.yml" else e for e in entries]

    crafted = craft(_only_backup(ws.store), tmp_path / "crafted", change)
    (ws.config / "app.yml").write_text("port: 9\n")
    before = ws.live()
    result = ws.run("restore", str(crafted), "--yes")
    assert result.returncode == 1 and "refused" in result.stderr and "unexpected" not in result.stderr
    assert ws.live() == before


def test_a_manifest_that_is_not_a_manifest_is_one_line(ws: Workspace, tmp_path: Path):
    crafted = craft(_only_backup(ws.store), tmp_path / "crafted", lambda entries: ["x"])
    result = ws.run("restore", str(crafted), "--yes")
    assert result.returncode == 1 and "not a usable backup" in result.stderr and "unexpected" not in result.stderr
