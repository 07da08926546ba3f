"""What the store and the audit log record of the code's deploys (restores, rollbacks) and backups.

The entries come from the store. A backup taken with `backup` is one. A rollback leaves a record of the tree
it deployed: a safety backup labelled "deployed by rollback to SHA", taken right after the switch, just after
the safety backup "before rollback to SHA" of what it replaced; one that switches back to a kept release
makes no record (the release has its backup) and names that backup in its safety backup's label instead
(deployed_code.backups.KEPT_SWITCH). A restore leaves that safety backup, "before
restore of ID", taken while the backup's tree is built. The audit log adds who ran each and when, and the
restores that left no safety backup (--no-backup, a new host); it is read one line at a time, and only the
lines of this store's backups are kept.
"""

from __future__ import annotations

import json
import os
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from backup_store.manifest import MANIFEST, Backup, backup_from_manifest, format_time
from backup_store.store import BackupStore
from common.audit import AuditRecord
from common.errors import ToolkitError
from deployed_code.backups import KEPT_SWITCH, deployed_id
from deployed_code.commits import SHA, Commit
from deployed_code.paths import CodePaths
from deployed_code.source import CodeSource

RESTORE, ROLLBACK, BACKUP = "restore", "rollback", "backup"  # the events, named as the commands that make them
# The labels rollback.py and restore.py give the backups they take.
_ROLLBACK_RECORD = re.compile(r"deployed by rollback to ([0-9a-f]{7,64})")
_BEFORE_RESTORE = re.compile(r"before restore of (\S+)")
_KEPT_SWITCH = re.compile(rf"before rollback to ([0-9a-f]{{7,64}}){re.escape(KEPT_SWITCH)} (\S+)")


@dataclass
class Deploy:
    """One entry: a tree made live (a restore or a rollback), or a backup taken of the live tree."""

    event: str  # RESTORE, ROLLBACK or BACKUP
    backup: str  # the backup of its tree: the one restored, the rollback's record, the one taken
    when: datetime  # as exactly as the store knows it: the order of the entries
    at: str  # shown: the run's start from the audit log, else the store's time
    commit: str | None
    host: str | None
    label: str | None = None
    safety_backup: str | None = None  # what it replaced, saved: restoring it undoes the deploy
    by: str | None = None
    audited: bool = False
    live: bool = False
    described: Commit | None = None  # what REPO_PATH says of the commit
    release: str | None = None  # symlink layout: its folder in the releases folder, while kept
    release_kept: bool | None = None

    def ran(self, record: AuditRecord) -> None:
        """Who ran it and when, from its run's audit line."""
        self.by, self.at, self.host, self.audited = record.user, record.shown_time, record.host or self.host, True

    def to_json(self) -> dict:
        """For --json."""
        about = self.described
        return {"event": self.event, "backup": self.backup, "at": self.at, "by": self.by, "host": self.host,
                "audited": self.audited, "commit": self.commit, "tags": about.tags if about else [],
                "author": about.author if about else None, "author_email": about.author_email if about else None,
                "subject": about.subject if about else None, "in_repo": about is not None if self.commit else None,
                "label": self.label, "safety_backup": self.safety_backup, "live": self.live,
                "release": self.release, "release_kept": self.release_kept}


def deploys_on_record(store: StoredBackups, runs: Iterable[AuditRecord], limit: int | None) -> list[Deploy]:
    """The entries, newest first (the newest `limit`), with who ran each and when where `runs` tell it.

    `runs` are the code script's runs as the audit log has them, oldest first."""
    deploys = _from_store(store, limit)
    _add_runs(deploys, store, runs, limit)
    return sorted(deploys, key=lambda deploy: (deploy.when, deploy.backup), reverse=True)[:limit]


def live_backup_id(paths: CodePaths, store: StoredBackups) -> str | None:
    """What verify compares the live tree with: the last restore's or rollback's backup, else the newest taken
    with `backup` (see deployed_code.backups.deployed_backup)."""
    backup_id = deployed_id(paths)
    if backup_id is not None and backup_id in store.index:
        return backup_id
    return next((i for i in store.ids if (backup := store.get(i)) is not None and not backup.is_safety), None)


