"""Backing up the configuration: the snapshot of CONFIG_DIR and ENV_FILE, and the store's list and cleanup."""

from __future__ import annotations

import os

from backup_store.manifest import Backup
from commands.retention_commands import cleanup_backups
from commands.store_commands import list_backups
from common.cli import Context, Result
from common.errors import UsageError
from common.text import human_size
from configuration.paths import ENV_ENTRY, TREE, ConfigPaths
from configuration.source import ConfigSource


def take_backup(paths: ConfigPaths, label: str | None, safety: bool = False) -> Backup:
    """Snapshot CONFIG_DIR and ENV_FILE into the store (the caller holds the lock).

    A safety backup is taken even when CONFIG_DIR is gone (it then records no tree), so a restore after
    the folder was deleted still saves the ENV_FILE it replaces.
    """
    present = paths.config_dir.is_dir()
    if not present and not safety:
        raise UsageError(f"CONFIG_DIR {paths.config_dir} is not a folder: set CONFIG_DIR to the configuration folder")
    with paths.store.new_backup(label, safety=safety) as staging:
        has_env = not paths.env_in_tree and os.path.lexists(paths.env_file)
        staging.source = ConfigSource(
            host=os.uname().nodename,
            config_dir=str(paths.config_dir.resolve()),
            env_file=str(paths.env_file.resolve()),
            env_file_present=has_env or paths.env_in_tree,
            env_file_in_config_dir=paths.env_in_tree,
            config_dir_present=present,
        ).dump()
        if present:
            staging.add_tree(paths.config_dir, TREE)
        if has_env:
            staging.add_file(paths.env_file, ENV_ENTRY)
    return staging.backup


def back_up(ctx: Context, label: str | None) -> Result:
    """backup: snapshot CONFIG_DIR and ENV_FILE; --dry-run counts the files instead."""
    paths = ConfigPaths.from_settings(ctx.settings)
    if ctx.dry_run:
        if not paths.config_dir.is_dir():
            raise UsageError(f"CONFIG_DIR {paths.config_dir} is not a folder")
        files = sum(len(names) for _, _, names in os.walk(paths.config_dir))
        return Result({"dry_run": True, "files": files},
                      [f"would back up {files} files of {paths.config_dir} and {paths.env_file}"], report=True)
    with paths.store.lock(f"{ctx.script} backup"):
        backup = take_backup(paths, label)
    return Result({"backup": backup.summary()}, [describe(backup, "backup")], backup_ids=[backup.id])


def describe(backup: Backup, what: str) -> str:
    """One line for people: what was made, its id, files, size and folder."""
    return f"{what} {backup.id}: {len(backup.files)} files, {human_size(backup.size)}, in {backup.path}"


def cleanup_config_backups(ctx: Context) -> Result:
    """cleanup DAYS: remove backups older than DAYS, always keeping the newest --keep."""
    return cleanup_backups(ctx, ConfigPaths.from_settings(ctx.settings).store, ctx.script)


def list_config_backups(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_backups(ConfigPaths.from_settings(ctx.settings).store)
