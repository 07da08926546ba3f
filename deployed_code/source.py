"""What a code backup records of where it was taken: the manifest's `source`, as one typed object."""

from __future__ import annotations

from dataclasses import dataclass

from backup_store.manifest import Backup

LAYOUT_IN_PLACE = "in-place"  # the git working copy is what runs
LAYOUT_RELEASE = "release"  # DEPLOYMENT_DIR, a folder or a `current` symlink, is what runs


@dataclass
class CodeSource:
    """The host, layout and live tree of a code backup, and where the repository's HEAD was.

    Every field has a default, so an old manifest that lacks a key still loads; values are kept as the
    manifest has them (a crafted one may hold anything: readers check before they trust)."""

    host: str | None = None
    layout: str | None = None  # LAYOUT_IN_PLACE or LAYOUT_RELEASE
    live: str | None = None  # the tree that was backed up
    release: str | None = None  # the release folder `live` pointed at, in a symlink layout
    commit: str | None = None  # HEAD's commit, or the commit a rollback deployed
    branch: str | None = None  # None: HEAD was detached
    dirty: bool | None = None  # local changes; None: no repository was recorded
    unborn: bool = False  # HEAD was on a branch with no commit yet

    @classmethod
    def load(cls, backup: Backup) -> CodeSource:
        """The source recorded in a code backup's manifest."""
        return cls.from_dict(backup.source)

    @classmethod
    def from_dict(cls, source: dict) -> CodeSource:
        """From a manifest's `source` dict (keys this version does not know are ignored)."""
        return cls(host=source.get("host"), layout=source.get("layout"), live=source.get("live"),
                   release=source.get("release"), commit=source.get("commit"), branch=source.get("branch"),
                   dirty=source.get("dirty"), unborn=source.get("unborn", False))

    def dump(self) -> dict:
        """The manifest's `source` dict, with the keys and in the order backups have always written them.

        The repository's commit, branch and dirty go together (git_state), unborn only when true; without a
        repository only a commit a rollback deployed is recorded."""
        source = {name: value for name, value in (("host", self.host), ("layout", self.layout),
                                                  ("live", self.live), ("release", self.release))
                  if value is not None}
        if self.dirty is not None:
            source.update(commit=self.commit, branch=self.branch, dirty=self.dirty)
        elif self.commit is not None:
            source["commit"] = self.commit
        if self.unborn:
            source["unborn"] = True
        return source

    @property
    def in_place(self) -> bool:
        """Taken of a git working copy (restoring it puts HEAD back too)."""
        return self.layout == LAYOUT_IN_PLACE
