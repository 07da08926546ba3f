"""Code releases as operators run them: a first deploy, kept releases switched back without a copy, KEEP_RELEASES,
LINKED_PATHS kept in shared/, BUILD_HOOK and RESTART_HOOK."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from code_workspace import CodeWorkspace, commit_v2, git_archive_tree
from helpers import age, git

from backup_store.manifest import check_backup, load_backup
from deployed_code.release_check import check_release, describe
from deployed_code.tree import code_excluder


def live_release(cw: CodeWorkspace) -> Path:
    return Path(os.path.realpath(cw.live))


def inodes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.lstat().st_ino for path in folder.rglob("*")}


def commit(cw: CodeWorkspace, message: str, files: dict[str, str]) -> str:
    for rel, text in files.items():
        (cw.repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (cw.repo / rel).write_text(text)
    git(cw.repo, "add", "-A")
    git(cw.repo, "commit", "-q", "-m", message)
    return git(cw.repo, "rev-parse", "HEAD")


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def backup_paths(cw: CodeWorkspace, backup_id: str) -> set[str]:
    return {entry["path"] for entry in json.loads((cw.store / backup_id / "manifest.json").read_text())["entries"]}


# -- a first deploy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["missing", "empty"])
@pytest.mark.parametrize("name", ["deploy", "current"])
def test_first_deploy_makes_the_layout_links_shared_paths_and_saves_nothing(tmp_path: Path, name: str, state: str):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    cw.live = tmp_path / "new-host" / name
    if state == "empty":
        cw.live.mkdir(parents=True)
    cw.env.update(DEPLOYMENT_DIR=str(cw.live), LINKED_PATHS="storage/")
    result = cw.run("--json", "rollback", "v1", "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    reason = "does not exist yet" if state == "missing" else "is empty"
    assert report["safety_backup"] is None and f"{cw.live} {reason}: nothing to save" == report["safety_backup_skipped"]
    release = f"commit-{git(cw.repo, 'rev-parse', 'v1')[:12]}"
    if name == "current":
        assert os.readlink(cw.live) == f"releases/{release}"
        assert (tmp_path / "new-host" / "releases" / f".{release}.manifest.json").is_file()
    else:
        assert cw.live.is_dir() and not cw.live.is_symlink()
        assert sorted(os.listdir(tmp_path / "new-host")) == ["deploy", "shared"]  # no empty folder set aside
    assert os.readlink(live_release(cw) / "storage") == ("../../shared/storage" if name == "current"
                                                        else "../shared/storage")
    assert (tmp_path / "new-host" / "shared" / "storage").is_dir()
    expected = git_archive_tree(cw.repo, "v1", tmp_path / "expected")
    assert {rel: item for rel, item in cw.tree().items() if rel != "storage"} == expected
    assert len(cw.backup_ids()) == 1  # the record of what is deployed; no safety backup of nothing
    assert cw.run("verify").returncode == 0


def test_backup_before_the_first_deploy_says_there_is_nothing_yet(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    cw.env["DEPLOYMENT_DIR"] = str(tmp_path / "srv" / "current")
    result = cw.run("backup")
    assert result.returncode == 2
    assert f"{tmp_path}/srv/current does not exist yet: nothing to back up" in result.stderr
    assert not cw.store.exists() or cw.backup_ids() == []


# -- kept releases -------------------------------------------------------------------------------------------


def restored_then_replaced(cw: CodeWorkspace) -> tuple[str, dict, Path]:
    """A backup of the first release, restored (so built as a kept release), then a newer commit rolled out."""
    assert cw.run("backup").returncode == 0
    backup_id, expected = cw.backup_ids()[0], cw.tree()
    result = cw.run("restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    release = live_release(cw)
    assert release.name == backup_id and cw.tree() == expected
    commit_v2(cw)
    assert cw.run("rollback", "HEAD", "--yes").returncode == 0
    assert live_release(cw) != release
    return backup_id, expected, release


def test_switching_back_to_a_kept_release_copies_nothing_and_gives_the_backups_tree(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    before, newer = inodes(release), live_release(cw)
    releases = sorted(os.listdir(tmp_path / "releases"))

    result = cw.run("--json", "restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kept_release"]["ok"] and report["kept_release"]["path"] == str(release)
    assert live_release(cw) == release and os.readlink(cw.live) == f"releases/{backup_id}"
    assert inodes(release) == before  # not one file copied or rewritten
    assert cw.tree() == expected
    assert sorted(os.listdir(tmp_path / "releases")) == releases
    assert cw.run("verify").returncode == 0
    # The way back is a switch too: the safety backup of the release it replaced is that release's tree.
    undo = cw.run("--json", "restore", report["safety_backup"], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert json.loads(undo.stdout)["kept_release"]["path"] == str(newer) and live_release(cw) == newer


def test_a_kept_release_with_an_edited_file_is_built_anew_and_the_output_names_the_file(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    (release / "pkg" / "__init__.py").write_text("x = 1\n")  # a hand edit in a release that is not live

    result = cw.run("restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert f"kept release {release} failed its check: pkg/__init__.py: changed" in result.stdout
    assert "built anew instead" in result.stdout
    assert live_release(cw).name == f"{backup_id}-2"
    assert cw.tree() == expected
    assert cw.run("verify").returncode == 0


def test_a_kept_release_with_a_same_size_edit_fails_its_check_on_the_hash(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    (release / "app.py").write_text("print('v9')\n")  # the same size: only hashing tells

    result = cw.run("--json", "restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept_release"]["problems"] == [
        "app.py: changed (its content differs from the release's manifest)"]
    assert live_release(cw) != release and cw.tree() == expected


@pytest.mark.parametrize("command", ["restore", "rollback"])
def test_a_kept_release_changed_while_the_operator_is_asked_is_built_anew(tmp_path: Path, command: str):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    if command == "restore":
        backup_id, expected, release = restored_then_replaced(cw)
        args = ["restore", backup_id]
    else:
        assert cw.run("rollback", "v1", "--yes").returncode == 0
        release, expected = live_release(cw), git_archive_tree(cw.repo, "v1", tmp_path / "expected")
        commit_v2(cw)
        assert cw.run("rollback", "HEAD", "--yes").returncode == 0
        args = ["rollback", "v1"]

    def edit() -> None:  # checked and found whole before the question; edited while it is on the screen
        (release / "app.py").write_text("print('v9')\n")

    code, out = cw.run_asked(*args, meanwhile=edit)
    assert code == 0, out
    assert (f"kept release {release} changed while the confirmation was asked: app.py: changed (its content "
            "differs from the release's manifest); built anew instead") in out
    assert live_release(cw) != release and cw.tree() == expected
    assert not (release.parent / f".{release.name}.manifest.json").exists()  # never switched to unchecked again
    assert cw.run("verify").returncode == 0


def test_rollback_to_a_kept_commit_release_switches_without_exporting_and_verify_all_hashes_it_whole(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    assert cw.run("rollback", "v1", "--yes").returncode == 0
    first = live_release(cw)
    before = inodes(first)
    commit_v2(cw)
    assert cw.run("rollback", "HEAD", "--yes").returncode == 0

    result = cw.run("--json", "rollback", "v1", "--yes", "--verify-all")
    assert result.returncode == 0, result.stderr
    kept = json.loads(result.stdout)["kept_release"]
    assert kept["ok"] and kept["hashed_files"] == 3  # app.py, pkg/__init__.py, run.sh
    assert live_release(cw) == first and inodes(first) == before
    assert cw.tree() == git_archive_tree(cw.repo, "v1", tmp_path / "expected")
    assert cw.run("verify").returncode == 0


def test_a_file_written_within_two_seconds_of_its_description_is_hashed_until_it_is_older(tmp_path: Path):
    release = tmp_path / "releases" / "r1"
    release.mkdir(parents=True)
    (release / "old.py").write_text("A = 1\n")
    (release / "recent.py").write_text("B = 2\n")
    age(release)
    second_ago = time.time_ns() - 10**9  # on a filesystem keeping mtimes to 2 s, a rewrite now could leave it as is
    os.utime(release / "recent.py", ns=(second_ago, second_ago))
    excluded = code_excluder()
    manifest = describe(release, excluded)

    first = check_release(release, manifest, excluded)
    assert (first.problems, first.hashed, first.recorded) == ([], 1, 0)  # recent.py read; still too recent to trust
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(release / "recent.py", ns=(hour_ago, hour_ago))  # time has passed
    second = check_release(release, manifest, excluded)
    assert (second.problems, second.hashed, second.recorded) == ([], 1, 1)  # read once more, its stat recorded
    third = check_release(release, manifest, excluded)
    assert (third.problems, third.hashed, third.recorded) == ([], 0, 0)
    (release / "recent.py").write_text("B = 3\n")
    assert check_release(release, manifest, excluded).problems == [
        "recent.py: changed (its content differs from the release's manifest)"]


def test_a_kept_release_whose_files_are_old_is_switched_back_reading_no_file(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    age(release)  # built an hour ago, as a release switched back to usually was
    before, manifest = inodes(release), release.parent / f".{release.name}.manifest.json"
    written = manifest.read_bytes()
    assert cw.run("--dry-run", "restore", backup_id).returncode == 0
    assert manifest.read_bytes() == written  # a dry run records nothing

    first = cw.run("--json", "restore", backup_id, "--yes")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["kept_release"]["ok"]  # files whose stat it could not trust were read
    assert cw.run("rollback", "HEAD", "--yes").returncode == 0
    again = cw.run("--json", "restore", backup_id, "--yes")
    assert again.returncode == 0, again.stderr
    kept = json.loads(again.stdout)["kept_release"]
    assert kept["ok"] and kept["hashed_files"] == 0
    assert live_release(cw) == release and inodes(release) == before and cw.tree() == expected
    assert cw.run("verify").returncode == 0


def test_a_kept_release_whose_stat_fingerprint_moved_reads_only_the_files_whose_stat_moved(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    age(release)
    assert cw.run("restore", backup_id, "--yes").returncode == 0  # reads what it could not trust, then records it
    assert cw.run("rollback", "HEAD", "--yes").returncode == 0
    old = time.time_ns() - 7200 * 10**9
    os.utime(release / "app.py", ns=(old, old))  # touched, content unchanged, while another release is live

    touched = cw.run("--json", "restore", backup_id, "--yes")
    assert touched.returncode == 0, touched.stderr
    kept = json.loads(touched.stdout)["kept_release"]
    assert kept["ok"] and kept["hashed_files"] == 1 and cw.tree() == expected
    assert cw.run("rollback", "HEAD", "--yes").returncode == 0
    again = cw.run("--json", "restore", backup_id, "--yes")
    assert json.loads(again.stdout)["kept_release"]["hashed_files"] == 0 and cw.tree() == expected


def manifest_entries(cw: CodeWorkspace, backup_id: str) -> list:
    return json.loads((cw.store / backup_id / "manifest.json").read_text())["entries"]


def test_the_safety_backup_of_a_whole_kept_release_reuses_its_backups_entries_and_keeps_a_hand_edit(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    newer, newer_tree = live_release(cw), cw.tree()
    age(newer)
    deployed = json.loads((cw.store / "deployed.json").read_text())["backup"]

    switched = cw.run("--json", "restore", backup_id, "--yes")
    assert switched.returncode == 0, switched.stderr
    safety = json.loads(switched.stdout)["safety_backup"]
    assert manifest_entries(cw, safety) == manifest_entries(cw, deployed)  # the live release's backup, as it is
    undo = cw.run("--json", "restore", safety, "--yes")
    assert undo.returncode == 0, undo.stderr
    assert json.loads(undo.stdout)["kept_release"]["path"] == str(newer) and cw.tree() == newer_tree

    (newer / "app.py").write_text("print('hotfix made by hand on the server')\n")  # the live release, edited
    hotfixed = cw.tree()
    switched = cw.run("--json", "restore", backup_id, "--yes")
    assert switched.returncode == 0, switched.stderr
    safety = json.loads(switched.stdout)["safety_backup"]
    assert manifest_entries(cw, safety) != manifest_entries(cw, deployed)  # a snapshot of the tree as it was
    assert cw.run("restore", safety, "--yes").returncode == 0
    assert cw.tree() == hotfixed


def test_the_safety_backup_of_a_kept_release_whose_content_left_the_store_is_a_snapshot_that_stores_it(
        tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, _expected, _release = restored_then_replaced(cw)
    newer_tree = cw.tree()
    age(live_release(cw))
    deployed = json.loads((cw.store / "deployed.json").read_text())["backup"]
    gone = next(entry for entry in manifest_entries(cw, deployed) if entry["path"] == "tree/app.py")["sha256"]
    stored = cw.store / "objects" / gone[:2] / gone
    stored.unlink()  # removed by hand, or lost to a damaged disk

    switched = cw.run("--json", "restore", backup_id, "--yes")
    assert switched.returncode == 0, switched.stderr
    safety = json.loads(switched.stdout)["safety_backup"]
    assert manifest_entries(cw, safety) != manifest_entries(cw, deployed) and stored.is_file()
    assert check_backup(load_backup(cw.store / safety)) == []  # every file it names stored, whole
    assert cw.run("restore", safety, "--yes").returncode == 0 and cw.tree() == newer_tree


def test_after_the_exclusions_changed_the_safety_backup_of_a_kept_release_is_a_snapshot_by_the_new_ones(
        tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, _expected, _release = restored_then_replaced(cw)
    age(live_release(cw))
    deployed = json.loads((cw.store / "deployed.json").read_text())["backup"]
    cw.env["CODE_EXCLUDE"] = "run.sh"  # left out from now on: the live release's backup still has it
    switched = cw.run("--json", "restore", backup_id, "--yes")
    assert switched.returncode == 0, switched.stderr
    safety = {entry["path"] for entry in manifest_entries(cw, json.loads(switched.stdout)["safety_backup"])}
    assert "tree/run.sh" in {entry["path"] for entry in manifest_entries(cw, deployed)}
    assert "tree/run.sh" not in safety and "tree/app.py" in safety


def test_a_release_manifest_with_a_time_that_cannot_be_read_is_not_kept(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    manifest = release.parent / f".{release.name}.manifest.json"
    header, _, entries = manifest.read_bytes().partition(b"\n")
    manifest.write_bytes(json.dumps({**json.loads(header), "switched_at": 1700000000}).encode() + b"\n" + entries)
    result = cw.run("--json", "restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept_release"] is None and cw.tree() == expected  # built anew
    assert cw.run("verify").returncode == 0


def test_a_restore_gives_each_file_its_backed_up_mtime(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=False)
    age(cw.live)
    mtimes = {path: path.lstat().st_mtime_ns for path in cw.live.rglob("*") if path.is_file() and not path.is_symlink()}
    assert cw.run("backup").returncode == 0
    (cw.live / "app.py").write_text("print('broken')\n")
    assert cw.run("restore", "latest", "--yes").returncode == 0
    assert {path: path.lstat().st_mtime_ns for path in mtimes} == mtimes


def test_keep_releases_prunes_the_oldest_and_never_the_live_one_or_the_one_it_replaced(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    releases = tmp_path / "releases"
    os.utime(releases / "v1", (1_000_000_000, 1_000_000_000))  # the deploy tool's release, long ago
    cw.env["KEEP_RELEASES"] = "2"
    v2 = commit(cw, "v2", {"app.py": "print('v2')\n"})
    v3 = commit(cw, "v3", {"app.py": "print('v3')\n"})
    named = {"v1": "v1", v2: f"commit-{v2[:12]}", v3: f"commit-{v3[:12]}",
             "tag": f"commit-{git(cw.repo, 'rev-parse', 'v1')[:12]}"}

    def rollback(revision: str) -> list[str]:
        result = cw.run("--json", "rollback", revision, "--yes")
        assert result.returncode == 0, result.stderr
        return [Path(path).name for path in json.loads(result.stdout)["pruned_releases"]]

    assert rollback(v2) == [] and sorted(os.listdir(releases)) == sorted(
        ["v1", named[v2], f".{named[v2]}.manifest.json"])
    assert rollback(v3) == ["v1"]  # three releases, two kept: the oldest goes
    assert rollback(v2) == []  # a kept release switched back in: nothing new
    assert live_release(cw).name == named[v2]
    assert rollback("v1") == [named[v3]]  # v2 was in use more lately than v3
    assert {p.name for p in releases.iterdir() if not p.name.startswith(".")} == {named["tag"], named[v2]}

    cw.env["KEEP_RELEASES"] = "1"
    assert rollback(v3) == [named[v2]]  # one to keep, yet the release it replaced stays too: the way back
    assert {p.name for p in releases.iterdir() if not p.name.startswith(".")} == {named["tag"], named[v3]}
    assert live_release(cw).name == named[v3]
    assert sorted(p.name for p in releases.iterdir() if p.name.startswith(".")) == sorted(
        f".{named[key]}.manifest.json" for key in ("tag", v3))


# -- LINKED_PATHS --------------------------------------------------------------------------------------------


def test_linked_paths_stay_shared_across_a_rollback_and_never_go_into_a_backup(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    # An old commit that carried what must never come back with the code: a .env and an uploads placeholder.
    commit(cw, "old", {".env": "SECRET=old\n", "storage/.gitkeep": "", "config/settings.py": "A = 1\n"})
    git(cw.repo, "tag", "old")
    commit(cw, "new", {"app.py": "print('new')\n"})
    shared = tmp_path / "shared"
    (shared / "config").mkdir(parents=True)
    (shared / ".env").write_text("SECRET=current\n")
    (shared / "config" / "database.yml").write_text("host: db1\n")
    cw.env["LINKED_PATHS"] = ".env, config/database.yml storage/"

    assert cw.run("rollback", "HEAD", "--yes").returncode == 0
    (cw.live / "storage" / "upload.bin").write_bytes(b"user data")  # the application writes through its link
    assert cw.run("backup").returncode == 0
    result = cw.run("--json", "rollback", "old", "--yes")
    assert result.returncode == 0, result.stderr

    live = live_release(cw)
    assert (live / ".env").read_text() == "SECRET=current\n" and (live / ".env").is_symlink()
    assert (live / "config" / "database.yml").read_text() == "host: db1\n"
    assert (live / "config" / "settings.py").read_text() == "A = 1\n"
    assert sorted(os.listdir(live / "storage")) == ["upload.bin"]  # the shared folder, not the commit's placeholder
    assert (shared / "storage" / "upload.bin").read_bytes() == b"user data"
    for backup_id in cw.backup_ids():  # the backup, the safety backups and the deployed records alike
        paths = backup_paths(cw, backup_id)
        assert not {"tree/.env", "tree/config/database.yml", "tree/storage"} & paths, backup_id
        assert not [path for path in paths if path.startswith("tree/storage/")]
    assert cw.run("verify").returncode == 0

    (live / "config" / "database.yml").unlink()
    (live / "config" / "database.yml").write_text("host: localhost\n")  # a copy where the link was
    os.remove(live / ".env")
    result = cw.run("verify")
    assert result.returncode == 3
    assert f"linked config/database.yml is not a link (should link to {shared}/config/database.yml)" in result.stdout
    assert f"linked .env is missing (should link to {shared}/.env)" in result.stdout


def test_a_path_linked_since_a_release_was_built_is_linked_into_it_when_it_is_switched_back(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    backup_id, expected, release = restored_then_replaced(cw)
    before, target, backups = inodes(release), os.readlink(cw.live), cw.backup_ids()
    cw.env["LINKED_PATHS"] = ".env"  # the application now reads its settings from a shared .env

    missing = cw.run("restore", backup_id, "--yes")
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith(f"LINKED_PATHS: {tmp_path}/shared/.env is missing: put the file there, "
                                           "it is linked into every release as .env; nothing changed")
    assert os.readlink(cw.live) == target and inodes(release) == before and cw.backup_ids() == backups

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / ".env").write_text("SECRET=current\n")
    result = cw.run("--json", "restore", backup_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept_release"]["ok"] and live_release(cw) == release
    assert os.readlink(release / ".env") == "../../shared/.env"
    assert (cw.live / ".env").read_text() == "SECRET=current\n"
    assert {rel: ino for rel, ino in inodes(release).items() if rel != ".env"} == before  # nothing copied
    assert {rel: item for rel, item in cw.tree().items() if rel != ".env"} == expected
    assert cw.run("verify").returncode == 0


def test_a_missing_shared_file_stops_the_rollback_before_anything_changes(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    cw.env["LINKED_PATHS"] = ".env storage/"
    before, target = cw.tree(), os.readlink(cw.live)
    result = cw.run("rollback", "v1", "--yes")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"LINKED_PATHS: {tmp_path}/shared/.env is missing: put the file there, "
                                          "it is linked into every release as .env; nothing changed")
    assert os.readlink(cw.live) == target and cw.tree() == before
    assert sorted(os.listdir(tmp_path / "releases")) == ["v1"] and cw.backup_ids() == []


# -- BUILD_HOOK and RESTART_HOOK -----------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "layout"), [("fails", "symlink"), ("times out", "symlink"), ("fails", "plain")])
def test_a_failing_build_hook_switches_nothing_and_leaves_no_half_built_release(tmp_path: Path, how: str,
                                                                               layout: str):
    cw = CodeWorkspace(tmp_path, symlink_layout=layout == "symlink")
    assert cw.run("backup").returncode == 0
    body = "echo installing; echo 'npm ERR! missing script: build' >&2; exit 7\n" if how == "fails" else \
        "echo 'compiling assets'; exec sleep 600\n"
    hook = script(tmp_path / "build.sh", f"test -f app.py || exit 9\n{body}")  # it runs inside the new release
    cw.env.update(BUILD_HOOK=str(hook), HOOK_TIMEOUT_SECONDS="1")
    before, backups = cw.tree(), cw.backup_ids()
    target = os.readlink(cw.live) if layout == "symlink" else None
    commit_v2(cw)

    for args in (["rollback", "HEAD"], ["restore", "latest"]):
        result = cw.run(*args, "--yes")
        assert result.returncode == 1, result.stderr
        said = ("failed (exit 7): npm ERR! missing script: build" if how == "fails"
                else "did not finish within 1 s and was stopped, with everything it started: compiling assets")
        assert f"error: BUILD_HOOK ({hook}) {said}; nothing was switched" in result.stderr
        assert cw.tree() == before and (target is None or os.readlink(cw.live) == target)
        beside = ["current", "releases"] if layout == "symlink" else ["deploy", "releases"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name in beside or p.name.startswith(".")) == beside
        if layout == "symlink":
            assert sorted(os.listdir(tmp_path / "releases")) == ["v1"]  # no half-built release, no manifest
        assert cw.backup_ids() == backups  # no safety backup left of a switch that did not happen


def test_build_hook_runs_in_the_new_release_before_its_switch_and_restart_hook_after(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    seen = tmp_path / "seen"
    build = script(tmp_path / "build.sh", f'echo "build in $(pwd -P), current -> $(readlink {cw.live})" >> {seen}\n'
                                          "mkdir -p public && echo compiled > public/app.css\n")
    restart = script(tmp_path / "restart.sh", f'echo "restart: current -> $(readlink "$DEPLOYMENT_DIR")" >> {seen}\n')
    cw.env.update(BUILD_HOOK=str(build), RESTART_HOOK=str(restart))
    commit_v2(cw)

    result = cw.run("--json", "rollback", "HEAD", "--yes")
    assert result.returncode == 0, result.stderr
    release = f"commit-{git(cw.repo, 'rev-parse', 'HEAD')[:12]}"
    lines = seen.read_text().splitlines()
    assert lines[0].startswith(f"build in {tmp_path}/releases/.current.tmp-") and lines[0].endswith("releases/v1")
    assert lines[1] == f"restart: current -> releases/{release}"
    assert (live_release(cw) / "public" / "app.css").read_text() == "compiled\n"
    assert json.loads(result.stdout)["restart_hook"]["exit_code"] == 0
    assert cw.run("verify").returncode == 0  # what is deployed is the release as built, assets too


def test_a_failing_restart_hook_exits_1_with_the_undo_and_the_undo_switches_back(tmp_path: Path):
    cw = CodeWorkspace(tmp_path, symlink_layout=True)
    assert cw.run("rollback", "v1", "--yes").returncode == 0  # a release the toolkit built, with a manifest
    first = live_release(cw)
    restart = script(tmp_path / "restart.sh", "echo 'reload: unit app.service not found'; exit 5\n")
    cw.env["RESTART_HOOK"] = str(restart)
    commit_v2(cw)

    result = cw.run("--json", "rollback", "HEAD", "--yes")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    undo = f"code_rollback.py restore {report['safety_backup']} --yes"
    assert report["ok"] is False and report["undo"] == [undo]
    assert os.readlink(cw.live) == f"releases/commit-{git(cw.repo, 'rev-parse', 'HEAD')[:12]}"  # the switch stays
    text = cw.run("rollback", "HEAD", "--yes")
    assert text.returncode == 1
    assert (f"RESTART_HOOK ({restart}) failed (exit 5): reload: unit app.service not found; the new code is live "
            f"in {cw.live}; to undo: code_rollback.py restore ") in text.stdout

    del cw.env["RESTART_HOOK"]
    back = cw.run("--json", "restore", report["safety_backup"], "--yes")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["kept_release"]["ok"] and live_release(cw) == first
