"""rollback COMMIT: a git commit's code put in place, switched in (release folder) or checked out (in-place)."""

from __future__ import annotations

import os
from pathlib import Path

from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from deployed_code.backups import record_deployed, take_backup
from deployed_code.git import check_out, export_commit, git_state, is_repository, local_changes, resolve_commit
from deployed_code.layout import build_path, switch_and_keep
from deployed_code.paths import SCRIPT, CodePaths
from deployed_code.release_steps import KeptRelease, ReleaseSteps
from deployed_code.restore import safety_skipped, switch_lines
from deployed_code.tree import remove_tree


def roll_back(ctx: Context) -> Result:
    """rollback COMMIT: the commit's tree switched in (release folder) or checked out (in-place)."""
    paths = CodePaths.from_settings(ctx.settings)
    if not is_repository(paths.repo):
        raise UsageError("REPO_PATH is not set to a git repository")
    commit = resolve_commit(paths.repo, ctx.args.commit)
    steps = None if paths.in_place else ReleaseSteps.from_settings(ctx, paths)  # checked before any change
    with paths.store.lock(f"{SCRIPT} rollback"):
        changes = local_changes(paths.repo) if paths.in_place else []
        if changes and not ctx.args.stash:
            raise ToolkitError(f"{paths.repo} has local changes ({'; '.join(changes[:5])}"
                               f"{' ...' if len(changes) > 5 else ''}): commit them, or pass --stash to keep them"
                               " in the stash; nothing changed")
        skipped = safety_skipped(ctx, paths.live)
        kept = steps.kept_for_commit(commit, dry_run=ctx.dry_run) if steps else None
        if ctx.dry_run:
            how = f"the kept release {kept.folder} (checked: whole; no copy)" if kept and kept.ok else commit[:12]
            return Result({"dry_run": True, "commit": commit, "safety_backup_skipped": skipped,
                           "kept_release": kept.to_json() if kept else None},
                          [f"would roll {paths.live} back to {how}",
                           *([kept.line(dry_run=True)] if kept and not kept.ok else [])], report=True)
        if ctx.confirm(f"Roll the code in {paths.live} back to {commit[:12]}?") and steps is not None:
            kept = steps.recheck(kept)
        label = f"before rollback to {commit[:12]}"
        if steps is None:
            return _check_out(paths, commit, ctx.args.commit, changes, skipped, label)
        if kept is not None and kept.ok:
            result, switched = steps.switch_to_kept(ctx, kept, label, skipped, None, commit)
            result.data.update(commit=commit, undo=_undo(result.data["safety_backup"]))
            result.lines.insert(0, f"rolled {paths.live} back to {commit[:12]} ({ctx.args.commit})")
            return result
        return _release(ctx, paths, steps, commit, kept, skipped, label)


def _undo(safety: str | None) -> list[str]:
    return [f"{SCRIPT} restore {safety} --yes"] if safety else []


def _check_out(paths: CodePaths, commit: str, revision: str, changes: list[str], skipped: str | None, label: str
               ) -> Result:
    """In a working copy: the commit checked out, detached, after the safety backup (and the stash)."""
    ids = [] if skipped else [take_backup(paths, label, safety=True)[0].id]
    data = {"commit": commit, "safety_backup_skipped": skipped, "previous_commit": git_state(paths.repo)["commit"]}
    stash = f"{SCRIPT}: before rollback to {commit[:12]}" if changes else None
    data["undo"] = check_out(paths.repo, commit, stash)
    lines = [f"rolled {paths.live} back to {commit[:12]} ({revision})"]
    if stash:
        lines.append(f"local changes stashed as stash@{{0}} ({stash})")
    lines.append(f"to undo: {' && '.join(data['undo'])}")
    deployed = take_backup(paths, f"deployed by rollback to {commit[:12]}", safety=True, deployed_commit=commit)[0]
    record_deployed(paths, deployed)
    data["safety_backup"] = ids[0] if ids else None
    return Result(data, lines, backup_ids=ids)


def _release(ctx: Context, paths: CodePaths, steps: ReleaseSteps, commit: str, kept: KeptRelease | None,
             skipped: str | None, label: str) -> Result:
    """A release folder: the commit's tree exported beside the live one, shared paths linked, BUILD_HOOK run,
    the live tree saved, then the switch; what is deployed is recorded by a snapshot of the new tree."""
    # The commit's tree first: one that cannot be exported or built stops the rollback before anything is saved.
    target = build_path(paths.live)
    hashes = export_commit(paths.repo, commit, target)
    try:
        prepared = steps.prepare(target, hashes, commit=commit)
        safety = None if skipped else take_backup(paths, label, safety=True, previous=steps.snapshot_base())[0]
    except BaseException:
        remove_tree(target)
        raise
    ids = [safety.id] if safety else []
    previous = Path(os.path.realpath(paths.live)) if paths.live.is_symlink() else None
    switched, kept_tree = switch_and_keep(target, paths.live, f"commit-{commit[:12]}", prepared.write_manifest)
    steps.remember_safety(previous, safety)
    # A record of what is deployed now, for verify (marked safety so `latest` stays the user's restore point).
    steps.record_new_release(prepared, None, commit, f"deployed by rollback to {commit[:12]}")
    data = {"commit": commit, "safety_backup_skipped": skipped, "switch": switched.to_json(),
            "replaced_tree": str(kept_tree) if kept_tree else None, "undo": _undo(ids[0] if ids else None),
            "kept_release": kept.to_json() if kept else None, "safety_backup": ids[0] if ids else None}
    lines = [f"rolled {paths.live} back to {commit[:12]} ({ctx.args.commit})", *([kept.line()] if kept else []),
             *switch_lines(ids, kept_tree, skipped)]
    result = Result(data, lines, backup_ids=ids)
    steps.after_switch(ctx, result, previous, ids)
    return result
