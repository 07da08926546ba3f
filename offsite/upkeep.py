"""Keeping the off-host copies sound: verify every object a manifest names, and remove what no backup needs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from backup_store.manifest import MANIFEST, Backup, Entry
from backup_store.pins import Pin
from backup_store.retention import RetentionPlan, RetentionPolicy, plan_retention
from backup_store.store import BackupStore
from common.components import POINTS
from common.errors import ToolkitError
from offsite.push import push
from offsite.remote import CANDIDATES, PINS, Remote, RemoteBackup, UnreadableManifest
from offsite.remote_io import RemoteMissing, Transfer, s3_call


@dataclass
class VerifyReport:
    """What verify found on the remote: problems left, and what was sent again from the local store."""

    backups: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

UPLOAD_FLOOR = timedelta(days=1)  # no push takes as long: an older multipart upload was left by a killed one


def verify(remote: Remote, component: str, deep: bool, repair_from: BackupStore | None = None) -> VerifyReport:
    """Check the component's remote backups: each manifest reads, every object exists with its size (`deep`:
    its sha256).

    With `repair_from`, each missing or damaged object is sent again from a backup of that local store
    holding the same content, its checksum checked as it is read, and a damaged manifest from the local
    copy of its backup; what cannot be is left a problem.
    """
    copies, unreadable = remote.scan(component)
    report = VerifyReport(backups=len(copies) + len(unreadable))
    repair = _Repair(remote, repair_from) if repair_from is not None else None
    for backup_id, exc in unreadable:
        problem = repair.replace_manifest(backup_id, exc, report) if repair is not None else str(exc)
        if problem:
            report.problems.append(problem)
    sizes = remote.present_blobs(refresh=True)
    checked: dict[str, str | None] = {}  # object key -> its problem, once per run
    for copy in copies:
        for entry in copy.backup.files:
            key = copy.blobs[entry.path]
            if key not in checked:
                checked[key] = _object_problem(remote, sizes, key, entry, deep)
                if checked[key] and repair is not None:
                    checked[key] = repair.resend(key, entry, checked[key], report)
            if checked[key]:
                report.problems.append(f"{copy.backup.id}: {entry.path}: {checked[key]}")
    return report


def _object_problem(remote: Remote, sizes: dict[str, tuple[int, str]], key: str, entry: Entry, deep: bool
                    ) -> str | None:
    size = sizes.get(key, (None,))[0]
    if size is None:
        return f"object {key} is missing"
    if not remote.size_fits(size, entry.size):
        return f"object {key} has {size} bytes, expected {remote.stored_size(entry.size)}"
    return remote.blob_problem(key, entry) if deep else None


class _Repair:
    """Sends objects again from the local store's backups, found by the sha256 of their content."""

    def __init__(self, remote: Remote, store: BackupStore):
        self.remote, self.store = remote, store
        self._sources: dict[str, tuple[Backup, Entry]] | None = None

    def resend(self, key: str, entry: Entry, problem: str, report: VerifyReport) -> str | None:
        """Send the object again; None once it is, else the problem with why it could not be."""
        if self._sources is None:
            self._sources = {e.sha256: (b, e) for b in self.store.backups() for e in b.files}
        source = self._sources.get(entry.sha256)
        if source is None:
            return f"{problem}; no backup in {self.store.root} holds its content, so it was not repaired"
        backup, local_entry = source
        try:
            self.remote.upload(backup, key, local_entry, Transfer())
        except ToolkitError as exc:
            return f"{problem}; not repaired: {exc}"
        report.repaired.append(f"object {key} ({entry.path}) sent again from {backup.id}")
        return None

    def replace_manifest(self, backup_id: str, problem: UnreadableManifest, report: VerifyReport) -> str | None:
        """Push the local copy of a backup whose remote manifest is damaged; None once it is, else the problem."""
        if not problem.repairable:
            return str(problem)
        if not (self.store.root / backup_id / MANIFEST).is_file():
            return f"{problem}; no copy of it in {self.store.root}, so it was not repaired"
        try:
            push(self.remote, self.store.resolve(backup_id), Transfer(), repair=True)
        except ToolkitError as exc:
            return f"{problem}; not repaired: {exc}"
        report.repaired.append(f"the manifest of {backup_id} sent again from {self.store.root}")
        return None


@dataclass
class CleanupReport:
    """What a remote cleanup removed and kept (and why), and the manifests it could not read."""

    plan: RetentionPlan
    objects_removed: int = 0
    unreadable: list[str] = field(default_factory=list)


