"""What a code backup records of its source: CodeSource writes the dict backups have always written, reads the
manifests of older versions, and is what head_plan and the scripts read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import git

from backup_store.manifest import backup_from_manifest
from deployed_code.git import git_state, head_plan
from deployed_code.source import CodeSource


def repository(root: Path, state: str) -> Path | None:
    """A real repository in the given state: unborn, clean on a branch, dirty, detached; or no repository."""
    if state == "none":
        return None
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    if state == "unborn":
        return repo
    (repo / "app.py").write_text("print('v1')\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "v1")
    if state == "dirty":
        (repo / "app.py").write_text("edited\n")
    if state == "detached":
        git(repo, "checkout", "-q", "--detach", "HEAD")
    return repo


def recorded_before(host: str, layout: str, live: str, repo: Path | None, deployed_commit: str | None) -> dict:
    """The source dict as the code component built it before CodeSource existed."""
    source = {"host": host, "layout": layout, "live": live, **git_state(repo)}
    if deployed_commit:
        source["commit"] = deployed_commit
    return source


@pytest.mark.parametrize("state", ["none", "unborn", "clean", "dirty", "detached"])
@pytest.mark.parametrize("deployed_commit", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_dump_writes_the_same_keys_values_and_order_as_before(tmp_path: Path, state: str, deployed_commit: str | None):
    repo = repository(tmp_path, state)
    before = recorded_before("web-1", "release", "/srv/app/current", repo, deployed_commit)
    source = CodeSource(host="web-1", layout="release", live="/srv/app/current", **git_state(repo))
    if deployed_commit:
        source.commit = deployed_commit
    assert json.dumps(source.dump()) == json.dumps(before)  # the manifest's bytes: keys, values and order
    assert CodeSource.from_dict(before) == source
    assert CodeSource.from_dict(before).dump() == before


def manifest(source: dict | None) -> dict:
    data = {"id": "20260101T000000.000Z-code-web-1", "component": "code", "created_at": "2026-01-01T00:00:00.000Z",
            "entries": []}
    if source is not None:
        data["source"] = source
    return data


@pytest.mark.parametrize("source", [None, {}, {"host": "web-1"}, {"host": "web-1", "layout": "in-place"}])
def test_old_manifests_lacking_keys_still_load(tmp_path: Path, source: dict | None):
    backup = backup_from_manifest(tmp_path, manifest(source))
    loaded = CodeSource.load(backup)
    assert loaded.commit is None and loaded.branch is None and loaded.dirty is None and not loaded.unborn
    assert loaded.host == (source or {}).get("host")
    assert loaded.dump() == (source or {})


def test_head_is_left_alone_for_a_backup_that_records_no_layout(tmp_path: Path):
    repo = repository(tmp_path, "clean")
    commit = git(repo, "rev-parse", "HEAD")
    plan = head_plan(repo, CodeSource(commit=commit, branch="main"), "an-old-backup")
    assert plan.how == "left" and plan.commit == commit
    assert "not of this working copy" in plan.note
