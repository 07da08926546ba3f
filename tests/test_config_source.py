"""ConfigSource: what a configuration backup records of where it came from, typed; old manifests still load."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from backup_store.manifest import MANIFEST
from common.settings import Settings
from configuration.backups import take_backup
from configuration.paths import ConfigPaths
from configuration.restore import compare
from configuration.source import ConfigSource


def _paths(root: Path) -> ConfigPaths:
    environ = {"CONFIG_DIR": str(root / "config"), "CONFIG_BACKUP_DIR": str(root / "store"),
               "ENV_FILE": str(root / ".env")}
    return ConfigPaths.from_settings(Settings(environ, {}, None))


def test_a_backup_writes_the_source_it_always_wrote(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "app.yml").write_text("a: 1\n")
    (tmp_path / ".env").write_text("A=1\n")
    paths = _paths(tmp_path)
    with paths.store.lock("test"):
        backup = take_backup(paths, "label")
    written = json.loads((backup.path / MANIFEST).read_text())["source"]
    # The keys, their order and their values, as the manifest has carried them since the first version.
    assert list(written.items()) == [
        ("host", socket.gethostname()),
        ("config_dir", str((tmp_path / "config").resolve())),
        ("env_file", str((tmp_path / ".env").resolve())),
        ("env_file_present", True),
        ("env_file_in_config_dir", False),
        ("config_dir_present", True),
    ]
    loaded = ConfigSource.load(backup)
    assert loaded.dump() == written and loaded.env_file_present and not loaded.env_file_in_config_dir


def test_an_env_file_inside_the_folder_is_recorded_as_part_of_the_tree(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / ".env").write_text("A=1\n")
    environ = {"CONFIG_DIR": str(tmp_path / "config"), "CONFIG_BACKUP_DIR": str(tmp_path / "store"),
               "ENV_FILE": str(tmp_path / "config" / ".env")}
    paths = ConfigPaths.from_settings(Settings(environ, {}, None))
    with paths.store.lock("test"):
        backup = take_backup(paths, None)
    source = ConfigSource.load(backup)
    assert source.env_file_in_config_dir and source.env_file_present and source.config_dir_present


def test_an_old_source_lacking_keys_loads_with_defaults():
    old = {"host": "web1", "config_dir": "/srv/app/config", "env_file": "/srv/app/.env"}
    source = ConfigSource.from_dict(old)
    assert source == ConfigSource(host="web1", config_dir="/srv/app/config", env_file="/srv/app/.env")
    assert not source.env_file_in_config_dir and not source.env_file_present and source.config_dir_present
    assert ConfigSource.from_dict({}) == ConfigSource()


def test_unknown_keys_are_left_and_recorded_values_kept_as_they_are():
    source = ConfigSource.from_dict({"host": "web1", "env_file_in_config_dir": 1, "written_by": "a later version"})
    assert source.host == "web1" and source.env_file_in_config_dir == 1
    assert "written_by" not in source.dump()


def test_compare_reads_an_old_manifest_without_the_in_tree_key(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "app.yml").write_text("a: 1\n")
    (tmp_path / ".env").write_text("A=1\n")
    paths = _paths(tmp_path)
    with paths.store.lock("test"):
        backup = take_backup(paths, None)
    backup.source = {key: value for key, value in backup.source.items() if key == "host"}
    (tmp_path / ".env").write_text("A=2\n")
    diff, env_change = compare(backup, paths)
    assert not diff and env_change == "changed"
