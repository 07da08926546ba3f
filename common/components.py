"""The table of components: what each script backs up, where its store lives, its recovery time objective.

The scripts and restore points read it alike, so a component's store is found the same way from its own
script, from `rollback.py` and from a drill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.settings import Settings


@dataclass(frozen=True)
class Component:
    """One component: its name in backup ids and manifests, its script, its store and its objective."""

    name: str  # config, code, db, point
    title: str  # for people: configuration, code, database, restore point
    script: str
    store_setting: str  # the variable naming its backup folder
    default_folder: str  # that folder when the variable is unset
    configured_by: tuple[str, ...] = ()  # set up when any of these settings is set
    rto_setting: str | None = None  # its recovery time objective, in seconds
    rto_default: float | None = None  # the runbook's objective

    def store_path(self, settings: Settings) -> Path:
        """The component's backup folder, from its setting or the default."""
        return settings.path(self.store_setting, self.default_folder)

    def configured(self, settings: Settings) -> bool:
        """Whether the operator has set this component up (its folder or database is named)."""
        return any(settings.text(name) for name in self.configured_by)


CONFIG = Component("config", "configuration", "config_rollback.py", "CONFIG_BACKUP_DIR", "./config_backups",
                   ("CONFIG_DIR",), "RTO_CONFIG_SECONDS", 300.0)
CODE = Component("code", "code", "code_rollback.py", "CODE_BACKUP_DIR", "./code_backups",
                 ("DEPLOYMENT_DIR", "REPO_PATH"), "RTO_CODE_SECONDS", 900.0)
DATABASE = Component("db", "database", "database_rollback.py", "BACKUP_DIR", "./backups",
                     ("DB_NAME",), "RTO_DATABASE_SECONDS", 1800.0)
POINTS = Component("point", "restore point", "rollback.py", "POINTS_DIR", "./restore_points")

PARTS = (CONFIG, CODE, DATABASE)  # what a restore point holds, in the runbook's order
BY_NAME = {component.name: component for component in PARTS}
