"""Pins: backups no cleanup removes, local or remote, until they are unpinned (Barman's `keep`).

One file per store, `pins.json` beside the backups, rewritten whole (atomically) under the store's lock. A
backup is pinned on its own (`pin BACKUP`), by restore points that hold it (`rollback.py pin POINT` pins the
point's three backups), or both; it stays pinned while any of those remains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from backup_store.manifest import format_time
from common.errors import ToolkitError
from common.files import atomic_write

PINS_FILE = "pins.json"
PINS_FORMAT = 1


@dataclass
class Pin:
    """Why one backup is pinned, since when, and by whom: the operator, restore points, or both."""

    reason: str = ""
    pinned_at: str = ""
    direct: bool = True  # pinned with `pin BACKUP` (not only through a restore point)
    points: list[str] = field(default_factory=list)  # restore points pinned with `rollback.py pin` that hold it

    @classmethod
    def from_text(cls, text: bytes, where: str) -> Pin:
        """One pin from its JSON text (a remote keeps one object per pin); `where` names it in the error."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ToolkitError(f"the pin {where} cannot be read ({exc}): nothing is removed until it is mended or "
                               "removed") from None

    def to_text(self) -> bytes:
        """The pin's JSON text."""
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        """`pinned`, with the reason and the points that hold it, for `list`."""
        held = f"restore point {', '.join(self.points)}" if self.points else ""
        said = "; ".join(text for text in (self.reason, held) if text)
        return f"pinned: {said}" if said else "pinned"


@dataclass
class Pins:
    """The pins of one store, by backup id."""

    path: Path
    pins: dict[str, Pin] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Pins:
        """The store's pins; none when the file does not exist. A file that cannot be read stops the command
        (a cleanup that ignored it could remove a pinned backup)."""
        path = root / PINS_FILE
        try:
            return cls.parse(path.read_bytes(), path)
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise ToolkitError(f"the pins file {path} cannot be read ({exc}): nothing is removed until it is "
                               "mended or moved aside") from None

    @classmethod
    def parse(cls, data: bytes, path: Path) -> Pins:
        """Pins from the text of a pins file (`path` names where it came from, in the error)."""
        try:
            document = json.loads(data)
            return cls(path, {str(backup_id): Pin(**fields) for backup_id, fields in document["pins"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ToolkitError(f"the pins file {path} cannot be read ({exc}): nothing is removed until it is "
                               "mended or moved aside") from None

    def save(self) -> None:
        """Write the pins durably (only by the holder of the store's lock)."""
        document = {"format": PINS_FORMAT, "pins": {i: asdict(pin) for i, pin in sorted(self.pins.items())}}
        atomic_write(self.path, json.dumps(document, indent=1).encode() + b"\n")

    def pin(self, backup_id: str, reason: str, point: str | None = None) -> None:
        """Pin a backup, directly or for the restore point `point`; a new reason replaces the old one."""
        pin = self.pins.get(backup_id) or Pin(pinned_at=format_time(datetime.now(UTC)), direct=False)
        if point is None:
            pin.direct = True
        elif point not in pin.points:
            pin.points.append(point)
        if reason and (point is None or not pin.reason):  # a point's reason never replaces the operator's own
            pin.reason = reason
        self.pins[backup_id] = pin

    def unpin(self, backup_id: str, point: str | None = None) -> Pin | None:
        """Take away the direct pin (or the restore point's); what still pins it, or None when nothing does."""
        pin = self.pins.get(backup_id)
        if pin is None:
            return None
        if point is None:
            pin.direct = False
        elif point in pin.points:
            pin.points.remove(point)
        if not pin.direct and not pin.points:
            del self.pins[backup_id]
            return None
        return pin

    def holds(self) -> dict[str, list[str]]:
        """Each pinned backup's reason to stay, for plan_retention."""
        return {backup_id: [pin.describe()] for backup_id, pin in self.pins.items()}
