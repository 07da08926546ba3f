"""Which file is which: the formats known by file name, and which of them `update` can edit."""

from __future__ import annotations

from pathlib import Path

from common.errors import UsageError

# Suffix -> format; .env files are recognised by name instead (see file_format).
FORMATS = {".yml": "yaml", ".yaml": "yaml", ".json": "json", ".toml": "toml", ".ini": "ini"}
EDITABLE = ("yaml", "json", "env")


def file_format(path: Path, env_file: Path | None = None) -> str:
    """The format of PATH: yaml, json, env, toml or ini; UsageError for anything else."""
    if env_file is not None and _same_file(path, env_file):
        return "env"
    name = path.name
    if name == ".env" or name.startswith(".env.") or name.endswith(".env"):
        return "env"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"unknown file type: {name} (known: .yml .yaml .json .env .toml .ini)")
    return fmt


def editable_format(path: Path, env_file: Path | None = None) -> str:
    """The format of PATH if `update` can edit it (yaml, json, env); UsageError otherwise."""
    try:
        fmt = file_format(path, env_file)
    except UsageError:
        raise UsageError(f"unknown file type: {path.name} (editable: .yml .yaml .json .env)") from None
    if fmt not in EDITABLE:
        raise UsageError(f"{path.name}: {fmt.upper()} files are only checked, not edited "
                         "(editable: .yml .yaml .json .env)")
    return fmt


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()
