"""Where the live configuration is (CONFIG_DIR and ENV_FILE), where its backups go, and where each lives in a backup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backup_store.store import BackupStore
from common.components import CONFIG
from common.errors import SettingError
from common.files import is_inside
from common.settings import Settings
from offsite.pull import open_store

TREE = "config"  # where CONFIG_DIR lives inside a backup
ENV_ENTRY = "env_file"  # where ENV_FILE lives inside a backup


@dataclass
class ConfigPaths:
    """The live configuration and its store, from the settings."""

    config_dir: Path
    env_file: Path
    store: BackupStore

    @classmethod
    def from_settings(cls, settings: Settings) -> ConfigPaths:
        """CONFIG_DIR, ENV_FILE and CONFIG_BACKUP_DIR with the documented defaults; backups inside CONFIG_DIR
        are refused (each backup would copy the ones before it, until a name grew too long)."""
        paths = cls(
            config_dir=settings.path("CONFIG_DIR", "./config"),
            env_file=settings.path("ENV_FILE", ".env"),
            store=open_store(settings, CONFIG),
        )
        if is_inside(paths.store.root, paths.config_dir):
            raise SettingError(f"CONFIG_BACKUP_DIR {paths.store.root} is inside CONFIG_DIR {paths.config_dir}: "
                               "keep the backups outside the configuration they back up", setting=CONFIG.store_setting)
        return paths

    @property
    def env_in_tree(self) -> bool:
        """An ENV_FILE inside CONFIG_DIR is already part of the tree."""
        return self.config_dir.is_dir() and is_inside(self.env_file, self.config_dir)
