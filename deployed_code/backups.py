"""Code backups: the snapshot of the live tree (also taken on a thread while a restore builds), which backup
is deployed, and the `backup` and `list` commands."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backup_store.manifest import Backup, load_backup
from backup_store.objects import OBJECTS, stored_names
from backup_store.staging import reusable_entries
from backup_store.store import BACKUP_ID
from commands.store_commands import list_backups
from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from common.files import atomic_write
from common.progress import Progress, no_progress
from common.signals import SIGNAL_CHECK_SECONDS, stop_signals_held
from common.text import human_size
from deployed_code.git import git_state
from deployed_code.paths import SCRIPT, TREE, CodePaths
from deployed_code.snapshot import SnapshotStats, snapshot_tree
from deployed_code.source import CodeSource

DEPLOYED = "deployed.json"  # in the store: which backup the live tree was last made from

# How a rollback that switches back to a kept release labels its safety backup: "before rollback to SHA" and
# this, then the id of the backup it deployed (it takes no "deployed by rollback" record: the release has one).
KEPT_SWITCH = ", switching to the kept release of"


def take_backup(paths: CodePaths, label: str | None, safety: bool = False, progress: Progress = no_progress,
                deployed_commit: str | None = None, cancelled: Callable[[], bool] | None = None,
                previous: Backup | None = None) -> tuple[Backup, dict]:
    """Snapshot the deployed tree, reusing the content of files unchanged since `previous` without reading them
    (default: the newest backup; caller holds the lock).

    `deployed_commit` (after a rollback) is recorded as the backup's commit instead of REPO_PATH's HEAD;
    `cancelled` stops a snapshot taken on a thread (see snapshot_tree)."""
    previous = previous or paths.store.newest()
    stats = SnapshotStats()
    with paths.store.new_backup(label, safety=safety) as staging:
        source = live_source(paths)
        if deployed_commit:
            source.commit = deployed_commit
        staging.source = source.dump()
        # The previous backup's size is the estimate: code trees change little between deploys.
        with progress(f"backing up {paths.live}", lambda: stats.bytes, previous.size if previous else None):
            snapshot_tree(staging, paths.live, TREE, previous, paths.exclude, stats, cancelled)
    return staging.backup, stats.to_json()


def live_source(paths: CodePaths) -> CodeSource:
    """What a backup of the live tree records of it now: host, layout, path, the release folder `current` points
    at (symlink layout), and the repository's HEAD."""
    release = os.path.basename(os.path.realpath(paths.live)) if paths.live.is_symlink() else None
    return CodeSource(host=os.uname().nodename, layout=paths.layout, live=str(paths.live.absolute()),
                      release=release, **git_state(paths.repo))


def copy_backup(paths: CodePaths, source: Backup, label: str) -> Backup | None:
    """A safety backup of the live tree when it is known to be `source`'s tree: `source`'s entries as they are,
    with what is deployed now (host, HEAD) as its source; None when they cannot be reused (caller holds the lock).

    No file of the tree is read: only `source`'s manifest (its entries' sha256 checked) and the names objects/
    lists, so a switch between kept releases saves the one it replaces without a snapshot of 20,000 files."""
    objects = str(paths.store.root / OBJECTS)
    entries_json = reusable_entries(source, objects, stored_names(objects)) if os.path.isdir(objects) else None
    if entries_json is None:
        return None
    with paths.store.new_backup(label, safety=True) as staging:
        staging.source = live_source(paths).dump()
        staging.share_payload()
        staging.reuse_entries(entries_json, source.extra["files"], source.extra["size"])
    return staging.backup


def back_up(ctx: Context) -> Result:
    """backup: snapshot the deployed tree."""
    paths = CodePaths.from_settings(ctx.settings)
    if not os.path.isdir(paths.live):  # a new host before its first deploy
        what = "points at nothing" if paths.live.is_symlink() else "does not exist yet"
        raise UsageError(f"{paths.live} {what}: nothing to back up (on a new host, `{SCRIPT} rollback` or "
                         "`restore` creates it)")
    if ctx.dry_run:
        return Result({"dry_run": True, "live": str(paths.live)}, [f"would back up {paths.live}"], report=True)
    with paths.store.lock(f"{SCRIPT} backup"):
        backup, stats = take_backup(paths, ctx.args.label, progress=ctx.progress)
    commit = CodeSource.load(backup).commit
    return Result({"backup": backup.summary(), "snapshot": stats, "commit": commit},
                  [f"backup {backup.id}: {len(backup.files)} files, {human_size(backup.size)} "
                   f"({stats['copied']} copied, {stats['linked'] + stats['rehashed']} unchanged and linked)"
                   + (f", commit {commit[:12]}" if commit else "")], backup_ids=[backup.id])


