"""cleanup: old code backups, and beside DEPLOYMENT_DIR the replaced trees, half-built trees and old releases."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backup_store.retention import RetentionPolicy
from commands.retention_commands import cleanup_backups
from common.cli import Context, Result
from deployed_code.backups import deployed_hold
from deployed_code.layout import leftovers, releases_folder, replaced_trees
from deployed_code.paths import SCRIPT, CodePaths
from deployed_code.releases import prunable, prune, read_manifest, release_folders
from deployed_code.source import CodeSource
from deployed_code.tree import remove_tree


def clean_up(ctx: Context) -> Result:
    """cleanup: remove the backups no retention rule keeps, replaced trees older than DAYS (always keeping the
    newest --keep), the half-built trees of stopped restores and rollbacks, and, in a symlink layout, the
    releases beyond KEEP_RELEASES that neither are live nor hold a kept backup's tree."""
    paths = CodePaths.from_settings(ctx.settings)
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)
    cutoff = datetime.now(UTC) - timedelta(days=policy.kept_days)
    result = cleanup_backups(ctx, paths.store, SCRIPT, lambda: deployed_hold(paths.store.root), policy)
    if paths.in_place or paths.deployment is None:
        return result
    # Under the store's lock: a restore or rollback holds it for as long as its half-built tree exists.
    with paths.store.lock(f"{SCRIPT} cleanup"):
        old = [path for path, when in replaced_trees(paths.deployment)[max(policy.last, 1):] if when < cutoff]
        half_built = leftovers(paths.deployment)
        folder, protected = _releases_kept(paths, set(result.data["kept"]))
        releases = prunable(folder, paths.keep_releases, protected) if folder else []
        if ctx.dry_run:
            result.data["would_remove_trees"] = [str(path) for path in old]
            result.data["would_remove_half_built"] = [str(path) for path in half_built]
            result.data["would_prune_releases"] = [str(path) for path in releases]
            result.lines += [f"would remove the replaced tree {path}" for path in old]
            result.lines += [f"would remove the half-built tree {path}" for path in half_built]
            result.lines += [f"would prune the release {path}" for path in releases]
            return result
        for path in old + half_built:
            remove_tree(path)
        releases = prune(folder, paths.keep_releases, protected) if folder else []
    result.data["removed_trees"] = [str(path) for path in old]
    result.data["removed_half_built"] = [str(path) for path in half_built]
    result.data["pruned_releases"] = [str(path) for path in releases]
    result.lines += [f"removed the replaced tree {path}" for path in old]
    result.lines += [f"removed the half-built tree {path}" for path in half_built]
    result.lines += [f"pruned the release {path} (beyond KEEP_RELEASES={paths.keep_releases})" for path in releases]
    return result


def _releases_kept(paths: CodePaths, kept: set[str]) -> tuple[Path | None, list[Path]]:
    """The symlink layout's releases folder (None in other layouts) and the releases no prune may take: the live
    one, and each that a kept backup (a restore point's among them) was taken of or that lists one as its tree."""
    if paths.deployment is None or not paths.deployment.is_symlink():
        return None, []
    releases = releases_folder(paths.deployment)
    if releases is None or not releases.is_dir():
        return None, []
    taken_of = {CodeSource.load(backup).release for backup in paths.store.scan(headers=True)[0]
                if backup.id in kept}
    protected = [Path(os.path.realpath(paths.deployment))]
    for folder in release_folders(releases):
        manifest = read_manifest(folder)
        if folder.name in taken_of or (manifest is not None and kept & set(manifest.backups)):
            protected.append(folder)
    return releases, protected
