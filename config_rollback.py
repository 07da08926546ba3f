#!/usr/bin/env python3
"""config_rollback.py: back up, restore, patch and verify an application's configuration folder and .env."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from backup_store.manifest import Backup, check_backup
from backup_store.store import BackupStore, refuse_damaged, resolve_component
from backup_store.trees import TreeDiff, diff_tree, matches, restore_label, restore_tree, tree_entries
from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command, cleanup_backups, list_backups
from common.cli import (
    Context,
    Result,
    add_backup_argument,
    add_backup_arguments,
    add_command,
    add_no_backup_argument,
    make_parser,
)
from common.components import CONFIG
from common.errors import SettingError, ToolkitError, UsageError
from common.files import WriteFailed, atomic_write, file_mode, is_inside, resolve_inside
from common.settings import Settings
from common.text import count, human_size
from configuration import formats
from offsite.pull import open_store

TREE = "config"  # where CONFIG_DIR lives inside a backup
ENV_ENTRY = "env_file"  # where ENV_FILE lives inside a backup
MAX_PATCH_BYTES = 16 << 20  # a patch read from standard input or a file


@dataclass
class ConfigPaths:
    """The live configuration and its store, from the settings."""

    config_dir: Path
    env_file: Path
    store: BackupStore

    @classmethod
    def from_settings(cls, settings: Settings) -> ConfigPaths:
        """CONFIG_DIR, ENV_FILE and CONFIG_BACKUP_DIR with the documented defaults; backups inside CONFIG_DIR
        are refused (each backup would copy the ones before it, until a name grew too long)."""
        paths = cls(
            config_dir=settings.path("CONFIG_DIR", "./config"),
            env_file=settings.path("ENV_FILE", ".env"),
            store=open_store(settings, CONFIG),
        )
        if is_inside(paths.store.root, paths.config_dir):
            raise SettingError(f"CONFIG_BACKUP_DIR {paths.store.root} is inside CONFIG_DIR {paths.config_dir}: "
                               "keep the backups outside the configuration they back up", setting=CONFIG.store_setting)
        return paths

    @property
    def env_in_tree(self) -> bool:
        """An ENV_FILE inside CONFIG_DIR is already part of the tree."""
        return self.config_dir.is_dir() and is_inside(self.env_file, self.config_dir)


# -- the work ---------------------------------------------------------------------------------------


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
        staging.source = {
            "host": socket.gethostname(),
            "config_dir": str(paths.config_dir.resolve()),
            "env_file": str(paths.env_file.resolve()),
            "env_file_present": has_env or paths.env_in_tree,
            "env_file_in_config_dir": paths.env_in_tree,
            "config_dir_present": present,
        }
        if present:
            staging.add_tree(paths.config_dir, TREE)
        if has_env:
            staging.add_file(paths.env_file, ENV_ENTRY)
    return staging.backup


def compare(backup: Backup, paths: ConfigPaths) -> tuple[TreeDiff, str | None]:
    """How the live configuration differs from a backup: the tree's diff and the ENV_FILE's ("" if same)."""
    diff = diff_tree(tree_entries(backup, TREE), paths.config_dir)
    if backup.source.get("env_file_in_config_dir") or paths.env_in_tree:
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


def resolve_target(paths: ConfigPaths, name: str) -> Path:
    """The file `update` may change: ENV_FILE by name, or a path that stays inside CONFIG_DIR."""
    if name.endswith(("/", "/.")) or Path(name).name in ("", ".", ".."):  # Path() would drop a final "/"
        raise UsageError(f"{name} names a folder: give the file's own name")
    if name == str(paths.env_file) or Path(name).resolve() == paths.env_file.resolve():
        target = paths.env_file.resolve()
    else:
        if not paths.config_dir.is_dir():
            raise UsageError(f"CONFIG_DIR {paths.config_dir} is not a folder")
        target = resolve_inside(paths.config_dir, name, "FILE")
    if not target.is_file():
        raise UsageError(f"{name}: no such file in {paths.config_dir} (update changes existing files only)")
    return target


def patch_file(target: Path, patch_json: str, env_file: Path) -> tuple[bytes, str, str]:
    """Apply a merge patch to a config file's text; return (new bytes, old text, new text)."""
    fmt = formats.editable_format(target, env_file)
    patch = formats.parse_merge_patch(patch_json)
    try:
        old = target.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{target} is not UTF-8 text") from None
    new = formats.patch_text(fmt, old, patch)
    return new.encode("utf-8"), old, new


