"""cleanup DAYS: old code backups, and beside DEPLOYMENT_DIR the replaced trees and half-built ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backup_store.retention import RetentionPolicy
from commands.retention_commands import cleanup_backups
from common.cli import Context, Result
from deployed_code.backups import deployed_id
from deployed_code.layout import leftovers, replaced_trees
from deployed_code.paths import SCRIPT, CodePaths
from deployed_code.tree import remove_tree


def clean_up(ctx: Context) -> Result:
    """cleanup DAYS: remove backups and replaced trees older than DAYS, always keeping the newest --keep of each,
    and the half-built trees of stopped restores and rollbacks."""
    paths = CodePaths.from_settings(ctx.settings)
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)
    cutoff = datetime.now(UTC) - timedelta(days=policy.kept_days)
    # What the live tree was restored from stays: verify compares the tree with it.
    live = deployed_id(paths)
    holds = {live: ["what the live tree was restored from"]} if live else None
    result = cleanup_backups(ctx, paths.store, SCRIPT, holds)
    if paths.in_place or paths.deployment is None:
        return result
    # Under the store's lock: a restore or rollback holds it for as long as its half-built tree exists.
    with paths.store.lock(f"{SCRIPT} cleanup"):
        old = [path for path, when in replaced_trees(paths.deployment)[max(policy.last, 1):] if when < cutoff]
        half_built = leftovers(paths.deployment)
        if ctx.dry_run:
            result.data["would_remove_trees"] = [str(path) for path in old]
            result.data["would_remove_half_built"] = [str(path) for path in half_built]
            result.lines += [f"would remove the replaced tree {path}" for path in old]
            result.lines += [f"would remove the half-built tree {path}" for path in half_built]
            return result
        for path in old + half_built:
            remove_tree(path)
    result.data["removed_trees"] = [str(path) for path in old]
    result.data["removed_half_built"] = [str(path) for path in half_built]
    result.lines += [f"removed the replaced tree {path}" for path in old]
    result.lines += [f"removed the half-built tree {path}" for path in half_built]
    return result
