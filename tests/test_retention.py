"""Retention and `latest` never trade a backup taken with `backup` for the safety backups taken since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import git
from test_code_rollback import CodeWorkspace
from test_config_rollback import APP_YML, ENV, Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path)
    ws.config.mkdir()
    (ws.config / "app.yml").write_text(APP_YML)
    ws.env_file.write_text(ENV)
    return ws


def test_config_updates_never_push_the_labelled_backup_out(ws: Workspace):
    assert ws.run("backup", "--label", "before release").returncode == 0
    wanted = ws.live()
    for port in (8081, 8082, 8083):
        result = ws.run("update", "app.yml", json.dumps({"server": {"port": port}}))
        assert result.returncode == 0, result.stderr

    result = ws.run("--json", "cleanup", "0", "--keep", "2")
    assert result.returncode == 0, result.stderr
    listing = json.loads(ws.run("--json", "list").stdout)["backups"]
    assert [b["label"] for b in listing if not b["safety"]] == ["before release"]

    result = ws.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backup"]["label"] == "before release"
    assert ws.live() == wanted


def test_latest_is_never_a_safety_backup(ws: Workspace):
    assert ws.run("--yes", "update", "app.yml", '{"server": {"port": 9000}}').returncode == 0
    assert [b["safety"] for b in json.loads(ws.run("--json", "list").stdout)["backups"]] == [True]
    changed = ws.live()

    result = ws.run("restore", "latest", "--yes")
    assert result.returncode == 2
    assert "only safety backups" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert ws.live() == changed


def test_cleanup_keeps_the_newest_safety_backup_when_it_is_the_only_one(ws: Workspace):
    ws.env_file.write_text(ENV + "SAFETY_KEEP_DAYS=0\n")  # else both stay their 7 days
    assert ws.run("update", "app.yml", '{"server": {"port": 9000}}').returncode == 0
    assert ws.run("update", "app.yml", '{"server": {"port": 9001}}').returncode == 0
    ids = ws.backup_ids()
    assert ws.run("cleanup", "0", "--keep", "1").returncode == 0
    assert ws.backup_ids() == ids[:1]


def test_code_restores_never_push_the_labelled_backup_out(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    assert cw.run("backup", "--label", "before release").returncode == 0
    wanted = cw.tree()
    for version in (2, 3, 4):
        (cw.live / "app.py").write_text(f"print('v{version}')\n")
        result = cw.run("restore", "latest", "--yes")  # each takes a safety backup of what it replaces
        assert result.returncode == 0, result.stderr

    result = cw.run("--json", "cleanup", "0", "--keep", "2")
    assert result.returncode == 0, result.stderr
    listing = json.loads(cw.run("--json", "list").stdout)["backups"]
    assert [b["label"] for b in listing if not b["safety"]] == ["before release"]
    (cw.live / "app.py").write_text("print('broken')\n")
    result = cw.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert cw.tree() == wanted


def test_cleanup_keeps_the_undo_a_restore_just_printed(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("broken: [\n")
    restored = json.loads(ws.run("--json", "restore", "latest", "--yes").stdout)
    result = ws.run("--json", "cleanup", "0", "--keep", "1")
    assert result.returncode == 0, result.stderr
    assert restored["safety_backup"] in ws.backup_ids()  # taken since the newest regular backup: it stays


def test_code_cleanup_keeps_what_the_live_tree_was_rolled_back_to(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    (cw.repo / "app.py").write_text("print('v2')\n")
    git(cw.repo, "commit", "-qam", "v2")
    git(cw.repo, "tag", "v2")
    assert cw.run("rollback", "v2", "--yes").returncode == 0
    assert cw.run("backup", "--label", "nightly").returncode == 0
    assert cw.run("rollback", "v1", "--yes").returncode == 0
    assert cw.run("verify").returncode == 0
    result = cw.run("--json", "cleanup", "0", "--keep", "1")
    assert result.returncode == 0, result.stderr
    verify = cw.run("verify")  # against what v1 was rolled back to, not the nightly backup of v2
    assert verify.returncode == 0, verify.stdout
