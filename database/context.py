"""What every database command works with: the server, the store, pg_dump/pg_restore and the migrations
folder, all from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backup_store.manifest import Backup
from backup_store.store import BackupStore
from common.components import DATABASE
from common.settings import Settings
from database.backup_info import DbBackupInfo
from database.dumps import PgTools
from database.server import DbServer
from offsite.pull import open_store

SCRIPT = DATABASE.script  # names the store lock's holder, and the commands a report tells the operator to run


@dataclass
class DbContext:
    """The server, the store, the tools and the migrations folder, from the settings."""

    server: DbServer
    store: BackupStore
    tools: PgTools
    migrations_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> DbContext:
        """DB_*, BACKUP_DIR (./backups), MIGRATIONS_DIR (./migrations), PG_BINDIR (PATH if unset)."""
        return cls(
            server=DbServer.from_settings(settings),
            store=open_store(settings, DATABASE),
            tools=PgTools(settings.path("PG_BINDIR")),
            migrations_dir=settings.path("MIGRATIONS_DIR", "./migrations"),
        )

    def is_own(self, backup: Backup) -> bool:
        """Whether a backup is of DB_NAME (one BACKUP_DIR may hold backups of several databases)."""
        return DbBackupInfo.load(backup).database == self.server.name
