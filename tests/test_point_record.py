"""What a restore point's manifest records, written and read back through a real store."""

from __future__ import annotations

import json
from pathlib import Path

from backup_store.manifest import MANIFEST, load_backup
from backup_store.point_record import PointRecord, describe
from backup_store.store import BackupStore

PARTS = {"config": "20261123T230501.123Z-config-a1b2c3d4", "db": "20261123T230502.456Z-db-app-e5f6a7b8"}


def _point(tmp_path: Path, extra: dict) -> Path:
    store = BackupStore(tmp_path / "points", "point")
    with store.lock("test"), store.new_backup("release-2") as staging:
        staging.extra = extra
    return store.root / staging.backup_id


def test_a_record_is_written_as_the_manifest_fields_of_old_and_read_back_the_same(tmp_path: Path):
    record = PointRecord(dict(PARTS), ["code"])
    assert record.dump() == {"parts": PARTS, "skipped": ["code"]}
    folder = _point(tmp_path, record.dump())

    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["parts"] == PARTS and manifest["skipped"] == ["code"]
    point = load_backup(folder)
    assert PointRecord.load(point) == record
    assert describe(point)["parts"] == PARTS and describe(point)["skipped"] == ["code"]
    assert describe(point)["label"] == "release-2" and describe(point)["id"] == folder.name


def test_a_point_whose_manifest_lacks_the_fields_still_loads(tmp_path: Path):
    point = load_backup(_point(tmp_path, {"parts": {"db": PARTS["db"]}}))  # written before `skipped` was recorded
    assert PointRecord.load(point) == PointRecord({"db": PARTS["db"]}, [])
    assert PointRecord.load(load_backup(_point(tmp_path, {}))) == PointRecord()


def test_a_part_changed_by_hand_is_read_as_written_for_the_restore_to_refuse(tmp_path: Path):
    point = load_backup(_point(tmp_path, {"parts": {"config": "../elsewhere", "db": 7}, "skipped": []}))
    assert PointRecord.load(point).parts == {"config": "../elsewhere", "db": 7}
