"""What a configuration backup records of where it came from: the manifest's `source`, typed.

A configuration backup records nothing in the manifest's `extra` beyond what the store writes for every
backup (its kind), so `source` is all there is to describe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from backup_store.manifest import Backup


@dataclass
class ConfigSource:
    """The host, CONFIG_DIR and ENV_FILE a backup was taken from, and which of them it holds.

    Fields are named as the manifest's keys. Each has a default, so a manifest written before a key
    existed still loads; values are kept as recorded (a reader tests them for truth, as it always has).
    """

    host: str | None = None
    config_dir: str | None = None  # resolved, when taken
    env_file: str | None = None  # resolved, when taken
    env_file_present: bool = False  # the backup holds ENV_FILE (on its own or inside the tree)
    env_file_in_config_dir: bool = False  # ENV_FILE was inside CONFIG_DIR, so the tree holds it
    config_dir_present: bool = True  # a safety backup taken after CONFIG_DIR was deleted holds no tree

    @classmethod
    def load(cls, backup: Backup) -> ConfigSource:
        """Read a backup's source; keys it lacks take their defaults, keys this version does not know are left."""
        return cls.from_dict(backup.source)

    @classmethod
    def from_dict(cls, source: dict) -> ConfigSource:
        """Read a manifest's `source` dict (see load)."""
        return cls(**{field.name: source.get(field.name, field.default) for field in fields(cls)})

    def dump(self) -> dict:
        """The manifest's `source` dict, key for key as configuration backups have always written it."""
        return asdict(self)
