"""Settings: the process environment first, then the `.env` file (python-dotenv), then defaults."""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

from common.errors import SettingError

DEFAULT_ENV_FILE = ".env"

# Every setting the toolkit reads (README's table lists each); a near miss of one of these is warned about.
KNOWN_SETTINGS = frozenset({
    "CONFIG_DIR", "CONFIG_BACKUP_DIR", "ENV_FILE", "AUDIT_LOG",
    "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD", "BACKUP_DIR", "MIGRATIONS_DIR", "DB_LOCK_TIMEOUT",
    "PG_BINDIR", "DB_ENGINE", "PGBACKREST_STANZA", "PGBACKREST_CONFIG", "PGBACKREST_MAX_AGE_HOURS", "PGDATA",
    "PG_STOP_COMMAND", "PG_START_COMMAND",
    "REPO_PATH", "DEPLOYMENT_DIR", "CODE_BACKUP_DIR", "CODE_EXCLUDE", "KEEP_RELEASES", "LINKED_PATHS", "BUILD_HOOK",
    "RESTART_HOOK",
    "POINTS_DIR", "PRE_RESTORE_HOOK", "POST_RESTORE_HOOK", "HOOK_TIMEOUT_SECONDS", "HEALTHCHECK_URL",
    "LOCK_WAIT_SECONDS", "RETENTION", "SAFETY_KEEP_DAYS",
    "HEALTH_MAX_ERROR_RATE", "HEALTH_MAX_P95_MS", "HEALTH_MAX_CPU", "HEALTH_MAX_MEMORY", "HEALTH_REQUESTS",
    "HEALTH_TIMEOUT", "HEALTH_MAX_CONNECTIONS_PERCENT", "HEALTH_MAX_TRANSACTION_SECONDS", "HEALTH_MAX_BLOCKED",
    "RTO_CONFIG_SECONDS", "RTO_CODE_SECONDS", "RTO_DATABASE_SECONDS", "METRICS_FILE",
    "REMOTE_URL", "S3_ENDPOINT_URL", "REMOTE_AUTO_PUSH", "REMOTE_ENCRYPTION_KEY_FILE", "REMOTE_CLEANUP_GRACE_SECONDS",
    "S3_TIMEOUT_SECONDS",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE",
})
MAX_SETTINGS_BYTES = 1 << 20  # what a settings file may expand to
_REFERENCE = re.compile(r"\$\{([^}:]*)(?::-([^}]*))?\}")  # python-dotenv's ${NAME} and ${NAME:-default}
_NEAR_MISS = 0.9  # difflib's ratio: CONFG_DIR and DB_PASWORD are 0.95 from the real names