def commit_of(backup: Backup) -> str | None:
    """The commit a code backup recorded, if it is a well-formed sha."""
    commit = CodeSource.load(backup).commit
    return commit if isinstance(commit, str) and SHA.fullmatch(commit) else None


# -- the store ----------------------------------------------------------------------------------------


class StoredBackups:
    """The store's backups by id, newest first; each manifest is read (less its file entries) when first needed."""

    def __init__(self, store: BackupStore):
        self.root, self.component = store.root, store.component
        self.ids = [os.path.basename(folder) for folder in store.backup_folders()]
        self.index = {backup_id: n for n, backup_id in enumerate(self.ids)}
        self._read: dict[str, Backup | None] = {}

    def get(self, backup_id: str) -> Backup | None:
        """The backup of that id, or None when the store has none it can read."""
        if backup_id not in self.index:
            return None
        if backup_id not in self._read:
            self._read[backup_id] = _read_head(self.root / backup_id, self.component)
        return self._read[backup_id]

    def older(self, backup_id: str) -> Backup | None:
        """The backup taken just before this one."""
        n = self.index[backup_id] + 1
        return self.get(self.ids[n]) if n < len(self.ids) else None


def _read_head(folder: Path, component: str) -> Backup | None:
    """A backup as its manifest tells it, less the file entries (a code manifest can list 20,000 of them)."""
    try:
        data = json.loads((folder / MANIFEST).read_bytes())
        data["entries"] = []
        backup = backup_from_manifest(folder, data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ToolkitError):
        return None
    ok = backup.id == folder.name and backup.component == component and isinstance(backup.source, dict)
    return backup if ok else None


def _from_store(store: StoredBackups, limit: int | None) -> list[Deploy]:
    """The entries the store records, newest first; with `limit`, only as many (the older cannot show)."""
    deploys = []
    for backup_id in store.ids:
        if limit is not None and len(deploys) >= limit:
            break
        backup = store.get(backup_id)
        deploy = _entry_of(backup, store) if backup is not None else None
        if deploy is not None:
            deploys.append(deploy)
    return deploys


def _entry_of(backup: Backup, store: StoredBackups) -> Deploy | None:
    """The entry a backup records: itself, a rollback, a restore; None for other safety backups."""
    at = format_time(backup.created_at)
    if not backup.is_safety:
        return Deploy(BACKUP, backup.id, backup.created_at, at, commit_of(backup), backup.host, label=backup.label)
    label = backup.label if isinstance(backup.label, str) else ""
    if match := _ROLLBACK_RECORD.fullmatch(label):
        before = store.older(backup.id)  # the rollback's own safety backup, if it took one
        safety = before.id if before and before.is_safety and before.label == f"before rollback to {match[1]}" else None
        return Deploy(ROLLBACK, backup.id, backup.created_at, at, commit_of(backup), backup.host,
                      safety_backup=safety)
    if match := _KEPT_SWITCH.fullmatch(label):  # a rollback to a kept release: the switch right after this
        target = store.get(match[2])
        return Deploy(ROLLBACK, target.id, backup.created_at, at, commit_of(target), backup.host,
                      safety_backup=backup.id) if target else None
    match = _BEFORE_RESTORE.fullmatch(label)
    target = store.get(match[1]) if match else None
    return _restore(target, backup.created_at, at, backup.host, backup.id) if target else None


def _restore(target: Backup, when: datetime, at: str, host: str | None, safety: str | None) -> Deploy:
    return Deploy(RESTORE, target.id, when, at, commit_of(target), host, label=target.label, safety_backup=safety)


# -- the audit log ------------------------------------------------------------------------------------