def cleanup(remote: Remote, component: str, policy: RetentionPolicy,
            holds_for: Callable[[list[Backup]], dict[str, list[str]]], dry_run: bool) -> CleanupReport:
    """Remove the component's remote backups that no rule of `policy` nor hold keeps (`holds_for` gives the holds,
    given the remote's restore points), then the blobs no manifest of any component has named for the grace
    period: none while any manifest cannot be read, as it might name any of them. A manifest that cannot be
    read is kept, and named; a restore point's that cannot be read stops the cleanup before anything goes."""
    copies, unreadable = remote.scan(component)
    points: list[Backup] = []
    if component != POINTS.name:
        point_copies, unreadable_points = remote.scan(POINTS.name)
        if unreadable_points:
            raise ToolkitError(f"remote restore point {unreadable_points[0][0]} cannot be read "
                               f"({unreadable_points[0][1]}): it may name any backup, so nothing is removed")
        points = [copy.backup for copy in point_copies]

    def planned() -> RetentionPlan:
        holds = holds_for(points)
        for backup_id, text in remote.pins(component).items():  # pinned from any host (pin writes them here too)
            reason = Pin.from_text(text, remote.key(component, PINS, backup_id)).describe()
            if reason not in holds.setdefault(backup_id, []):
                holds[backup_id].append(reason)
        return plan_retention([copy.backup for copy in copies], policy, holds)

    plan = planned()
    report = CleanupReport(plan, unreadable=[str(e) for _, e in unreadable])
    if dry_run:
        return report
    # The pins again, right before anything goes: one made while the manifests were read is kept.
    plan = report.plan = planned()
    for backup in plan.remove:  # manifests first: a backup half-removed is never listed as whole
        remote.call("delete_object", Key=remote.manifest_key(component, backup.id))
    remote.manifests.forget([remote.manifest_key(component, backup.id) for backup in plan.remove])
    remote.manifests.save()
    # This component's manifests were just read: only the other components' are read again, and any of its
    # own that a push has added since.
    gone = {backup.id for backup in plan.remove}
    # A removed id listed again was pushed again meanwhile: it is read, and its blobs stay.
    seen = ({copy.backup.id for copy in copies} | {backup_id for backup_id, _ in unreadable}) - gone
    added = [backup_id for backup_id in remote.backup_ids(component) if backup_id not in seen]
    others, unreadable_others = remote.scan(but=component)
    fresh, unreadable_fresh = remote.scan(component, only=added) if added else ([], [])
    everything = others + fresh + [copy for copy in copies if copy.backup.id not in gone]
    unreadable = unreadable + unreadable_others + unreadable_fresh
    if unreadable:
        report.unreadable = [str(e) for _, e in unreadable]
    else:
        report.objects_removed = _remove_unreferenced(remote, everything)
    _abort_stale_uploads(remote)
    return report


def _remove_unreferenced(remote: Remote, everything: list[RemoteBackup]) -> int:
    named = {key for copy in everything for key in copy.blobs.values()}
    now = datetime.now(UTC)
    seen = _candidates(remote)
    unnamed = {key: (seen.get(key) or now, _when(uploaded) or now)
               for key, (_, uploaded) in remote.blob_sizes().items() if key not in named}
    # Unnamed for the whole grace period, and uploaded before it: neither a push still uploading its
    # blobs nor one that has just found an old blob to reuse loses it.
    doomed = [key for key, (since, uploaded) in unnamed.items()
              if now - since >= remote.config.grace and now - uploaded >= remote.config.grace]
    for start in range(0, len(doomed), 1000):
        batch = [{"Key": key} for key in doomed[start:start + 1000]]
        remote.call("delete_objects", Delete={"Objects": batch, "Quiet": True})
    waiting = {key: since.isoformat() for key, (since, _) in unnamed.items() if key not in doomed}
    # Written after the deletions, every time: a push that sees it change re-checks its blobs.
    remote.call("put_object", Key=remote.key(CANDIDATES), Body=json.dumps(waiting).encode())
    return len(doomed)


def _candidates(remote: Remote) -> dict[str, datetime]:
    """The blobs earlier cleanups found unnamed, and since when; an unreadable record starts afresh."""
    try:
        raw = s3_call(lambda: remote.client.get_object(Bucket=remote.config.bucket,
                                                     Key=remote.key(CANDIDATES))["Body"].read(), RemoteMissing)
    except RemoteMissing:
        return {}
    try:
        return {key: when for key, since in json.loads(raw).items() if (when := _when(since)) is not None}
    except (ValueError, AttributeError):
        return {}  # every unnamed blob waits a whole grace period again: nothing is lost


def _abort_stale_uploads(remote: Remote) -> None:
    """Multipart uploads a killed push left behind cost storage until aborted; one younger than UPLOAD_FLOOR
    (whatever the grace) may be a push still sending a large dump, and is left alone."""
    cutoff = datetime.now(UTC) - max(remote.config.grace, UPLOAD_FLOOR)
    try:
        uploads = remote.call("list_multipart_uploads", Prefix=remote.key("blobs") + "/").get("Uploads", [])
    except ToolkitError:  # not every S3-compatible server lists them; a lifecycle rule can do this instead
        return
    for upload in uploads:
        if datetime.fromisoformat(str(upload["Initiated"]).replace("Z", "+00:00")) < cutoff:
            remote.call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])


def _when(text: object) -> datetime | None:
    """An ISO time with its zone (S3's `...Z` too), or None for anything else."""
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