class Settings:
    """Typed read access to the toolkit's variables; every error names the variable."""

    def __init__(self, environ: dict[str, str], file_values: dict[str, str], env_file: Path | None):
        self._environ = environ
        self._file_values = file_values
        self.env_file = env_file  # the file the settings were read from, if any
        self.warnings = _near_misses(file_values, env_file) + _near_misses(environ, None)

    @classmethod
    def load(cls, env_file: str | None = None, environ: dict[str, str] | None = None) -> Settings:
        """Read settings; `env_file` is `--env-file` (must exist), else `.env` in the working folder if any."""
        environ = dict(os.environ if environ is None else environ)
        if env_file is not None:
            path = Path(env_file)
            if not path.is_file():
                raise SettingError(f"--env-file {env_file}: no such file")
        else:
            path = Path(DEFAULT_ENV_FILE)
            if not path.is_file():
                return cls(environ, {}, None)
        return cls(environ, _read_env_file(path), path)

    def raw(self, name: str) -> str | None:
        """The value of `name` from the environment, else the .env file, else None."""
        if name in self._environ:
            return self._environ[name]
        return self._file_values.get(name)

    def text(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        """A string setting; an empty value counts as unset."""
        value = self.raw(name)
        if value is None or value.strip() == "":
            if required and default is None:
                raise SettingError(f"{name} is not set: set it in the environment or in the .env file")
            return default
        return value

    def path(self, name: str, default: str | None = None, required: bool = False) -> Path | None:
        """A filesystem path setting, with `~` expanded. A relative path from the settings file, or a default,
        is relative to the file's folder (so a run from anywhere finds the same stores); one from the
        environment is relative to the working folder, as the shell that set it meant."""
        value = self.text(name, default, required)
        if value is None:
            return None
        if "\0" in value:
            raise SettingError(f"{name} is not a valid path: it contains a NUL byte")
        return self.relative_to_source(name, Path(value).expanduser())

    def relative_to_source(self, name: str, path: Path) -> Path:
        """`path`, read from setting `name` (or its default), made relative to where it was written: the
        settings file's folder, or the working folder for a value from the environment."""
        from_environment = (self._environ.get(name) or "").strip() != ""
        if self.env_file is None or from_environment or path.is_absolute():
            return path
        return self.env_file.parent / path

    def integer(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        """A whole-number setting within [minimum, maximum]."""
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value.strip())
        except ValueError:
            raise SettingError(f"{name} must be a whole number, got {value!r}") from None
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            low = "" if minimum is None else f" >= {minimum}"
            high = "" if maximum is None else f" <= {maximum}"
            raise SettingError(f"{name} must be{low}{' and' if low and high else ''}{high}, got {number}")
        return number

    def number(self, name: str, default: float, minimum: float | None = None) -> float:
        """A decimal-number setting, at least `minimum`."""
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value.strip())
        except ValueError:
            raise SettingError(f"{name} must be a number, got {value!r}") from None
        # float() accepts "nan" and "inf", which no threshold or timeout can mean.
        if not math.isfinite(number):
            raise SettingError(f"{name} must be a finite number, got {value!r}")
        if minimum is not None and number < minimum:
            raise SettingError(f"{name} must be >= {minimum:g}, got {number:g}")
        return number


def _read_env_file(path: Path) -> dict[str, str]:
    """The file's settings; a line python-dotenv cannot read stops the run (its value would silently be lost)."""
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"cannot read settings file {path}: {exc}") from None
    expanded: dict[str, int] = {}  # each key's length once its ${...} references are expanded, at most
    for binding in parse_stream(io.StringIO(text)):
        where = f"settings file {path}, line {binding.original.line}"
        if binding.error:  # the line itself is not shown: it may hold a password
            raise SettingError(f"{where}: not KEY=value (e.g. DB_PORT=5432); fix or remove the line")
        if binding.key is not None and binding.value is not None:
            expanded[binding.key] = _expanded_length(binding.value, expanded)
            # B=${A}${A}, C=${B}${B}, ... doubles at each line: refused before python-dotenv builds it.
            if sum(expanded.values()) > MAX_SETTINGS_BYTES:
                raise SettingError(f"{where}: the values, with their ${{...}} references expanded, pass "
                                   f"{MAX_SETTINGS_BYTES >> 20} MiB: refused")
    values = dotenv_values(stream=io.StringIO(text), interpolate=True)
    # A bare `KEY` line yields None: treat it as unset rather than as an empty string.
    return {key: value for key, value in values.items() if value is not None}


def _expanded_length(value: str, expanded: dict[str, int]) -> int:
    """An upper bound of `value`'s length once python-dotenv has replaced its ${NAME} and ${NAME:-default}."""
    length = len(value)
    for reference in _REFERENCE.finditer(value):
        name, default = reference.group(1), reference.group(2) or ""
        length += max(expanded.get(name, 0), len(os.environ.get(name, "")), len(default)) - len(reference.group(0))
    return length


def _near_misses(values: dict[str, str], source: Path | None) -> list[str]:
    """A warning for each name that is not a setting but is one letter or so away from one (CONFG_DIR)."""
    import difflib  # here, not at the top: --help reads no settings and need not load it

    where = f"{source}: " if source else "the environment: "
    found = []
    for name in sorted(values):
        if name in KNOWN_SETTINGS:
            continue
        close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1, cutoff=_NEAR_MISS)
        if close:
            found.append(f"{where}{name} is not a setting of the toolkit: did you mean {close[0]}?")
    return found