def list_code_backups(ctx: Context) -> Result:
    """list: the backups, newest first, with the commit each was taken at."""
    return list_backups(CodePaths.from_settings(ctx.settings).store,
                        {"COMMIT": lambda b: (CodeSource.load(b).commit or "-")[:12]})


# -- which backup is deployed ---------------------------------------------------------------------------


def record_deployed(paths: CodePaths, backup: Backup) -> None:
    """Remember which backup the live tree now is, for verify."""
    atomic_write(paths.store.root / DEPLOYED, json.dumps({"backup": backup.id}).encode())


def deployed_id(paths: CodePaths) -> str | None:
    """The id of the backup the live tree was last restored or rolled back to, if recorded (and well formed)."""
    return deployed_id_in(paths.store.root)


def deployed_id_in(store_root: Path) -> str | None:
    """deployed_id, for the code store in `store_root`."""
    try:
        backup_id = json.loads((store_root / DEPLOYED).read_text())["backup"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return backup_id if isinstance(backup_id, str) and BACKUP_ID.fullmatch(backup_id) else None


def deployed_hold(store_root: Path) -> dict[str, list[str]]:
    """What a cleanup of the code store keeps whatever its rules: the backup the live tree was last restored or
    rolled back to (verify compares the tree with it). A record that exists but cannot be read stops it."""
    if not os.path.lexists(store_root / DEPLOYED):
        return {}
    backup_id = deployed_id_in(store_root)
    if backup_id is None:
        raise ToolkitError(f"{store_root / DEPLOYED} cannot be read: which backup the live tree was restored from "
                           "is not known, so nothing is removed until it is mended or removed")
    return {backup_id: ["what the live tree was restored from"]}


def deployed_backup(paths: CodePaths) -> Backup | None:
    """The backup of the last restore, else the newest backup."""
    backup_id = deployed_id(paths)
    if backup_id is not None and (paths.store.root / backup_id).is_dir():
        return load_backup(paths.store.root / backup_id)
    return paths.store.latest()


# -- the safety backup taken meanwhile ------------------------------------------------------------------


class SafetyBackupMeanwhile:
    """The safety backup of the live tree, taken on a thread while the new tree is built.

    The snapshot mostly stats and links on one core while the build's copies keep the others busy, so
    a restore costs about the build alone. Leaving the block waits for the snapshot and raises its
    error. When the block fails, or a stop signal comes, the snapshot is cancelled (its staging folder
    removed) and waited for before the error goes on; one that had finished is `backup`.
    """

    def __init__(self, paths: CodePaths, label: str, previous: Backup | None = None):
        self.paths, self.label, self.previous = paths, label, previous
        self.backup: Backup | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._take, name="safety-backup", daemon=True)

    def _take(self) -> None:
        started = time.perf_counter()
        try:
            self.backup = take_backup(self.paths, self.label, safety=True, cancelled=self.stop.is_set,
                                      previous=self.previous)[0]
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread when it leaves the block
            self.error = exc
        self.seconds = time.perf_counter() - started

    def __enter__(self) -> SafetyBackupMeanwhile:
        try:
            with stop_signals_held(self.stop.set):
                self.thread.start()
        except BaseException:  # stopped while starting: the cancelled snapshot ends before the stop goes on
            self._wait(cancel=True)
            raise
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        self._wait(cancel=error is not None)
        if error is None and self.error is not None:
            raise self.error

    def _wait(self, cancel: bool) -> None:
        """Wait for the snapshot to end; a stop signal meanwhile cancels it, and is delivered once it has ended."""
        if cancel:
            self.stop.set()
        with stop_signals_held(self.stop.set):
            while self.thread.ident is not None and self.thread.is_alive():
                self.thread.join(SIGNAL_CHECK_SECONDS)
