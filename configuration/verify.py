"""Verifying the configuration: every file parses, ENV_FILE is private and complete, backups are sound, drift."""

from __future__ import annotations

import os
from pathlib import Path

from backup_store.manifest import check_backup
from backup_store.store import resolve_component
from common.cli import Context, Result
from common.errors import UsageError
from common.files import file_mode, is_inside
from common.text import count
from configuration import formats
from configuration.paths import ConfigPaths
from configuration.restore import compare


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


def parse_problems(files: list[Path], env_file: Path) -> list[str]:
    """One line per file of a format we read that does not parse within update's bounds."""
    problems = []
    for path in files:
        try:
            fmt = formats.file_format(path, env_file)
        except UsageError:
            continue  # not a format we can read: nothing to check
        problem = formats.check_file(path, fmt)
        if problem:
            problems.append(f"{problem.path}:{problem.line}:{problem.column}: {problem.message}")
    return problems


def env_file_problems(env_file: Path) -> list[str]:
    """ENV_FILE readable by group or others, or missing keys (or missing) while a .env.example sits beside it."""
    problems = []
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


def verify_config(ctx: Context, against_ref: str | None) -> Result:
    """verify: files parse, ENV_FILE is private and complete, the newest backup is sound; report drift
    (with against_ref, drift from that backup is a problem). Problems exit 3."""
    paths = ConfigPaths.from_settings(ctx.settings)
    if not paths.config_dir.is_dir():
        raise UsageError(f"CONFIG_DIR {paths.config_dir} is not a folder")
    notes: list[str] = []
    files = config_files(paths)
    problems = parse_problems(files, paths.env_file) + env_file_problems(paths.env_file)
    newest = paths.store.latest()
    against = resolve_component(paths.store, against_ref) if against_ref else newest
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
        elif against_ref:
            problems.append(f"drift from backup {against.id}:")
            problems += drift_lines
        else:
            notes += [f"changed since backup {against.id}:", *drift_lines]
    data = {"files_checked": len(files), "problems": problems, "notes": notes, "drift": drift,
            "against": against.id if against else None}
    verdict = f"verify: {len(files)} files checked, " + (count(len(problems), "problem") if problems else "OK")
    lines = [verdict] + [f"  {p}" if not p.startswith("  ") else p for p in problems] + notes
    return Result(data, lines, exit_code=3 if problems else 0, report=True)
