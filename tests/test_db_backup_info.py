"""database.backup_info: what a database backup's manifest records, read and written as it always was."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backup_store.manifest import Backup, backup_from_manifest
from database.backup_info import DbBackupInfo

SOURCE = {"host": "web1", "db_host": "/var/run/postgresql", "db_port": 5432, "database": "ariesone",
          "user": "postgres"}
EXTRA = {"dump_format": "custom", "server_version": "16.4", "pg_dump_version": 16, "database_size": 7_654_321,
         "migration_version": "002_orders", "has_globals": True, "role_passwords": False}


def manifest(source: dict, extra: dict) -> dict:
    """A manifest as BackupStore.new_backup writes it (the extra keys first)."""
    return {**extra, "format": 1, "id": "20260101T000000.000Z-db-ariesone-0a1b2c3d", "component": "db",
            "created_at": "2026-01-01T00:00:00.000Z", "tool_version": "0.1.0", "label": None, "kind": "backup",
            "source": source, "entries": []}


def test_dump_gives_the_dicts_written_today_key_for_key():
    info = DbBackupInfo(**SOURCE, **EXTRA)
    source, extra = info.dump()
    assert json.dumps(source) == json.dumps(SOURCE)
    assert json.dumps(extra) == json.dumps(EXTRA)


def test_load_reads_a_manifest_back_and_dumps_the_same_dicts():
    backup = backup_from_manifest(Path("/nowhere"), manifest(SOURCE, EXTRA))
    info = DbBackupInfo.load(backup)
    assert info.database == "ariesone" and info.db_port == 5432 and info.database_size == 7_654_321
    assert info.migration_version == "002_orders" and info.migration_number == 2
    assert info.dump() == (SOURCE, EXTRA)


def test_no_migration_yet_is_written_as_null():
    info = DbBackupInfo(**SOURCE, **{**EXTRA, "migration_version": None})
    assert info.dump()[1]["migration_version"] is None
    assert info.migration_number is None


def test_an_old_manifest_without_the_keys_still_loads():
    backup = backup_from_manifest(Path("/nowhere"), manifest({"host": "web1", "database": "ariesone"}, {}))
    info = DbBackupInfo.load(backup)
    assert info.database == "ariesone" and info.host == "web1"
    assert info.db_port is None and info.database_size is None and info.migration_version is None
    assert info.has_globals is None and info.role_passwords is None  # taken before roles were kept
    bare = Backup(Path("/nowhere"), "x", "db", datetime.now(UTC), None, {}, [])
    assert DbBackupInfo.load(bare) == DbBackupInfo()


def test_keys_of_other_kinds_are_left_out():
    info = DbBackupInfo.from_dicts({**SOURCE, "commit": "abc"}, {**EXTRA, "kind": "safety", "parts": {}})
    assert info.dump() == (SOURCE, EXTRA)


def test_set_in_fills_a_key_of_a_backup_being_built_and_refuses_others():
    extra = DbBackupInfo(**SOURCE, **{**EXTRA, "has_globals": None, "role_passwords": None}).dump()[1]
    DbBackupInfo.set_in(extra, has_globals=True, role_passwords=False)
    assert json.dumps(extra) == json.dumps(EXTRA)  # same keys, same order as a backup written in one go
    with pytest.raises(KeyError):
        DbBackupInfo.set_in(extra, database="other")  # a key of `source`, not of the manifest's own
