"""The off-host commands every script has: push, pull, and the --remote forms of list, verify and cleanup."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from backup_store.manifest import Backup, format_time
from backup_store.retention import RetentionPolicy
from common.cli import Context, Result, push_wanted
from common.errors import EXIT_FAILED, EXIT_VERIFY, UsageError
from common.text import human_size, table
from offsite import pull, push, upkeep
from offsite.manifest_cache import CACHE_FILE
from offsite.pull import open_store
from offsite.remote import Remote, RemoteConfig
from offsite.remote_io import PushRefused, Transfer


def remote_for(ctx: Context) -> Remote:
    """The remote of REMOTE_URL; a command that needs one says so when it is not set."""
    config = RemoteConfig.from_settings(ctx.settings)
    if config is None:
        raise UsageError("REMOTE_URL is not set: set it to s3://bucket/prefix (and S3_ENDPOINT_URL for "
                         "anything but AWS) to keep copies off this host")
    return Remote(config, ctx.component.store_path(ctx.settings) / CACHE_FILE)


def _transfer_progress(ctx: Context, label: str, transfer: Transfer) -> AbstractContextManager:
    return ctx.progress(label, lambda: transfer.bytes, lambda: transfer.total_bytes or None)


def push_backups(ctx: Context, remote: Remote, backups: list[Backup], repair: bool = False) -> Result:
    """Push each backup (`repair`: reading back each object it relies on); what moved, for --json and for
    people. A backup whose id names other content on the remote is refused and named, the others still go,
    and the run exits 1."""
    pushed, lines, refused = {}, [], []
    for backup in backups:
        transfer = Transfer()
        try:
            with _transfer_progress(ctx, f"pushing {backup.id}", transfer):
                push.push(remote, backup, transfer, repair)
        except PushRefused as exc:
            if len(backups) == 1:
                raise
            ctx.warn(str(exc))
            refused.append(str(exc))
            continue
        pushed[backup.id] = transfer.to_json()
        lines.append(f"pushed {backup.id} to {remote.describe()}: {transfer.objects} objects "
                     f"({human_size(transfer.bytes)}) sent, {transfer.skipped} files already there")
    return Result({"pushed": pushed, "refused": refused, "remote": remote.describe()},
                  [*lines, *refused] or ["nothing to push"], backup_ids=list(pushed),
                  exit_code=EXIT_FAILED if refused else 0)


def push_command(ctx: Context) -> Result:
    """push [BACKUP | --all]: copy backups to the remote; only what it does not have yet goes up."""
    remote, store = remote_for(ctx), open_store(ctx.settings, ctx.component)
    # Newest first: if the run is cut short, the backups most likely to be needed are already across.
    backups = store.backups() if ctx.args.all else [store.resolve(ctx.args.backup or "latest")]
    if ctx.dry_run:
        return Result({"dry_run": True, "would_push": [b.id for b in backups]},
                      [f"would push {b.id}" for b in backups] or ["nothing to push"], report=True)
    return push_backups(ctx, remote, backups, ctx.args.repair)


def pull_command(ctx: Context) -> Result:
    """pull BACKUP: bring a backup from the remote into the local store, every byte's checksum checked."""
    remote, store = remote_for(ctx), open_store(ctx.settings, ctx.component)
    backup_id = ctx.args.backup
    if (store.root / backup_id).is_dir():
        raise UsageError(f"backup {backup_id} is already in {store.root}")
    if ctx.dry_run:
        remote.read(store.component, backup_id)
        return Result({"dry_run": True, "would_pull": backup_id}, [f"would pull {backup_id}"], report=True)
    transfer = Transfer()
    with store.lock(f"{ctx.script} pull"), _transfer_progress(ctx, f"pulling {backup_id}", transfer):
        backup = pull.pull(remote, store, backup_id, transfer)
    return Result({"backup": backup.summary(), "transfer": transfer.to_json()},
                  [f"pulled {backup.id} into {store.root}: {len(backup.files)} files, "
                   f"{human_size(transfer.bytes)}, every checksum checked"], backup_ids=[backup.id])


