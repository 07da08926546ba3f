"""Updating one configuration file: which file, the merge patch's text, and the patched file written in place."""

from __future__ import annotations

import sys
from pathlib import Path

from common.cli import Context, Result
from common.errors import ToolkitError, UsageError
from common.files import WriteFailed, atomic_write, file_mode, resolve_inside
from configuration import formats
from configuration.backups import take_backup
from configuration.paths import ConfigPaths

MAX_PATCH_BYTES = 16 << 20  # a patch read from standard input or a file


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


def read_patch(patch: str | None, patch_path: str | None) -> str:
    """The merge patch's text: the JSON argument, standard input for `-`, or the --patch-file."""
    if (patch is None) == (patch_path is None):
        raise UsageError("give the patch once: as JSON, as - (read from standard input) or with --patch-file PATH")
    if patch_path is None and patch != "-":
        return patch
    source = patch_path or "standard input"
    try:
        if patch_path is None:
            raw = sys.stdin.buffer.read(MAX_PATCH_BYTES + 1)
        else:
            with open(patch_path, "rb") as stream:
                raw = stream.read(MAX_PATCH_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the patch file {patch_path}: {exc.strerror}") from None
    if len(raw) > MAX_PATCH_BYTES:  # /dev/zero or a wrong file: stop reading rather than fill the memory
        raise UsageError(f"the patch in {source} is larger than {MAX_PATCH_BYTES >> 20} MiB: not a patch")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UsageError(f"the patch in {source} is not UTF-8 text") from None


def update_file(ctx: Context, name: str, patch: str | None, patch_path: str | None, no_backup: bool) -> Result:
    """update FILE JSON|-|--patch-file F: merge-patch one YAML, JSON or .env file, keeping every untouched line;
    a backup of the configuration first (unless no_backup); --dry-run shows the diff only."""
    paths = ConfigPaths.from_settings(ctx.settings)
    target = resolve_target(paths, name)
    patch_json = read_patch(patch, patch_path)
    if ctx.dry_run:
        _, old, new = patch_file(target, patch_json, paths.env_file)
        diff = formats.masked_diff(old, new, name)
        return Result({"file": str(target), "changed": old != new, "dry_run": True, "diff": diff},
                      [diff or f"{name}: no change"], report=True)
    with paths.store.lock(f"{ctx.script} update"):
        data, old, new = patch_file(target, patch_json, paths.env_file)
        diff = formats.masked_diff(old, new, name)
        if old == new:
            return Result({"file": str(target), "changed": False, "diff": ""}, [f"{name}: no change"])
        ids = [] if no_backup else [take_backup(paths, f"before update of {name}", safety=True).id]
        st = target.stat()
        try:
            atomic_write(target, data, mode=file_mode(st), owner=(st.st_uid, st.st_gid))
        except WriteFailed as exc:
            raise ToolkitError(f"{exc}; the file was left as it was") from None
    lines = [diff] + ([f"saved the previous configuration as {ids[0]}; to undo: {ctx.script} restore {ids[0]} --yes"]
                      if ids else [])
    return Result({"file": str(target), "changed": True, "diff": diff, "safety_backup": ids[0] if ids else None},
                  lines, backup_ids=ids)
