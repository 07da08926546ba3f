"""Where the code component works: the live tree, the git repository and the store, from the settings."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from backup_store.store import BackupStore
from common.components import CODE
from common.errors import UsageError
from common.settings import Settings
from deployed_code.linked import SETTING as LINKED_SETTING
from deployed_code.linked import LinkedPath, parse_linked
from deployed_code.source import LAYOUT_IN_PLACE, LAYOUT_RELEASE
from offsite.pull import open_store

SCRIPT = CODE.script  # named in the commands printed for people (undo, cleanup)
TREE = "tree"  # where the deployed tree lives inside a backup


@dataclass
class CodePaths:
    """The deployed code, the repository and the store, from the settings."""

    repo: Path | None
    deployment: Path | None
    store: BackupStore
    exclude: list[str]  # what snapshots leave out: CODE_EXCLUDE, and each linked path at the top
    linked: list[LinkedPath] = field(default_factory=list)
    keep_releases: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> CodePaths:
        """REPO_PATH, DEPLOYMENT_DIR, CODE_BACKUP_DIR (./code_backups), CODE_EXCLUDE (comma or space separated),
        LINKED_PATHS and KEEP_RELEASES (5)."""
        linked = parse_linked(settings.text(LINKED_SETTING))
        return cls(
            repo=settings.path("REPO_PATH"),
            deployment=settings.path("DEPLOYMENT_DIR"),
            store=open_store(settings, CODE),
            exclude=[p for p in re.split(r"[,\s]+", settings.text("CODE_EXCLUDE", "")) if p]
            + [item.pattern for item in linked],
            linked=linked,
            keep_releases=settings.integer("KEEP_RELEASES", 5, minimum=1),
        )

    @property
    def in_place(self) -> bool:
        """The git working copy is what runs (DEPLOYMENT_DIR unset or the same as REPO_PATH)."""
        if self.deployment is None:
            return True
        return self.repo is not None and os.path.realpath(self.deployment) == os.path.realpath(self.repo)

    @property
    def layout(self) -> str:
        """LAYOUT_IN_PLACE or LAYOUT_RELEASE, as a backup records it."""
        return LAYOUT_IN_PLACE if self.in_place else LAYOUT_RELEASE

    @property
    def live(self) -> Path:
        """The tree that is backed up and replaced."""
        live = self.repo if self.in_place else self.deployment
        if live is None:
            raise UsageError("neither DEPLOYMENT_DIR nor REPO_PATH is set: set the folder the code runs from")
        return live
