"""What a restore point's manifest records: the backup id of each part it holds, and the parts it skipped."""

from __future__ import annotations

from dataclasses import dataclass, field

from backup_store.manifest import Backup, format_time


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
