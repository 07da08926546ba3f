"""What a database backup records: where the dump came from (the manifest's `source`) and what it holds
(keys of the manifest's own, its `extra`), typed, with the keys and values written since the first backup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from backup_store.manifest import Backup


@dataclass
class DbBackupInfo:
    """One database backup's description. Every field defaults to None: an older manifest may lack a key."""

    # The manifest's `source`, in this order.
    host: str | None = None  # the machine the backup was taken on
    db_host: str | None = None  # DB_HOST: a host name, an address or a socket folder
    db_port: int | None = None
    database: str | None = None  # DB_NAME, the database dumped
    user: str | None = None
    # Keys of the manifest itself (a Backup's `extra`), in this order.
    dump_format: str | None = None  # custom or directory
    server_version: str | None = None  # e.g. "16.4"
    pg_dump_version: int | None = None  # the major version of the pg_dump that made the dump
    database_size: int | None = None  # pg_database_size when dumped: what a restore needs room for
    migration_version: str | None = None  # the newest applied migration's id; None before the first migrate
    has_globals: bool | None = None  # whether globals.sql (pg_dumpall --globals-only) is kept; None: taken before
    role_passwords: bool | None = None  # whether that file holds the roles' password hashes

    SOURCE_KEYS: ClassVar[tuple[str, ...]] = ("host", "db_host", "db_port", "database", "user")
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ("dump_format", "server_version", "pg_dump_version", "database_size",
                                             "migration_version", "has_globals", "role_passwords")

    @classmethod
    def load(cls, backup: Backup) -> DbBackupInfo:
        """The description a backup's manifest holds (keys it lacks are None)."""
        return cls.from_dicts(backup.source, backup.extra)

    @classmethod
    def from_dicts(cls, source: dict, extra: dict) -> DbBackupInfo:
        """The description from a manifest's `source` and its other keys; keys of other kinds are ignored."""
        return cls(**{key: source.get(key) for key in cls.SOURCE_KEYS},
                   **{key: extra.get(key) for key in cls.EXTRA_KEYS})

    def dump(self) -> tuple[dict, dict]:
        """(source, extra) as a new backup's staging takes them: every key, in the order written since the first."""
        return ({key: getattr(self, key) for key in self.SOURCE_KEYS},
                {key: getattr(self, key) for key in self.EXTRA_KEYS})

    @classmethod
    def set_in(cls, extra: dict, **fields: object) -> None:
        """Set fields in the `extra` of a backup being built (staging.extra), after its first dump()."""
        for key, value in fields.items():
            if key not in cls.EXTRA_KEYS:
                raise KeyError(f"{key} is not a field of the manifest's own keys")
            extra[key] = value

    @property
    def migration_number(self) -> int | None:
        """The version number of migration_version (1 for `001_initial_schema`), None when there is none."""
        if self.migration_version is None:
            return None
        return int(self.migration_version.split("_", 1)[0])
