"""Settings: the process environment first, then the `.env` file (python-dotenv), then defaults."""

from __future__ import annotations

import math
import os
from pathlib import Path

from common.errors import SettingError

DEFAULT_ENV_FILE = ".env"


class Settings:
    """Typed read access to the toolkit's variables; every error names the variable."""

    def __init__(self, environ: dict[str, str], file_values: dict[str, str], env_file: Path | None):
        self._environ = environ
        self._file_values = file_values
        self.env_file = env_file  # the file the settings were read from, if any

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
        """A filesystem path setting, with `~` expanded."""
        value = self.text(name, default, required)
        if value is None:
            return None
        if "\0" in value:
            raise SettingError(f"{name} is not a valid path: it contains a NUL byte")
        return Path(value).expanduser()

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
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path, interpolate=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"cannot read settings file {path}: {exc}") from None
    # A bare `KEY` line yields None: treat it as unset rather than as an empty string.
    return {key: value for key, value in values.items() if value is not None}
