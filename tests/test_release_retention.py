"""code_rollback.py cleanup in a symlink layout prunes old release folders, never the live one nor one a kept
backup was taken of."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from code_workspace import CodeWorkspace
from helpers import tree_snapshot


def deploy(cw: CodeWorkspace, name: str, when: int) -> Path:
    """A release as a deploy tool makes one: a copy with its own change, switched in by renaming a symlink."""
    release = cw.root / "releases" / name
    shutil.copytree(cw.root / "releases" / "v1", release, symlinks=True)
    (release / "app.py").write_text(f"print('{name}')\n")
    os.symlink(f"releases/{name}", cw.root / "current.new")
    os.replace(cw.root / "current.new", cw.live)
    os.utime(release, (when, when))
    return release


def backup(cw: CodeWorkspace) -> str:
    result = cw.run("--json", "backup")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["backup"]["id"]


def test_cleanup_prunes_releases_beyond_keep_releases_but_not_the_live_one_nor_one_a_kept_backup_was_taken_of(
        tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    cw.env["KEEP_RELEASES"] = "1"
    releases = tmp_path / "releases"
    os.utime(releases / "v1", (1_000_000_000, 1_000_000_000))
    pinned = backup(cw)  # of v1
    assert cw.run("pin", pinned, "--reason", "the last release before the migration").returncode == 0
    deploy(cw, "r2", 1_000_000_100)
    of_r2 = backup(cw)
    deploy(cw, "r3", 1_000_000_200)
    newest = backup(cw)
    deploy(cw, "r4", 1_000_000_300)
    before = sorted(os.listdir(releases))

    dry = cw.run("--json", "--dry-run", "cleanup", "0", "--keep", "1")
    assert dry.returncode == 0, dry.stderr
    assert [Path(p).name for p in json.loads(dry.stdout)["would_prune_releases"]] == ["r2"]
    assert sorted(os.listdir(releases)) == before

    result = cw.run("--json", "cleanup", "0", "--keep", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed"] == [of_r2]
    assert [Path(p).name for p in report["pruned_releases"]] == ["r2"]
    assert sorted(p for p in os.listdir(releases) if not p.startswith(".")) == ["r3", "r4", "v1"]
    assert os.readlink(cw.live) == "releases/r4"
    assert cw.backup_ids() == [newest, pinned]

    # The pinned backup restores, to exactly the release it was taken of.
    wanted = tree_snapshot(releases / "v1")
    restored = cw.run("restore", pinned, "--yes")
    assert restored.returncode == 0, restored.stderr
    assert cw.tree() == wanted


def test_a_record_of_the_live_tree_that_cannot_be_read_stops_the_cleanup(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    first, second = backup(cw), backup(cw)
    (cw.store / "deployed.json").write_text("{not json")
    result = cw.run("cleanup", "0", "--keep", "1")
    assert result.returncode == 1 and "deployed.json cannot be read" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert cw.backup_ids() == [second, first]