def _add_runs(deploys: list[Deploy], store: StoredBackups, runs: Iterable[AuditRecord], limit: int | None) -> None:
    """Who ran each entry and when, from its run's audit line; and the restores that left no safety backup.

    A backup's and a restore's lines name their backups. A rollback's names its safety backup (the one
    before its record); one run with --no-backup is known by its time: the record is made during the run."""
    taken = {d.backup: d for d in deploys if d.event == BACKUP}
    restored = {d.safety_backup: d for d in deploys if d.event == RESTORE}
    rollbacks = sorted((d for d in deploys if d.event == ROLLBACK), key=lambda d: d.when)
    after_safety = {d.safety_backup: d for d in rollbacks if d.safety_backup}
    unanchored = [d for d in rollbacks if not d.safety_backup]
    times = [d.when for d in unanchored]
    timed_runs: list[AuditRecord] = []
    unrecorded: deque[tuple[AuditRecord, datetime | None]] = deque(maxlen=limit)  # only the newest can be listed
    last: datetime | None = None  # the store's time of the newest entry a run before this one was matched to
    for run in runs:
        first = run.backup_ids[0] if run.backup_ids else None
        if not run.changed_something or (first is None and run.command != ROLLBACK):
            continue
        matched = None
        if run.command == BACKUP and first in taken:
            matched = taken[first]
        elif run.command == RESTORE and first in store.index:
            safety = run.backup_ids[1] if len(run.backup_ids) > 1 else None
            if safety is not None and safety in restored:
                matched = restored[safety]
            elif safety not in store.index:  # none taken, or removed since: the line is all there is
                unrecorded.append((run, last))
        elif run.command == ROLLBACK:
            if first is not None and first in after_safety:
                matched = after_safety[first]
            elif first not in store.index and _in_a_window(run, times):
                timed_runs.append(run)
            elif first in store.index and not _is_rollback_safety(store, first):
                unrecorded.append((run, last))  # a switch back to a kept release with --no-backup: it names its tree
        if matched is not None:
            matched.ran(run)
            last = max(last, matched.when) if last else matched.when
    _match_by_time(unanchored, timed_runs)
    for run, after in unrecorded:
        target = store.get(run.backup_ids[0])
        if target is None:
            continue
        if run.command == ROLLBACK:
            # Runs on a store hold its lock, one after another: this one comes after the entry the run before
            # it made (the line's start is to the second only, and that run may have ended in the same second).
            when = max(run.time, after + timedelta(microseconds=1)) if after else run.time
            deploy = Deploy(ROLLBACK, target.id, when, run.shown_time, commit_of(target), run.host)
        else:
            deploy = _restore(target, _window(run)[1], run.shown_time, run.host, None)
        deploy.ran(run)
        deploys.append(deploy)


def _is_rollback_safety(store: StoredBackups, backup_id: str) -> bool:
    """Whether a backup is a rollback's safety backup (its entry may be past --limit): not what it deployed."""
    backup = store.get(backup_id)
    return backup is not None and isinstance(backup.label, str) and backup.label.startswith("before rollback to ")


def _window(run: AuditRecord) -> tuple[datetime, datetime]:
    """When the run was going: the line has its start to the second, and its duration."""
    return run.time, run.time + timedelta(seconds=1 + run.duration_s)


def _in_a_window(run: AuditRecord, times: list[datetime]) -> bool:
    start, end = _window(run)
    n = bisect_left(times, start)
    return n < len(times) and times[n] <= end


def _match_by_time(rollbacks: list[Deploy], runs: list[AuditRecord]) -> None:
    """Pair rollback records (oldest first) with the runs that made them, in one pass: runs on a store hold its
    lock, so both go in the same order; a record without its run's line, or a run whose record is gone, is
    passed over."""
    runs = sorted(runs, key=lambda run: run.time)
    i = j = 0
    while i < len(rollbacks) and j < len(runs):
        start, end = _window(runs[j])
        if rollbacks[i].when < start:
            i += 1
        elif rollbacks[i].when > end:
            j += 1
        else:
            rollbacks[i].ran(runs[j])
            i, j = i + 1, j + 1
