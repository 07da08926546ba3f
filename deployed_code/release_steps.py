"""What goes around switching a release in: shared paths linked in and BUILD_HOOK before, RESTART_HOOK and the
pruning of old releases after, and the switch back to a kept release that needs no copy.

BUILD_HOOK runs inside the new release before it is switched in (install dependencies, compile assets): a
failure or a hook past HOOK_TIMEOUT_SECONDS means no switch. RESTART_HOOK runs once the new release is live
(reload the application server): a failure is reported with the command that undoes the switch. Both run
without a shell, in their own process group (common.hooks), with RELEASE_PATH and DEPLOYMENT_DIR set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from backup_store.manifest import Backup, Entry, load_backup
from common.cli import Context, Result
from common.errors import EXIT_FAILED, ToolkitError
from common.hooks import HookFailed, hook_argv, hook_timeout, run_checked
from deployed_code.backups import KEPT_SWITCH, copy_backup, record_deployed, take_backup
from deployed_code.layout import Switched, releases_folder, switch_in
from deployed_code.linked import check_shared, link_shared, shared_folder
from deployed_code.paths import SCRIPT, TREE, CodePaths
from deployed_code.release_check import ReleaseCheck, check_release, describe, keep_what_was_learnt
from deployed_code.releases import (
    ReleaseManifest,
    add_backup,
    drop_manifest,
    is_tree_of,
    manifest_path,
    mark_switched,
    prune,
    read_manifest,
    release_for_backup,
    release_for_commit,
    write_manifest,
)
from deployed_code.source import CodeSource
from deployed_code.tree import code_excluder

BUILD_HOOK, RESTART_HOOK = "BUILD_HOOK", "RESTART_HOOK"


@dataclass
class KeptRelease:
    """A kept release whose tree is the one wanted, and what its check found."""

    folder: Path
    manifest: ReleaseManifest
    problems: list[str]
    hashed: int
    seconds: float
    rechecked: bool = False  # checked again after the confirmation prompt (counted in `hashed` and `seconds`)

    @property
    def ok(self) -> bool:
        """Whole and unchanged: it can be switched in as it is."""
        return not self.problems

    def to_json(self) -> dict:
        """For --json."""
        return {"path": str(self.folder), "ok": self.ok, "problems": self.problems, "hashed_files": self.hashed,
                "check_seconds": round(self.seconds, 3), "rechecked": self.rechecked}

    def line(self, dry_run: bool = False) -> str:
        """What the check found, for people."""
        if self.ok:
            files = self.manifest.file_count()
            return (f"kept release {self.folder} checked in {self.seconds * 1000:.0f} ms ({self.hashed} of {files} "
                    "files hashed): switched in as it is, no copy")
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        instead = "it would be built anew" if dry_run else "built anew instead"
        failed = "changed while the confirmation was asked" if self.rechecked else "failed its check"
        return f"kept release {self.folder} {failed}: {self.problems[0]}{more}; {instead}"


@dataclass
class Prepared:
    """A new tree ready for its switch."""

    hook_ran: bool  # BUILD_HOOK ran in it: it is more than the backup or commit it was made from
    manifest: ReleaseManifest | None  # what it holds, as it will be kept (symlink layout)

    def write_manifest(self, folder: Path) -> None:
        """Write the manifest beside the release, under its final name (just before the switch)."""
        if self.manifest is not None:
            self.manifest.release = folder.name
            write_manifest(self.manifest, folder)


@dataclass
class ReleaseSteps:
    """The settings and steps around a release switch (release-folder layouts)."""

    paths: CodePaths
    build: list[str] | None
    restart: list[str] | None
    timeout: float
    verify_all: bool

    @classmethod
    def from_settings(cls, ctx: Context, paths: CodePaths) -> ReleaseSteps:
        """Read and check BUILD_HOOK, RESTART_HOOK and LINKED_PATHS' shared files: a mistake stops the run
        (exit 2) before anything changes."""
        steps = cls(paths, hook_argv(ctx.settings, BUILD_HOOK), hook_argv(ctx.settings, RESTART_HOOK),
                    hook_timeout(ctx.settings), bool(getattr(ctx.args, "verify_all", False)))
        check_shared(steps.shared, paths.linked)
        return steps

    @property
    def live(self) -> Path:
        """DEPLOYMENT_DIR."""
        return self.paths.live

    @property
    def shared(self) -> Path:
        """Where LINKED_PATHS are kept."""
        return shared_folder(self.live)

    @property
    def releases(self) -> Path | None:
        """The symlink layout's releases folder (where releases are kept); None for a plain folder."""
        return releases_folder(self.live)

    @cached_property
    def excluded(self) -> Callable[[str], bool]:
        """What snapshots, and so release manifests, leave out."""
        return code_excluder(self.paths.exclude)

    # -- before the switch --------------------------------------------------------------------------------

    def prepare(self, folder: Path, known: dict[str, str] | None, commit: str | None = None,
                backup: Backup | None = None) -> Prepared:
        """Link the shared paths into the new tree, run BUILD_HOOK in it, and describe it for its manifest
        (symlink layout; `known` sha256 by path, the `commit` or `backup` it is the tree of). A failure raises:
        the caller removes the tree, and nothing is switched."""
        link_shared(folder, self.shared, self.paths.linked)
        if self.build is not None:
            run_checked(BUILD_HOOK, self.build, self.timeout, "nothing was switched; the new release was removed",
                        cwd=folder, env=self._hook_env(folder))
        ran = self.build is not None
        if self.releases is None:
            return Prepared(ran, None)
        # What BUILD_HOOK added or changed is read and hashed: only an untouched tree is the backup's as it is.
        manifest = describe(folder, self.excluded, None if ran else known, commit=commit,
                            backups=[backup] if backup and not ran else [])
        manifest.exclude = sorted(self.paths.exclude)
        return Prepared(ran, manifest)

    def kept_for_backup(self, backup: Backup, dry_run: bool) -> KeptRelease | None:
        """The kept release whose tree is the backup's, checked. Unless this is a dry run, one that fails its
        check is forgotten, and the stat of files the check read is recorded in the manifest of one that passes."""
        if self.releases is None:
            return None
        found = release_for_backup(self.releases, backup, CodeSource.load(backup).commit, self.excluded)
        return self._check(found, dry_run)

    def kept_for_commit(self, commit: str, dry_run: bool) -> KeptRelease | None:
        """The kept release exported from `commit`, checked (as kept_for_backup)."""
        found = release_for_commit(self.releases, commit) if self.releases is not None else None
        return self._check(found, dry_run)

    def recheck(self, kept: KeptRelease | None) -> KeptRelease | None:
        """A kept release that passed its check, checked again once the operator has confirmed (the question may
        have waited minutes): by stat, files in doubt hashed. One changed meanwhile is forgotten and built anew."""
        if kept is None or not kept.ok:
            return kept
        problems, hashed, seconds = self._run_check(kept.folder, kept.manifest, False, dry_run=False)
        return replace(kept, problems=problems, hashed=kept.hashed + hashed, seconds=kept.seconds + seconds,
                       rechecked=True)

    def _check(self, found: tuple[Path, ReleaseManifest] | None, dry_run: bool) -> KeptRelease | None:
        if found is None:
            return None
        problems, hashed, seconds = self._run_check(found[0], found[1], self.verify_all, dry_run)
        return KeptRelease(found[0], found[1], problems, hashed, seconds)

    def _run_check(self, folder: Path, manifest: ReleaseManifest, verify_all: bool, dry_run: bool
                   ) -> tuple[list[str], int, float]:
        """The release against its manifest: problems, files hashed, seconds taken."""
        started = time.perf_counter()
        try:
            check = check_release(folder, manifest, self.excluded, verify_all)
        except ValueError:
            check = ReleaseCheck([f"its manifest {manifest_path(folder)} cannot be read"], 0, 0)
        if check.problems and not dry_run:
            drop_manifest(folder)  # never switched to unchecked again; pruned in its turn
        elif not dry_run:  # so that the next check does not read them again
            keep_what_was_learnt(folder, manifest, check)
        return check.problems, check.hashed, time.perf_counter() - started

    # -- the switch to a kept release ---------------------------------------------------------------------------

    def switch_to_kept(self, ctx: Context, kept: KeptRelease, label: str, skipped: str | None,
                       deployed: Backup | None, commit: str | None) -> tuple[Result, Switched]:
        """Link the shared paths into the kept release, save the live tree (unless `skipped`), switch `current` to
        the release, record what is deployed (`deployed`, else a backup the release lists, else a new snapshot
        of it), prune, RESTART_HOOK."""
        started = time.perf_counter()
        # LINKED_PATHS may name more than when the release was built: linked before anything else changes.
        link_shared(kept.folder, self.shared, self.paths.linked)
        deployed = deployed or self._listed_backup(kept.manifest)
        safety = None if skipped else self._save_live(label, deployed, commit)
        switched, previous = self._switch_kept(kept, safety)
        deployed = self._record_kept(kept, deployed, commit)
        result = self._kept_result(kept, switched, safety, skipped, deployed, commit)
        result.data["seconds"] = {"total": time.perf_counter() - started}
        self.after_switch(ctx, result, previous, [safety.id] if safety else [])
        return result, switched

    def _save_live(self, label: str, deployed: Backup | None, commit: str | None) -> Backup:
        """The safety backup of the live tree, before a switch to a kept release."""
        if commit is not None and deployed is not None:
            # A rollback that makes no record of what it deployed names it here, for `history`.
            label = f"{label}{KEPT_SWITCH} {deployed.id}"
        return self._copy_of_live_release(label) or take_backup(self.paths, label, safety=True,
                                                                previous=self.snapshot_base())[0]

    def _copy_of_live_release(self, label: str) -> Backup | None:
        """When the live tree is a kept release that passes its check and lists a backup still in the store, the
        safety backup is a copy of that backup's entries: no snapshot of 20,000 files. None otherwise."""
        live = Path(os.path.realpath(self.live))
        manifest = read_manifest(live) if self.releases is not None and self.live.is_symlink() else None
        # A backup's entries are the live tree only under the exclusions both were made with: a path left out
        # since (a file now in LINKED_PATHS) is in the backup and not in the release as it is kept now.
        same_rules = manifest is not None and manifest.exclude == sorted(self.paths.exclude)
        source = self._listed_tree(manifest) if same_rules else None
        if source is None:
            return None
        try:
            check = check_release(live, manifest, self.excluded)
        except ValueError:  # a manifest that cannot be read: the snapshot reads the tree instead
            return None
        if check.problems:  # changed by hand since it went live: those changes are what the snapshot must keep
            return None
        keep_what_was_learnt(live, manifest, check)
        return copy_backup(self.paths, source, label)

    def _listed_tree(self, manifest: ReleaseManifest) -> Backup | None:
        """The newest backup the release lists, as recorded with its entries' sha256, that is still in the store."""
        return next((backup for backup in self._listed_in_store(manifest) if manifest.lists_tree_of(backup)), None)

    def _listed_in_store(self, manifest: ReleaseManifest) -> Iterator[Backup]:
        """The backups the release lists that are still in the store and readable, newest first (headers only)."""
        for backup_id in reversed(manifest.backups):
            folder = self.paths.store.root / backup_id
            try:
                backup = load_backup(folder, lazy=True) if folder.is_dir() else None
            except ToolkitError:
                continue
            if backup is not None:
                yield backup

    def _switch_kept(self, kept: KeptRelease, safety: Backup | None) -> tuple[Switched, Path | None]:
        """`current` switched to the kept release, marked as just used; the switch and the release it replaced."""
        previous = Path(os.path.realpath(self.live)) if self.live.is_symlink() else None
        switched = switch_in(kept.folder, self.live, link=True)
        mark_switched(kept.folder)
        self.remember_safety(previous, safety)
        return switched, previous

    def _record_kept(self, kept: KeptRelease, deployed: Backup | None, commit: str | None) -> Backup:
        """Record what is deployed now that the kept release is live: `deployed`, else a new snapshot of it (a
        rollback's), which its manifest then lists."""
        if deployed is None:
            deployed = take_backup(self.paths, f"deployed by rollback to {str(commit)[:12]}", safety=True,
                                   deployed_commit=commit)[0]
        if deployed.id not in kept.manifest.backups:
            add_backup(kept.folder, deployed, self.excluded)
        record_deployed(self.paths, deployed)
        return deployed

    @staticmethod
    def _kept_result(kept: KeptRelease, switched: Switched, safety: Backup | None, skipped: str | None,
                     deployed: Backup, commit: str | None) -> Result:
        """What a switch to a kept release did, for --json and for people."""
        ids = [safety.id] if safety else []
        data = {"kept_release": kept.to_json(), "switch": switched.to_json(), "safety_backup": ids[0] if ids else None,
                "safety_backup_skipped": skipped}
        lines = [kept.line()]
        if ids:
            lines.append(f"saved the previous code as {ids[0]}; to undo: {SCRIPT} restore {ids[0]} --yes")
        elif skipped:
            lines.append(f"no safety backup: {skipped}")
        # The audit line names first what the command names first: a restore its backup, a rollback its safety
        # backup (as when it builds the release).
        return Result(data, lines, backup_ids=[*ids, deployed.id] if commit is not None else [deployed.id, *ids])

    def _listed_backup(self, manifest: ReleaseManifest) -> Backup | None:
        """A backup the release's manifest lists that is still in the store and still its tree: the newest that
        records the release's commit (a rollback's record of what it deployed), else the newest."""
        found = []
        for backup in self._listed_in_store(manifest):
            if is_tree_of(manifest, backup, self.excluded):
                if CodeSource.load(backup).commit == manifest.commit:
                    return backup
                found.append(backup)
        return found[0] if found else None

    def snapshot_base(self) -> Backup | None:
        """What the safety backup of a live kept release links its unchanged files from: the newest backup its
        manifest lists, with each file's stat as the release has it where the two agree on its content, so an
        unchanged file is linked without being read. (The newest backup in the store is often of another
        release, whose files have other inodes: each file would be read and hashed.)"""
        if self.releases is None or not self.live.is_symlink():
            return None
        manifest = read_manifest(Path(os.path.realpath(self.live)))
        for backup_id in reversed(manifest.backups if manifest is not None else []):
            try:
                backup = load_backup(self.paths.store.root / backup_id)
                own = {f"{TREE}/{entry.path}": entry for entry in manifest.entries if entry.mtime_ns is not None}
            except (ToolkitError, ValueError):
                continue
            entries = []
            for entry in backup.entries:
                mine = own.get(entry.path)
                if entry.type == "file" and mine is not None and (mine.size, mine.sha256) == (entry.size,
                                                                                              entry.sha256):
                    entry = Entry(entry.path, "file", entry.mode, entry.size, entry.sha256, None, entry.uid,
                                  entry.gid, mine.mtime_ns, mine.ctime_ns, mine.ino)
                entries.append(entry)
            return replace(backup, entries=entries)
        return None

    def record_new_release(self, prepared: Prepared, made_from: Backup | None, commit: str | None, label: str
                           ) -> Backup:
        """Record what is deployed once a new tree is live, for verify: the backup it was built from, or else (a
        commit's tree, or one BUILD_HOOK added to) a snapshot of it, which its manifest then lists."""
        if made_from is not None and not prepared.hook_ran:
            deployed = made_from
        else:  # marked safety, so that `latest` stays the operator's own restore point
            deployed = take_backup(self.paths, label, safety=True, deployed_commit=commit)[0]
            if self.releases is not None:
                add_backup(Path(os.path.realpath(self.live)), deployed, self.excluded)
        record_deployed(self.paths, deployed)
        return deployed

    def remember_safety(self, previous: Path | None, safety: Backup | None) -> None:
        """The safety backup just taken of the release being replaced is that release's tree when nothing in it
        changed: its manifest then lists it, so undoing the switch is a switch back, not a copy."""
        if previous is not None and safety is not None and self.releases is not None:
            add_backup(previous, safety, self.excluded)

    # -- after the switch -------------------------------------------------------------------------------------

    def after_switch(self, ctx: Context, result: Result, previous: Path | None, ids: list[str]) -> None:
        """Prune old releases (never the live one or the one it replaced), then run RESTART_HOOK; its failure
        makes the result exit 1 with the command that undoes the switch."""
        new = Path(os.path.realpath(self.live))
        if self.releases is not None:
            try:
                removed = prune(self.releases, self.paths.keep_releases, [new, *([previous] if previous else [])])
            except (OSError, ToolkitError) as exc:  # the new release is live: a release left over is no failure
                ctx.warn(f"could not prune old releases in {self.releases}: {exc}")
                removed = []
            result.data["pruned_releases"] = [str(path) for path in removed]
            if removed:
                result.lines.append(f"pruned {len(removed)} old release(s) beyond KEEP_RELEASES="
                                    f"{self.paths.keep_releases}: {', '.join(path.name for path in removed)}")
        if self.restart is None:
            return
        undo = f"to undo: {SCRIPT} restore {ids[0]} --yes" if ids else "no safety backup was taken"
        try:
            hook = run_checked(RESTART_HOOK, self.restart, self.timeout, f"the new code is live in {self.live}; "
                               f"{undo}", cwd=self.live, env=self._hook_env(new))
        except ToolkitError as exc:  # HookFailed, or a hook that could not be started
            result.data["restart_hook"] = exc.hook.to_json() if isinstance(exc, HookFailed) else None
            result.lines.append(f"{SCRIPT}: error: {exc}")
            result.exit_code = EXIT_FAILED
            return
        result.data["restart_hook"] = hook.to_json()
        result.lines.append(hook.line())

    def _hook_env(self, release: Path) -> dict[str, str]:
        return {"RELEASE_PATH": str(release.absolute()), "DEPLOYMENT_DIR": str(self.live.absolute())}
