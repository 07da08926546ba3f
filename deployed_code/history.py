"""history [--limit N]: the code's deploys and backups, newest first: each one's commit (tags, author, subject
from REPO_PATH), who ran it and when, the one live now and, in a symlink layout, the release folders kept.

The entries and who ran them come from deployed_code.deploys; this puts the rest beside them and words it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from common.audit import AuditRecord, audit_log_path, read_audit
from common.cli import Context, Result
from common.components import CODE
from common.errors import UsageError
from common.text import printable
from deployed_code.commits import describe_commits
from deployed_code.deploys import (
    BACKUP,
    RESTORE,
    ROLLBACK,
    Deploy,
    StoredBackups,
    commit_of,
    deploys_on_record,
    live_backup_id,
)
from deployed_code.layout import releases_folder
from deployed_code.paths import SCRIPT, CodePaths
from deployed_code.releases import kept_releases, release_folders


@dataclass
class LiveNow:
    """The backup verify compares the live tree with, and whether its entry is in the list."""

    backup: str
    commit: str | None
    listed: bool


@dataclass
class ReleaseFolders:
    """A symlink layout's release folders on disk, newest first, and the one `current` points at."""

    folder: Path
    kept: list[str]
    current: str

    def to_json(self) -> dict:
        """For --json."""
        return {"folder": str(self.folder), "kept": [{"folder": name, "live": name == self.current}
                                                     for name in self.kept]}


@dataclass
class History:
    """What `history` shows."""

    deployment: Path | None
    layout: str  # "in-place", "folder" or "symlink"
    repo: Path | None
    repo_problem: str | None  # why no commit could be described
    audit_log: Path
    audit_log_found: bool
    store: Path
    deploys: list[Deploy]
    live: LiveNow | None
    releases: ReleaseFolders | None

    def to_json(self) -> dict:
        """For --json."""
        return {"deployment": str(self.deployment) if self.deployment else None, "layout": self.layout,
                "repo": str(self.repo) if self.repo else None, "repo_problem": self.repo_problem,
                "audit_log": str(self.audit_log), "audit_log_found": self.audit_log_found,
                "live": asdict(self.live) if self.live else None,
                "history": [deploy.to_json() for deploy in self.deploys],
                "releases": self.releases.to_json() if self.releases else None}


def show_history(ctx: Context) -> Result:
    """history [--limit N]: the deploys and backups, newest first, with who ran each and when."""
    limit = ctx.args.limit
    if limit is not None and limit < 1:
        raise UsageError("--limit must be 1 or more")
    paths = CodePaths.from_settings(ctx.settings)
    store = StoredBackups(paths.store)
    log = audit_log_path(ctx.settings, CODE)
    found = log.is_file()
    deploys = deploys_on_record(store, _runs(ctx, log), limit)
    live = _mark_live(paths, store, deploys)
    described, repo_problem = describe_commits(paths.repo, [d.commit for d in deploys if d.commit]
                                               + ([live.commit] if live and live.commit else []))
    for deploy in deploys:
        deploy.described = described.get(deploy.commit) if deploy.commit else None
    history = History(paths.deployment or paths.repo, _layout(paths), paths.repo, repo_problem, log, found,
                      store.root, deploys, live, _release_folders(paths, deploys))
    return Result(history.to_json(), [printable(line) for line in _lines(history)], report=True)


def _runs(ctx: Context, log: Path) -> Iterator[AuditRecord]:
    """The code script's runs in the audit log; one that cannot be read is a warning, and no runs."""
    try:
        yield from read_audit(log, SCRIPT)
    except OSError as exc:
        ctx.warn(f"the audit log {log} cannot be read ({exc.strerror}): who ran what is not known")


def _mark_live(paths: CodePaths, store: StoredBackups, deploys: list[Deploy]) -> LiveNow | None:
    """Mark the newest entry of the backup verify compares the live tree with (None when there is none)."""
    live_id = live_backup_id(paths, store)
    if live_id is None:
        return None
    entry = next((deploy for deploy in deploys if deploy.backup == live_id), None)
    if entry is not None:
        entry.live = True
    backup = store.get(live_id)
    return LiveNow(live_id, commit_of(backup) if backup else None, entry is not None)


# -- the release folders --------------------------------------------------------------------------------


def _layout(paths: CodePaths) -> str:
    if paths.in_place:
        return "in-place"
    return "symlink" if paths.deployment is not None and paths.deployment.is_symlink() else "folder"