def list_remote(ctx: Context) -> Result:
    """list --remote: the component's backups on the remote, newest first; a manifest that cannot be read is
    named (a warning), and the others are listed."""
    remote, component = remote_for(ctx), ctx.component.name
    copies, unreadable = remote.scan(component)
    backups = [copy.backup for copy in copies]
    rows = [(b.id, format_time(b.created_at), str(len(b.files)), human_size(b.size),
             ("(safety) " if b.is_safety else "") + (b.label or "")) for b in backups]
    lines = table(("ID", "TIME (UTC)", "FILES", "SIZE", "LABEL"), rows) if rows else [
        f"no {component} backups on {remote.describe()}"]
    for _, problem in unreadable:
        ctx.warn(str(problem))
    return Result({"remote": remote.describe(), "backups": [{**b.summary(), "path": None} for b in backups],
                   "unreadable": [{"id": backup_id, "problem": str(problem)} for backup_id, problem in unreadable]},
                  lines, report=True)


def verify_remote(ctx: Context) -> Result:
    """verify --remote [--deep] [--repair]: every object a remote manifest names is there with its size (--deep:
    its sha256); --repair sends what is missing or damaged again from the local store."""
    remote = remote_for(ctx)
    store = open_store(ctx.settings, ctx.component) if ctx.args.repair else None
    report = upkeep.verify(remote, ctx.component.name, ctx.args.deep, store)
    what = "sha256 of every object" if ctx.args.deep else "every object and its size"
    lines = [f"verify {remote.describe()} ({ctx.component.name}, {report.backups} backups, {what}): "
             + (f"{len(report.problems)} problems" if report.problems else "OK"),
             *[f"  {p}" for p in report.problems], *[f"  repaired: {r}" for r in report.repaired]]
    return Result({"remote": remote.describe(), "backups": report.backups, "problems": report.problems,
                   "repaired": report.repaired}, lines, exit_code=EXIT_VERIFY if report.problems else 0, report=True)


def cleanup_remote(ctx: Context, policy: RetentionPolicy, holds_for: Callable[[list[Backup]], dict[str, list[str]]]
                   ) -> Result:
    """cleanup --remote: the local retention rules and holds on the remote; a blob goes when no manifest names it.
    A manifest that cannot be read is named (a warning) and kept, and then no blob goes."""
    remote = remote_for(ctx)
    report = upkeep.cleanup(remote, ctx.component.name, policy, holds_for, ctx.dry_run)
    for problem in report.unreadable:
        ctx.warn(problem)
    removed, kept = [b.id for b in report.plan.remove], [b.id for b in report.plan.keep]
    if ctx.dry_run:
        lines = [f"retention: {policy.describe()}", *report.plan.explained(" from the remote")]
        return Result({"dry_run": True, "would_remove": removed, "kept": kept,
                       "decisions": [d.to_json() for d in report.plan.decisions], "unreadable": report.unreadable},
                      lines, report=True)
    lines = [f"removed {backup_id} from the remote" for backup_id in removed]
    lines.append(f"{len(removed)} remote backups removed, {len(kept)} kept, "
                 f"{report.objects_removed} objects no backup names removed")
    if report.unreadable:
        lines.append(f"no object was removed: {len(report.unreadable)} remote manifests cannot be read, and any "
                     "object might be one they name")
    return Result({"removed": removed, "kept": kept, "objects_removed": report.objects_removed,
                   "unreadable": report.unreadable}, lines)


def push_after_backup(ctx: Context, result: Result) -> None:
    """The new backup goes off-host at once. A failed push keeps the backup and its report, and exits 1."""
    if not push_wanted(ctx):
        return
    backup_id = result.backup_ids[0]
    try:
        pushed = push_backups(ctx, remote_for(ctx), [open_store(ctx.settings, ctx.component).resolve(backup_id)])
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the backup stands and its report must go out
        push_failed(ctx, result, f"backup {backup_id} was made, but the push failed: {exc}; "
                                 f"`push {backup_id}` sends it later")
        return
    result.data["pushed"] = pushed.data["pushed"]
    result.lines += pushed.lines


def push_failed(ctx: Context, result: Result, message: str) -> None:
    """A backup made but not pushed: its report stays whole, says so (stderr too), and the run exits 1."""
    ctx.warn(message)
    result.data["push_error"] = message
    result.lines.append(message)
    result.exit_code = EXIT_FAILED