def read_patch(args) -> str:
    """The merge patch's text: the JSON argument, standard input for `-`, or the --patch-file."""
    if (args.patch is None) == (args.patch_file is None):
        raise UsageError("give the patch once: as JSON, as - (read from standard input) or with --patch-file PATH")
    if args.patch_file is None and args.patch != "-":
        return args.patch
    source = args.patch_file or "standard input"
    try:
        if args.patch_file is None:
            raw = sys.stdin.buffer.read(MAX_PATCH_BYTES + 1)
        else:
            with open(args.patch_file, "rb") as patch_file:
                raw = patch_file.read(MAX_PATCH_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the patch file {args.patch_file}: {exc.strerror}") from None
    if len(raw) > MAX_PATCH_BYTES:  # /dev/zero or a wrong file: stop reading rather than fill the memory
        raise UsageError(f"the patch in {source} is larger than {MAX_PATCH_BYTES >> 20} MiB: not a patch")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UsageError(f"the patch in {source} is not UTF-8 text") from None


def config_files(paths: ConfigPaths) -> list[Path]:
    """Every file verify parses: regular files in CONFIG_DIR (links inside it followed) and ENV_FILE."""
    found = []
    for dirpath, _dirs, names in os.walk(paths.config_dir):
        for name in sorted(names):
            path = Path(dirpath) / name
            if path.is_file() and is_inside(path, paths.config_dir):
                found.append(path)
    if not paths.env_in_tree and paths.env_file.is_file():
        found.append(paths.env_file)
    return found


# -- the commands -----------------------------------------------------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: snapshot CONFIG_DIR and ENV_FILE."""
    paths = ConfigPaths.from_settings(ctx.settings)
    if ctx.dry_run:
        if not paths.config_dir.is_dir():
            raise UsageError(f"CONFIG_DIR {paths.config_dir} is not a folder")
        files = sum(len(names) for _, _, names in os.walk(paths.config_dir))
        return Result({"dry_run": True, "files": files},
                      [f"would back up {files} files of {paths.config_dir} and {paths.env_file}"], report=True)
    with paths.store.lock("config_rollback.py backup"):
        backup = take_backup(paths, ctx.args.label)
    return Result({"backup": backup.summary()}, [_describe(backup, "backup")], backup_ids=[backup.id])


def cmd_restore(ctx: Context) -> Result:
    """restore BACKUP: checksums first, a backup of the current state, then the backup's exact tree."""
    paths = ConfigPaths.from_settings(ctx.settings)
    if ctx.dry_run:
        backup, diff, env_change = _restore_plan(paths, ctx.args.backup)
        changes, planned = _restore_changes(paths, diff, env_change, done=False)
        return Result({"backup": backup.summary(), "changes": changes, "dry_run": True},
                      [f"restoring {backup.id} would:", *planned] if planned else
                      [f"{paths.config_dir} already matches backup {backup.id}"], report=True)
    ids = []
    lines = []
    # Everything from resolving the backup to the last file happens under the lock, so a cleanup or
    # another restore cannot remove the backup or change the tree between the check and the writes.
    with paths.store.lock("config_rollback.py restore"):
        backup, diff, env_change = _restore_plan(paths, ctx.args.backup)
        if not diff and not env_change:
            return Result({"backup": backup.summary(), "changes": _restore_changes(paths, diff, None)[0],
                           "restored": False}, [f"{paths.config_dir} already matches backup {backup.id}"])
        ctx.confirm(f"Replace the configuration in {paths.config_dir} and {paths.env_file} with backup {backup.id}?")
        if not ctx.args.no_backup:
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


def cmd_update(ctx: Context) -> Result:
    """update FILE JSON|-|--patch-file F: merge-patch one YAML, JSON or .env file, keeping every untouched line."""
    paths = ConfigPaths.from_settings(ctx.settings)
    target = resolve_target(paths, ctx.args.file)
    patch = read_patch(ctx.args)
    if ctx.dry_run:
        _, old, new = patch_file(target, patch, paths.env_file)
        diff = formats.masked_diff(old, new, ctx.args.file)
        return Result({"file": str(target), "changed": old != new, "dry_run": True, "diff": diff},
                      [diff or f"{ctx.args.file}: no change"], report=True)
    with paths.store.lock("config_rollback.py update"):
        data, old, new = patch_file(target, patch, paths.env_file)
        diff = formats.masked_diff(old, new, ctx.args.file)
        if old == new:
            return Result({"file": str(target), "changed": False, "diff": ""}, [f"{ctx.args.file}: no change"])
        ids = [] if ctx.args.no_backup else [take_backup(paths, f"before update of {ctx.args.file}",
                                                               safety=True).id]
        st = target.stat()
        try:
            atomic_write(target, data, mode=file_mode(st), owner=(st.st_uid, st.st_gid))
        except WriteFailed as exc:
            raise ToolkitError(f"{exc}; the file was left as it was") from None
    lines = [diff] + ([f"saved the previous configuration as {ids[0]}; to undo: {ctx.script} restore {ids[0]} --yes"]
                      if ids else [])
    return Result({"file": str(target), "changed": True, "diff": diff, "safety_backup": ids[0] if ids else None},
                  lines, backup_ids=ids)


def cmd_verify(ctx: Context) -> Result:
    """verify: files parse, ENV_FILE is private and complete, the newest backup is sound; report drift."""
    paths = ConfigPaths.from_settings(ctx.settings)
    if not paths.config_dir.is_dir():
        raise UsageError(f"CONFIG_DIR {paths.config_dir} is not a folder")
    problems: list[str] = []
    notes: list[str] = []
    files = config_files(paths)
    for path in files:
        try:
            fmt = formats.file_format(path, paths.env_file)
        except UsageError:
            continue  # not a format we can read: nothing to check
        problem = formats.check_file(path, fmt)
        if problem:
            problems.append(f"{problem.path}:{problem.line}:{problem.column}: {problem.message}")
    problems += _env_file_problems(paths)
    newest = paths.store.latest()
    against = resolve_component(paths.store, ctx.args.against) if ctx.args.against else newest
    drift = None
    if newest is None:
        notes.append(f"no backups in {paths.store.root} yet")
    for backup in {b.id: b for b in (newest, against) if b is not None}.values():
        problems += [f"backup {backup.id}: {problem}" for problem in check_backup(backup)]
    if against is not None:
        diff, env_change = compare(against, paths)
        drift = {**diff.to_json(), "env_file": env_change}
        drift_lines = diff.lines(str(paths.config_dir)) + ([f"  {env_change:8} {paths.env_file}"] if env_change else [])
        if not drift_lines:
            notes.append(f"no drift from backup {against.id}")
        elif ctx.args.against:
            problems.append(f"drift from backup {against.id}:")
            problems += drift_lines
        else:
            notes += [f"changed since backup {against.id}:", *drift_lines]
    data = {"files_checked": len(files), "problems": problems, "notes": notes, "drift": drift,
            "against": against.id if against else None}
    verdict = f"verify: {len(files)} files checked, " + (count(len(problems), "problem") if problems else "OK")
    lines = [verdict] + [f"  {p}" if not p.startswith("  ") else p for p in problems] + notes
    return Result(data, lines, exit_code=3 if problems else 0, report=True)


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: remove backups older than DAYS, always keeping the newest --keep."""
    return cleanup_backups(ctx, ConfigPaths.from_settings(ctx.settings).store, "config_rollback.py")


def cmd_list(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_backups(ConfigPaths.from_settings(ctx.settings).store)


# -- helpers ----------------------------------------------------------------------------------------


def _env_file_problems(paths: ConfigPaths) -> list[str]:
    problems = []
    env_file = paths.env_file
    if env_file.is_file():
        mode = file_mode(env_file.stat())
        if mode & 0o044:
            problems.append(f"{env_file} is readable by group or others (mode {mode:04o}): chmod 600 {env_file}")
    example = env_file.with_name(".env.example")
    if example.is_file() and example != env_file:
        if not env_file.is_file():
            problems.append(f"{env_file} is missing but {example} exists")
        else:
            have = set(formats.env_keys(env_file.read_text(errors="replace")))
            missing = [k for k in formats.env_keys(example.read_text(errors="replace")) if k not in have]
            if missing:
                problems.append(f"{env_file} lacks keys listed in {example}: {', '.join(missing)}")
    return problems


def _describe(backup: Backup, what: str) -> str:
    return f"{what} {backup.id}: {len(backup.files)} files, {human_size(backup.size)}, in {backup.path}"


# -- the command line -------------------------------------------------------------------------------


def build_parser():
    """Every command of config_rollback.py."""
    parser, commands = make_parser(
        "config_rollback.py",
        "Back up, restore, patch and verify the configuration folder (CONFIG_DIR) and the .env file (ENV_FILE).",
        "settings (environment, then .env, then defaults):\n"
        "  CONFIG_DIR=./config  CONFIG_BACKUP_DIR=./config_backups  ENV_FILE=.env  AUDIT_LOG=<store>/audit.log\n\n"
        "examples:\n"
        "  config_rollback.py backup --label before-deploy\n"
        "  config_rollback.py update app.yml '{\"server\": {\"port\": 8081}}'\n"
        "  config_rollback.py update .env - < rotated-secrets.json\n"
        "  config_rollback.py restore latest --yes\n"
        "  config_rollback.py verify --against latest\n"
        "  config_rollback.py cleanup 30 --keep 5",
    )
    sub = add_command(commands, "backup", cmd_backup, "snapshot CONFIG_DIR and ENV_FILE")
    add_backup_arguments(sub)

    sub = add_command(commands, "restore", cmd_restore, "make CONFIG_DIR and ENV_FILE exactly a backup",
                      "Checks the backup's checksums, saves the current state as a new backup, then makes\n"
                      "CONFIG_DIR and ENV_FILE exactly the backup (bytes and modes; files it lacks are\n"
                      "removed), replacing each file atomically once every file is written: a file that\n"
                      "cannot be written (a full disk) is named, and nothing is changed (exit 1).")
    add_backup_argument(sub)
    add_no_backup_argument(sub)

    sub = add_command(commands, "update", cmd_update, "merge-patch one YAML, JSON or .env file",
                      "Applies JSON as an RFC 7386 merge patch (objects merge, null deletes a key, anything\n"
                      "else replaces) and shows the diff. Lines the patch does not touch stay byte for byte.\n"
                      "Values of keys naming a secret are masked in the diff: a word of the key is pass, pwd,\n"
                      "pw, key(s), pin, private or apikey, or holds password, secret, token or credential\n"
                      "(DB_PASS, SESSION_KEY, apiToken; not KEYBOARD_LAYOUT).\n\n"
                      "A patch holding a secret goes in as - (read from standard input) or --patch-file,\n"
                      "never on the command line, where every user of the machine can see it; the audit log\n"
                      "never records the patch's content.\n\n"
                      "YAML is written so that YAML 1.1 and 1.2 readers read what the JSON meant: strings\n"
                      "they could take for booleans, numbers or null (yes, off, 12:30...) are quoted, floats\n"
                      "keep a dot (1.0e+300). Refused (exit 2): a file or patch nested deeper than 100\n"
                      "levels, YAML aliases adding more than 100,000 values, NaN, Infinity, numbers JSON\n"
                      "cannot hold.",
                      secret_args=("patch",))
    sub.add_argument("file", metavar="FILE", help="a file relative to CONFIG_DIR, or the ENV_FILE (not a folder: "
                                                  "no final /)")
    sub.add_argument("patch", metavar="JSON", nargs="?",
                     help="the merge patch, a JSON object; - reads it from standard input")
    sub.add_argument("--patch-file", metavar="PATH", help="read the merge patch from this file instead")
    add_no_backup_argument(sub)

    sub = add_verify_command(commands, cmd_verify, "check that the configuration parses and matches a backup",
                      "Every YAML/JSON/.env/TOML/INI file must parse within the bounds of update (see its\n"
                      "--help); ENV_FILE must not be readable by group or others and must have the keys of a\n"
                      ".env.example beside it; the newest backup's checksums must hold. Drift from the newest\n"
                      "backup is reported; with --against any drift from that backup is a problem. Problems\n"
                      "exit 3.")
    sub.add_argument("--against", metavar="BACKUP", help="fail (exit 3) on any drift from this backup")

    add_store_commands(commands, cmd_cleanup, cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run config_rollback.py."""
    return run(build_parser(), CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())

