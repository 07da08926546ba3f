"""rollback COMMIT: a git commit's code put in place, switched in (release folder) or checked out (in-place)."""

from __future__ import annotations

from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from deployed_code.backups import record_deployed, take_backup
from deployed_code.git import check_out, export_commit, git_state, is_repository, local_changes, resolve_commit
from deployed_code.layout import build_path, switch_and_keep
from deployed_code.paths import SCRIPT, CodePaths
from deployed_code.restore import safety_skipped, switch_lines
from deployed_code.tree import remove_tree


def roll_back(ctx: Context) -> Result:
    """rollback COMMIT: the commit's tree switched in (release folder) or checked out (in-place)."""
    paths = CodePaths.from_settings(ctx.settings)
    if not is_repository(paths.repo):
        raise UsageError("REPO_PATH is not set to a git repository")
    commit = resolve_commit(paths.repo, ctx.args.commit)
    with paths.store.lock(f"{SCRIPT} rollback"):
        changes = local_changes(paths.repo) if paths.in_place else []
        if changes and not ctx.args.stash:
            raise ToolkitError(f"{paths.repo} has local changes ({'; '.join(changes[:5])}"
                               f"{' ...' if len(changes) > 5 else ''}): commit them, or pass --stash to keep them"
                               " in the stash; nothing changed")
        skipped = safety_skipped(ctx, paths.live)
        if ctx.dry_run:
            return Result({"dry_run": True, "commit": commit, "safety_backup_skipped": skipped},
                          [f"would roll {paths.live} back to {commit[:12]}"], report=True)
        ctx.confirm(f"Roll the code in {paths.live} back to {commit[:12]}?")
        label = f"before rollback to {commit[:12]}"
        data = {"commit": commit, "safety_backup_skipped": skipped}
        lines = [f"rolled {paths.live} back to {commit[:12]} ({ctx.args.commit})"]
        if paths.in_place:
            ids = [] if skipped else [take_backup(paths, label, safety=True)[0].id]
            data["previous_commit"] = git_state(paths.repo)["commit"]
            stash = f"{SCRIPT}: before rollback to {commit[:12]}" if changes else None
            data["undo"] = check_out(paths.repo, commit, stash)
            if stash:
                lines.append(f"local changes stashed as stash@{{0}} ({stash})")
            lines.append(f"to undo: {' && '.join(data['undo'])}")
        else:
            # The commit's tree first: one that cannot be exported stops the rollback before anything is saved.
            target = build_path(paths.live)
            export_commit(paths.repo, commit, target)
            try:
                ids = [] if skipped else [take_backup(paths, label, safety=True)[0].id]
            except BaseException:
                remove_tree(target)
                raise
            switched, kept = switch_and_keep(target, paths.live, f"commit-{commit[:12]}")
            data.update(switch=switched.to_json(), replaced_tree=str(kept) if kept else None,
                        undo=[f"{SCRIPT} restore {ids[0]} --yes"] if ids else [])
            lines += switch_lines(ids, kept, skipped)
        # A record of what is deployed now, for verify (marked safety so `latest` stays the user's restore point).
        deployed = take_backup(paths, f"deployed by rollback to {commit[:12]}", safety=True, deployed_commit=commit)[0]
        record_deployed(paths, deployed)
    data["safety_backup"] = ids[0] if ids else None
    return Result(data, lines, backup_ids=ids)

