"""What a restore point's manifest records (the backup id of each part it holds, and the parts it skipped), and
which component backups the points hold: no cleanup removes a backup a point names while the point exists."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from backup_store.manifest import Backup, format_time
from backup_store.store import BackupStore
from common.components import POINTS
from common.errors import ToolkitError
from common.settings import Settings


@dataclass
class PointRecord:
    """A restore point's own fields in its manifest, as `backup` writes them.

    `parts` maps a component's name (config, code, db) to its backup id, in the runbook's order; `skipped`
    names the components that were not configured. Read as written: a manifest changed by hand keeps its
    values here, and the restore refuses an id that is not one.
    """

    parts: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, point: Backup) -> PointRecord:
        """Read a point's manifest; a key an older point lacks takes its default."""
        return cls(parts=point.extra.get("parts", {}), skipped=point.extra.get("skipped", []))

    def dump(self) -> dict:
        """The manifest's fields (a staging backup's `extra`), as they have always been written."""
        return {"parts": self.parts, "skipped": self.skipped}


def describe(point: Backup) -> dict:
    """What `list`, `backup` and a restore's preview show of a point (and print with --json)."""
    record = PointRecord.load(point)
    return {"id": point.id, "created_at": format_time(point.created_at), "label": point.label,
            "parts": record.parts, "skipped": record.skipped}


def held_by_points(points: Iterable[Backup], component: str) -> dict[str, list[str]]:
    """The component's backup ids that these points name, each with the reason it stays."""
    holds: dict[str, list[str]] = {}
    for point in points:
        backup_id = PointRecord.load(point).parts.get(component)
        if isinstance(backup_id, str):
            holds.setdefault(backup_id, []).append(f"part of restore point {point.id}")
    return holds


def local_points(settings: Settings) -> list[Backup]:
    """The restore points in POINTS_DIR (none when it does not exist). A point whose manifest cannot be read
    stops the cleanup: it may name any backup."""
    store = BackupStore(POINTS.store_path(settings), POINTS.name)
    if not store.root.is_dir():
        return []
    points, unreadable = store.scan(headers=True)
    if unreadable:
        name, why = unreadable[0]
        raise ToolkitError(f"restore point {name} in {store.root} cannot be read ({why}): it may name any backup, "
                           "so nothing is removed until it is mended or moved out of that folder")
    return points
