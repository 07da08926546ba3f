"""code_rollback.py history: deploys and backups from a real store, a real audit log and a real git repository."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace, in_place_workspace
from helpers import git


class History:
    """A code workspace whose runs are made by named users, remembering each run's audit line."""

    def __init__(self, cw: CodeWorkspace):
        self.cw = cw
        self.audit = cw.store / "audit.log"
        self.lines: dict[str, dict] = {}  # user -> the audit line of the run that user made

    def run(self, user: str, *args: str) -> dict:
        self.cw.env["LOGNAME"] = user  # who getpass, and so the audit log, says ran it
        result = self.cw.run("--json", *args)
        assert result.returncode == 0, result.stderr
        self.lines[user] = json.loads(self.audit.read_bytes().splitlines()[-1])
        assert self.lines[user]["user"] == user and self.lines[user]["command"] == args[0]
        return json.loads(result.stdout)

    def history(self, *args: str) -> dict:
        self.cw.env["LOGNAME"] = "reader"
        result = self.cw.run("--json", "history", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def text(self) -> str:
        result = self.cw.run("history")
        assert result.returncode == 0, result.stderr
        return result.stdout


def commit_v2_by_vera(repo: Path) -> None:
    """A second commit by another author, with an annotated tag v2."""
    (repo / "app.py").write_text("print('v2')\n")
    (repo / "v2.py").write_text("NEW = True\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--author", "Vera Two <vera@example.test>", "-m", "Add v2.py\n\nThe body is not shown.")
    git(repo, "tag", "-a", "v2", "-m", "release 2")


def sha(repo: Path, rev: str) -> str:
    return git(repo, "rev-parse", f"{rev}^{{commit}}")


def live_entries(report: dict) -> list[dict]:
    return [entry for entry in report["history"] if entry["live"]]


def who_and_when(report: dict) -> list[tuple]:
    return [(entry["event"], entry["by"], entry["at"]) for entry in report["history"]]


@pytest.fixture
def deployed(tmp_path: Path) -> History:
    """A symlink layout: alice backs up v1, bob rolls back to v1, carol to v2, dave to v1 again, erin restores
    alice's backup."""
    h = History(CodeWorkspace(tmp_path, symlink_layout=True))
    git(h.cw.repo, "tag", "stable", "v1")
    h.run("alice", "backup", "--label", "first")
    commit_v2_by_vera(h.cw.repo)
    h.run("bob", "rollback", "v1", "--yes")
    report = h.history()
    assert [(e["event"], e["by"], e["live"]) for e in report["history"]] == [
        ("rollback", "bob", True), ("backup", "alice", False)]
    h.run("carol", "rollback", "v2", "--yes")
    return h


def test_the_live_deploy_follows_rollbacks_and_a_restore(deployed: History):
    h, repo = deployed, deployed.cw.repo
    v1, v2 = sha(repo, "v1"), sha(repo, "v2")
    report = h.history()
    assert [(e["event"], e["commit"], e["by"]) for e in report["history"]] == [
        ("rollback", v2, "carol"), ("rollback", v1, "bob"), ("backup", v1, "alice")]
    assert live_entries(report) == [report["history"][0]]

    h.run("dave", "rollback", "v1", "--yes")
    report = h.history()
    assert [(e["by"], e["commit"], e["live"]) for e in report["history"]] == [
        ("dave", v1, True), ("carol", v2, False), ("bob", v1, False), ("alice", v1, False)]
    # The live one is what verify compares the tree with: dave's record of v1, not bob's.
    verify = json.loads(h.cw.run("--json", "verify").stdout)
    assert verify["against"] == report["history"][0]["backup"] == report["live"]["backup"]

    first = report["history"][-1]["backup"]
    restored = h.run("erin", "restore", first, "--yes")
    report = h.history()
    assert [e["event"] for e in report["history"]] == ["restore", "rollback", "rollback", "rollback", "backup"]
    top = report["history"][0]
    assert (top["backup"], top["by"], top["commit"], top["label"]) == (first, "erin", v1, "first")
    assert top["safety_backup"] == restored["safety_backup"]
    assert live_entries(report) == [top]
    assert report["live"] == {"backup": first, "commit": v1, "listed": True}
    assert json.loads(h.cw.run("--json", "verify").stdout)["against"] == first


def test_who_and_when_come_from_the_audit_log(deployed: History):
    h = deployed
    h.run("dave", "rollback", "v1", "--yes", "--no-backup")  # no safety backup: its run is known by its time
    first = h.history()["history"][-1]["backup"]
    h.run("erin", "restore", first, "--yes")
    report = h.history()
    assert who_and_when(report) == [(event, user, h.lines[user]["time"]) for event, user in [
        ("restore", "erin"), ("rollback", "dave"), ("rollback", "carol"), ("rollback", "bob"), ("backup", "alice")]]
    assert all(entry["audited"] and entry["host"] == h.lines["erin"]["host"] for entry in report["history"])
    assert "deployed by: erin on" in h.text()


def test_tags_author_and_subject_come_from_repo_path(deployed: History):
    report = deployed.history()
    v2, v1 = report["history"][0], report["history"][1]
    assert (v2["tags"], v2["author"], v2["author_email"], v2["subject"], v2["in_repo"]) == (
        ["v2"], "Vera Two", "vera@example.test", "Add v2.py", True)
    assert (v1["tags"], v1["author"], v1["subject"]) == (["stable", "v1"], "t", "v1")
    text = deployed.text()
    assert f"commit {v2['commit'][:12]} (tag v2)  Vera Two: Add v2.py" in text
    assert f"commit {v1['commit'][:12]} (tag stable, v1)  t: v1" in text


def test_json_gives_every_field(deployed: History):
    report = deployed.history()
    assert set(report) == {"ok", "command", "deployment", "layout", "repo", "repo_problem", "audit_log",
                           "audit_log_found", "live", "history", "releases"}
    assert (report["layout"], report["deployment"], report["repo_problem"], report["audit_log_found"]) == (
        "symlink", str(deployed.cw.live), None, True)
    entry = report["history"][0]
    assert set(entry) == {"event", "backup", "at", "by", "host", "audited", "commit", "tags", "author",
                          "author_email", "subject", "in_repo", "label", "safety_backup", "live", "release",
                          "release_kept"}
    # carol's rollback saved what it replaced; restoring that backup undoes it.
    assert entry["safety_backup"] in deployed.cw.backup_ids() and entry["safety_backup"] != entry["backup"]
    assert len(deployed.history("--limit", "2")["history"]) == 2
    metrics = deployed.cw.root / "metrics.prom"
    assert deployed.cw.run("history", "--metrics-file", str(metrics)).returncode == 0
    assert not metrics.exists()  # a report changes nothing: like `list`, it is not a run to count


def test_the_symlink_layout_says_which_release_folders_are_kept(deployed: History):
    h, releases = deployed, deployed.cw.root / "releases"
    h.run("dave", "rollback", "v1", "--yes")
    first = h.history()["history"][-1]["backup"]
    h.run("erin", "restore", first, "--yes")
    v1, v2 = sha(h.cw.repo, "v1")[:12], sha(h.cw.repo, "v2")[:12]
    report = h.history()
    # dave's rollback to v1 switched back to bob's release of v1, still on disk: one folder, two deploys.
    assert [(e["by"], e["release"], e["release_kept"]) for e in report["history"]] == [
        ("erin", first, True), ("dave", f"commit-{v1}", True), ("carol", f"commit-{v2}", True),
        ("bob", f"commit-{v1}", True), ("alice", None, None)]
    assert os.readlink(h.cw.live) == f"releases/{first}"
    assert {(r["folder"], r["live"]) for r in report["releases"]["kept"]} == {
        (first, True), (f"commit-{v2}", False), (f"commit-{v1}", False), ("v1", False)}

    shutil.rmtree(releases / f"commit-{v2}")  # the deploy tool pruned carol's release
    report = h.history()
    assert [(e["by"], e["release"], e["release_kept"]) for e in report["history"]][:4] == [
        ("erin", first, True), ("dave", f"commit-{v1}", True), ("carol", None, False), ("bob", f"commit-{v1}", True)]
    text = h.text()
    assert f"release folder commit-{v1} (kept)" in text and "release folder no longer on disk" in text
    assert f"release folders kept in {releases}: {first} (live), commit-{v1}, v1" in text


def test_without_an_audit_log_the_store_still_gives_the_history(deployed: History):
    h = deployed
    h.run("dave", "rollback", "v1", "--yes")
    before = h.history()
    h.audit.unlink()
    report = h.history()
    assert report["audit_log_found"] is False
    assert [(e["event"], e["backup"], e["commit"], e["live"]) for e in report["history"]] == [
        (e["event"], e["backup"], e["commit"], e["live"]) for e in before["history"]]
    assert all(e["by"] is None and not e["audited"] for e in report["history"])
    # Without the log, the time is the store's. v1's release is still on disk, so dave's rollback switched back
    # to it: its time is that of the safety backup taken right before the switch (no record is taken after).
    created = {b["id"]: b["created_at"] for b in json.loads(h.cw.run("--json", "list").stdout)["backups"]}
    assert report["history"][0]["at"] == created[report["history"][0]["safety_backup"]]
    h.audit.unlink()  # the listing above was itself recorded
    text = h.text()
    assert "deployed by: unknown" in text and "taken by: unknown" in text
    assert f"no audit log at {h.audit}" in text


def test_other_scripts_lines_and_malformed_lines_are_skipped(deployed: History):
    h = deployed
    good = h.history()
    first = good["history"][-1]["backup"]
    forged = {**h.lines["alice"], "user": "mallory"}
    junk = [
        "not json at all",
        json.dumps(forged)[:40],  # cut off
        "[1, 2, 3]",
        json.dumps({**forged, "script": "config_rollback.py"}),  # another script naming this backup
        json.dumps({**forged, "exit_code": 1}),  # a failed run
        json.dumps({**forged, "arguments": {**forged["arguments"], "dry_run": True}}),
        json.dumps({**forged, "backup_ids": first}),  # a field of the wrong type
        json.dumps({**forged, "time": "yesterday"}),
        json.dumps({**forged, "user": 7}),
        json.dumps(forged).replace('"mallory"', '"mallory"' + " " * (3 << 20)),  # over-long: no run's line
        json.dumps({**forged, "backup_ids": ["20200101T000000.000Z-code-elsewhere-00000000"]}),  # another store
    ]
    with open(h.audit, "ab") as log:
        log.write(b"\xff\xfe not UTF-8 " + json.dumps(forged).encode() + b"\n")
        log.write("\n".join(junk).encode() + b"\n")
    h.run("dave", "rollback", "v1", "--yes")
    report = h.history()
    assert [e["by"] for e in report["history"]] == ["dave", "carol", "bob", "alice"]
    assert "mallory" not in h.text()


def test_an_in_place_working_copy(tmp_path: Path):
    h = History(in_place_workspace(tmp_path))
    git(h.cw.repo, "tag", "v2")
    repo = h.cw.repo
    h.run("alice", "backup")
    h.run("bob", "rollback", "v1", "--yes")
    report = h.history()
    assert report["layout"] == "in-place" and report["releases"] is None
    assert [(e["event"], e["commit"], e["tags"], e["by"], e["live"], e["release"]) for e in report["history"]] == [
        ("rollback", sha(repo, "v1"), ["v1"], "bob", True, None), ("backup", sha(repo, "v2"), ["v2"], "alice", False,
                                                                       None)]
    first = report["history"][1]["backup"]
    h.run("carol", "restore", first, "--yes")
    report = h.history()
    assert [(e["event"], e["by"], e["live"]) for e in report["history"]] == [
        ("restore", "carol", True), ("rollback", "bob", False), ("backup", "alice", False)]
    assert git(repo, "rev-parse", "HEAD") == report["history"][0]["commit"] == sha(repo, "v2")


def test_a_missing_repo_path(deployed: History):
    h = deployed
    other = h.cw.root / "other"
    other.mkdir()
    git(other, "init", "-q")
    git(other, "commit", "-q", "--allow-empty", "-m", "unrelated")
    h.cw.env["REPO_PATH"] = str(other)  # a repository without these commits
    report = h.history()
    assert report["repo_problem"] is None
    assert all(e["in_repo"] is False and e["author"] is None and e["tags"] == [] for e in report["history"])
    assert f"commit {report['history'][0]['commit'][:12]}: commit not in REPO_PATH" in h.text()

    h.cw.env["REPO_PATH"] = str(h.cw.root / "gone")
    assert h.history()["repo_problem"] == f"REPO_PATH {h.cw.root / 'gone'} is not a git repository"
    del h.cw.env["REPO_PATH"]
    report = h.history()
    assert report["repo_problem"] == "REPO_PATH is not set"
    assert [e["by"] for e in report["history"]] == ["carol", "bob", "alice"]
    assert "REPO_PATH is not set: no tags, authors or subjects" in h.text()


def test_limit_shows_the_newest_and_names_a_live_deploy_left_out(deployed: History):
    h = deployed
    h.run("dave", "backup")
    h.run("erin", "backup")
    report = h.history("--limit", "2")
    assert [e["by"] for e in report["history"]] == ["erin", "dave"]
    assert not live_entries(report) and report["live"]["listed"] is False
    assert report["live"]["commit"] == sha(h.cw.repo, "v2")
    h.cw.env["LOGNAME"] = "reader"
    text = h.cw.run("history", "--limit", "1").stdout
    assert f"live now: backup {report['live']['backup']} (commit {sha(h.cw.repo, 'v2')[:12]})" in text
    refused = h.cw.run("history", "--limit", "0")
    assert refused.returncode == 2 and "--limit must be 1 or more" in refused.stderr
