"""Restoring the configuration: how the live CONFIG_DIR and ENV_FILE differ from a backup, and making them it."""

from __future__ import annotations

import os

from backup_store.manifest import Backup
from backup_store.store import refuse_damaged, resolve_component
from backup_store.trees import TreeDiff, diff_tree, matches, restore_label, restore_tree, tree_entries
from common.cli import Context, Result
from common.text import count
from configuration.backups import take_backup
from configuration.paths import ENV_ENTRY, TREE, ConfigPaths
from configuration.source import ConfigSource


def compare(backup: Backup, paths: ConfigPaths) -> tuple[TreeDiff, str | None]:
    """How the live configuration differs from a backup: the tree's diff and the ENV_FILE's ("" if same)."""
    diff = diff_tree(tree_entries(backup, TREE), paths.config_dir)
    if ConfigSource.load(backup).env_file_in_config_dir or paths.env_in_tree:
        return diff, None
    entry = next((e for e in backup.entries if e.path == ENV_ENTRY), None)
    live = os.path.lexists(paths.env_file)
    if entry is None:
        return diff, "added" if live else None
    if not live:
        return diff, "removed"
    return diff, None if matches(entry, paths.env_file) else "changed"


def restore_backup(backup: Backup, paths: ConfigPaths, diff: TreeDiff, env_change: str | None) -> None:
    """Make CONFIG_DIR and ENV_FILE exactly the backup; each file is replaced atomically, and only once
    every file is written, so a full disk changes neither."""
    env = [(e, paths.env_file) for e in backup.entries if e.path == ENV_ENTRY and env_change in ("removed", "changed")]
    restore_tree(backup, TREE, paths.config_dir, diff, env)
    if env_change == "added":
        paths.env_file.unlink()


def restore(ctx: Context, ref: str, no_backup: bool) -> Result:
    """restore BACKUP: checksums first, a backup of the current state (unless no_backup), then the backup's
    exact tree; --dry-run lists what would change."""
    paths = ConfigPaths.from_settings(ctx.settings)
    if ctx.dry_run:
        backup, diff, env_change = _restore_plan(paths, ref)
        changes, planned = _restore_changes(paths, diff, env_change, done=False)
        return Result({"backup": backup.summary(), "changes": changes, "dry_run": True},
                      [f"restoring {backup.id} would:", *planned] if planned else
                      [f"{paths.config_dir} already matches backup {backup.id}"], report=True)
    ids = []
    lines = []
    # Everything from resolving the backup to the last file happens under the lock, so a cleanup or
    # another restore cannot remove the backup or change the tree between the check and the writes.
    with paths.store.lock(f"{ctx.script} restore"):
        backup, diff, env_change = _restore_plan(paths, ref)
        if not diff and not env_change:
            return Result({"backup": backup.summary(), "changes": _restore_changes(paths, diff, None)[0],
                           "restored": False}, [f"{paths.config_dir} already matches backup {backup.id}"])
        ctx.confirm(f"Replace the configuration in {paths.config_dir} and {paths.env_file} with backup {backup.id}?")
        if not no_backup:
            safety = take_backup(paths, f"before restore of {backup.id}", safety=True)
            ids.append(safety.id)
            lines.append(f"saved the current configuration as {safety.id}")
        diff, env_change = compare(backup, paths)  # the tree as it is now, not as it was before the prompt
        restore_backup(backup, paths, diff, env_change)
    changes, done = _restore_changes(paths, diff, env_change)
    lines = [f"restored {backup.id}: {count(len(done), 'path')} changed", *done, *lines]
    if ids:
        lines.append(f"to undo: {ctx.script} restore {ids[0]} --yes")
    return Result({"backup": backup.summary(), "changes": changes, "restored": True,
                   "safety_backup": ids[0] if ids else None}, lines, backup_ids=[backup.id, *ids])


def _restore_plan(paths: ConfigPaths, ref: str) -> tuple[Backup, TreeDiff, str | None]:
    backup = resolve_component(paths.store, ref)
    refuse_damaged(backup)
    return backup, *compare(backup, paths)


def _restore_changes(paths: ConfigPaths, diff: TreeDiff, env_change: str | None,
                     done: bool = True) -> tuple[dict, list[str]]:
    """What a restore did (done) or would do, by what it does to each path: for --json, and for people."""
    lines = diff.restore_lines(str(paths.config_dir), done)
    if env_change:
        lines.append(f"  {restore_label(env_change, done):10} {paths.env_file}")
    return {**diff.restore_json(), "env_file": restore_label(env_change) if env_change else None}, lines
