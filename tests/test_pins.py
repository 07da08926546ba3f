"""Pins and restore points keep backups through every cleanup: each script's, rollback.py's and --remote's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_script
from point_system import System, take_point
from remote_sites import ConfigSite
from s3_server import Bucket

from backup_store.store import BackupStore


def ids(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [b["id"] for b in json.loads(result.stdout)["backups"]]


def config_backup(site: ConfigSite, label: str) -> str:
    result = site.run("--json", "backup", "--label", label)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["backup"]["id"]


@pytest.fixture
def site(tmp_path: Path, remote: Bucket) -> ConfigSite:
    return ConfigSite(tmp_path, remote, POINTS_DIR=str(tmp_path / "points"))


def test_a_pinned_backup_survives_cleanup_until_unpinned_and_dry_run_says_why(site: ConfigSite):
    oldest, middle, newest = (config_backup(site, label) for label in ("audit", "two", "three"))
    result = site.run("pin", oldest, "--reason", "the auditors asked")
    assert result.returncode == 0 and result.stdout.strip() == f"pinned {oldest}: the auditors asked"
    assert "(pinned: the auditors asked) audit" in site.run("list").stdout
    listing = json.loads(site.run("--json", "list").stdout)["backups"]
    assert [b["pinned"] for b in listing] == [None, None, "pinned: the auditors asked"]

    pins_before = (site.store / "pins.json").read_bytes()
    dry = site.run("--dry-run", "cleanup", "0", "--keep", "1")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {middle}" in dry.stdout and f"keep {oldest}: pinned: the auditors asked" in dry.stdout
    assert f"keep {newest}: the newest backup; one of the newest 1" in dry.stdout
    assert ids(site.run("--json", "list")) == [newest, middle, oldest]  # nothing changed
    assert (site.store / "pins.json").read_bytes() == pins_before

    assert site.run("cleanup", "0", "--keep", "1").returncode == 0
    assert ids(site.run("--json", "list")) == [newest, oldest]
    assert site.run("unpin", oldest).stdout.strip() == f"unpinned {oldest}"
    assert site.run("cleanup", "0", "--keep", "1").returncode == 0
    assert ids(site.run("--json", "list")) == [newest]


def test_pinning_what_is_not_there_or_with_dry_run_changes_nothing(site: ConfigSite):
    one = config_backup(site, "one")
    assert site.run("--dry-run", "pin", one).stdout.strip() == f"would pin {one}"
    result = site.run("pin", "20990101T000000.000Z-config-nohost-00000000")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (site.store / "pins.json").exists()
    result = site.run("unpin", "latest")
    assert result.returncode == 0 and "was not pinned" in result.stdout


def test_remote_cleanup_keeps_pinned_backups_and_the_parts_of_remote_points(site: ConfigSite, tmp_path: Path):
    in_point = config_backup(site, "in a point")
    points = run_script("rollback.py", "--json", "backup", env=site.env, cwd=site.root)
    assert points.returncode == 0, points.stderr
    point = json.loads(points.stdout)["point"]
    assert point["parts"]["config"] != in_point  # the point took a backup of its own
    part = point["parts"]["config"]
    pinned, middle, newest = (config_backup(site, label) for label in ("pinned", "middle", "newest"))
    assert site.run("pin", pinned).returncode == 0
    assert site.run("push", "--all").returncode == 0
    assert run_script("rollback.py", "push", "--all", env=site.env, cwd=site.root).returncode == 0
    # Another host's view: no local restore points, only the remote's.
    (tmp_path / "points").rename(tmp_path / "points-elsewhere")

    result = site.run("--json", "cleanup", "0", "--keep", "1", "--remote")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["removed"]) == sorted([in_point, middle])
    assert ids(site.run("--json", "list", "--remote")) == [newest, pinned, part]


def test_no_script_cleanup_removes_a_part_of_a_point_and_rollback_cleanup_frees_them(tmp_path: Path, pg_db):
    system = System(tmp_path, pg_db)
    first = take_point(system, "release 1")
    later = {script: component_backup(system, script) for script in SCRIPTS}
    second = take_point(system, "release 2")
    wanted = system.state()

    for script, name in SCRIPTS.items():
        dry = run_script(script, "--dry-run", "cleanup", "0", "--keep", "1", env=system.env, cwd=tmp_path)
        assert f"keep {first['parts'][name]}: part of restore point {first['id']}" in dry.stdout, dry.stderr
        result = run_script(script, "--json", "cleanup", "0", "--keep", "1", env=system.env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["removed"] == [later[script]]  # neither point's part, each newer than that backup
        assert report["kept_for_points"] == [first["parts"][name]]
        assert set(store_ids(system, script)) == {first["parts"][name], second["parts"][name]}

    assert system.run("pin", first["id"], "--reason", "last good quarter").returncode == 0
    assert system.run("cleanup", "0", "--keep", "1").returncode == 0
    assert [p["id"] for p in json.loads(system.run("--json", "list").stdout)["points"]] == [second["id"], first["id"]]
    assert system.run("unpin", first["id"]).returncode == 0
    with BackupStore(Path(system.env["CODE_BACKUP_DIR"]), "code").lock("a restore going on"):
        busy = system.run("cleanup", "0", "--keep", "1")
    assert busy.returncode == 75 and "a restore going on" in busy.stderr  # before any point went
    assert [p["id"] for p in json.loads(system.run("--json", "list").stdout)["points"]] == [second["id"], first["id"]]
    result = system.run("--json", "cleanup", "0", "--keep", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == [first["id"]]
    assert json.loads(result.stdout)["removed_parts"] == {name: [first["parts"][name]] for name in SCRIPTS.values()}
    for script, name in SCRIPTS.items():
        assert store_ids(system, script) == [second["parts"][name]]

    system.break_everything()
    result = system.run("restore", second["id"], "--yes")
    assert result.returncode == 0, result.stderr
    assert system.state() == wanted


SCRIPTS = {"config_rollback.py": "config", "code_rollback.py": "code", "database_rollback.py": "db"}


def component_backup(system: System, script: str) -> str:
    result = run_script(script, "--json", "backup", env=system.env, cwd=system.root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["backup"]["id"]


def store_ids(system: System, script: str) -> list[str]:
    return ids(run_script(script, "--json", "list", env=system.env, cwd=system.root))


def test_a_pinned_backup_survives_cleanup_in_every_script(tmp_path: Path, pg_db):
    system = System(tmp_path, pg_db)
    for script in SCRIPTS:
        older = component_backup(system, script)
        newer = component_backup(system, script)
        pin = run_script(script, "pin", older, "--reason", "before the schema change", env=system.env, cwd=tmp_path)
        assert pin.returncode == 0, pin.stderr
        result = run_script(script, "cleanup", "0", "--keep", "1", env=system.env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert store_ids(system, script) == [newer, older]
        listing = run_script(script, "list", env=system.env, cwd=tmp_path).stdout
        assert "(pinned: before the schema change)" in listing


def test_a_pin_reaches_the_remote_so_a_remote_cleanup_from_another_host_keeps_it(site: ConfigSite):
    older, newer = config_backup(site, "older"), config_backup(site, "newer")
    assert site.run("push", "--all").returncode == 0
    assert site.run("pin", older, "--reason", "quarter end").returncode == 0
    (site.store / "pins.json").unlink()  # another host's view: no local pins, only the remote's

    dry = site.run("--dry-run", "cleanup", "0", "--keep", "1", "--remote")
    assert dry.returncode == 0, dry.stderr
    assert f"keep {older}: pinned: quarter end" in dry.stdout
    result = site.run("--json", "cleanup", "0", "--keep", "1", "--remote")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == []
    assert ids(site.run("--json", "list", "--remote")) == [newer, older]


def test_pin_and_cleanup_wait_for_no_one_while_another_run_holds_the_store(site: ConfigSite):
    older, newer = config_backup(site, "older"), config_backup(site, "newer")
    with BackupStore(site.store, "config").lock("a restore going on"):
        pin = site.run("pin", older)
        cleanup = site.run("cleanup", "0", "--keep", "1")
    assert pin.returncode == 75 and "a restore going on" in pin.stderr
    assert cleanup.returncode == 75
    assert not (site.store / "pins.json").exists()
    assert ids(site.run("--json", "list")) == [newer, older]