def _release_folders(paths: CodePaths, deploys: list[Deploy]) -> ReleaseFolders | None:
    """Symlink layout: the release folders on disk, and each deploy's own (set on it), if still kept.

    A kept release's manifest names the backups whose tree it is. A folder without one (made by another
    tool, or its manifest removed) is matched by name: a restore's folder is named after the backup, a
    rollback's `commit-<sha>`, with `-2`, `-3` ... when the name was taken; of the folders of one name, the
    live deploy has `current`'s, and the others go to the other deploys newest first by their age."""
    if _layout(paths) != "symlink" or paths.deployment is None:
        return None
    folder = releases_folder(paths.deployment)
    current = os.path.basename(os.path.realpath(paths.deployment))
    try:
        kept = release_folders(folder) if folder is not None else []
    except OSError:
        kept = []
    names = [item.name for item in sorted(kept, key=lambda item: (_mtime(item), item.name), reverse=True)]
    # A release the toolkit keeps lists the backups whose tree it is: a deploy of one of them was that folder,
    # however often it was switched back to. Folders without a manifest are matched by name.
    listed = {backup_id: release.name for release, manifest in (kept_releases(folder) if folder else [])
              for backup_id in manifest.backups}
    free = [name for name in names if name != current]
    for deploy in sorted((d for d in deploys if d.event != BACKUP), key=lambda d: not d.live):
        if deploy.backup in listed:
            deploy.release, deploy.release_kept = listed[deploy.backup], True
            continue
        base = deploy.backup if deploy.event == RESTORE else f"commit-{deploy.commit[:12]}" if deploy.commit else ""
        own = [name for name in ([current] if deploy.live else []) + free if _named_after(name, base)]
        deploy.release, deploy.release_kept = (own[0], True) if own else (None, False)
        if own and own[0] in free:
            free.remove(own[0])
    return ReleaseFolders(folder, names, current) if folder is not None else None


def _named_after(name: str, base: str) -> bool:
    return bool(base) and (name == base or re.fullmatch(re.escape(base) + r"-[0-9]+", name) is not None)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


# -- for people ---------------------------------------------------------------------------------------------


def _lines(history: History) -> list[str]:
    lines = [f"history of {history.deployment or '(no DEPLOYMENT_DIR or REPO_PATH)'} ({history.layout} layout), newest "
             "first; * marks the live one, which verify compares with"]
    if history.repo_problem:
        lines.append(f"  {history.repo_problem}: no tags, authors or subjects")
    if not history.audit_log_found:
        lines.append(f"  no audit log at {history.audit_log}: who ran what is not known")
    if not history.deploys:
        lines.append(f"  no deploys or backups in {history.store}")
    for deploy in history.deploys:
        lines += _entry_lines(deploy)
    live = history.live
    if live is None:
        lines.append("live now: not known (no restore or rollback recorded, no backup taken)")
    elif not live.listed:
        lines.append(f"live now: backup {live.backup} (commit {(live.commit or '-')[:12]}), "
                     "from a deploy not in the list")
    if history.releases is not None:
        kept = [f"{name} (live)" if name == history.releases.current else name for name in history.releases.kept]
        lines.append(f"release folders kept in {history.releases.folder}: {', '.join(kept) or 'none'}")
    return lines


def _entry_lines(deploy: Deploy) -> list[str]:
    what = {RESTORE: f"restore of {deploy.backup}", ROLLBACK: "rollback"}.get(deploy.event, f"backup {deploy.backup}")
    if deploy.event == BACKUP and deploy.label:
        what += f" ({deploy.label})"
    verb = "taken" if deploy.event == BACKUP else "deployed"
    by = f"{deploy.by} on {deploy.host}" if deploy.by and deploy.host else deploy.by or "unknown"
    lines = [f"{'*' if deploy.live else ' '} {deploy.at}  {what}  {verb} by: {by}"]
    about = deploy.described
    if deploy.commit is None:
        lines.append("    no commit recorded")
    elif about is None:
        lines.append(f"    commit {deploy.commit[:12]}: commit not in REPO_PATH")
    else:
        tags = f" (tag {', '.join(about.tags)})" if about.tags else ""
        lines.append(f"    commit {deploy.commit[:12]}{tags}  {about.author}: {about.subject}")
    if deploy.release_kept is not None:
        lines.append(f"    release folder {deploy.release} (kept)" if deploy.release_kept
                     else "    release folder no longer on disk")
    return lines
