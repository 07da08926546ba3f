""".env files: editing them in place for `patch_text`, and the keys they define (`env_keys`)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

from common.errors import ToolkitError, UsageError

from .merge_patch import _kind
from .text import _BOM, _ends_with_newline, _newline_of, _split_bom

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
# What comes before the value on an assignment line, as python-dotenv reads it: `export`, the key, `=`.
_ENV_HEAD = re.compile(r"(?:export[^\S\r\n]+)?(?:'[^']+'|[^=#\s]+)[^\S\r\n]*=")
_ENV_QUOTED = {"'": re.compile(r"'(?:\\.|[^'\\])*'", re.S), '"': re.compile(r'"(?:\\.|[^"\\])*"', re.S)}
_ENV_NEEDS_QUOTES = re.compile(r"[\s#'\"$\\=`]")


def _env_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return value
    raise UsageError(f"{key}: a .env value must be a string, number or boolean, not {_kind(value)}")


def _env_quote(value: str, style: str | None) -> str:
    """VALUE written so that python-dotenv reads it back, in STYLE (a quote or None) when STYLE can."""
    # In single quotes python-dotenv decodes only \\ and \', so a value without ' is safe once its
    # backslashes are doubled; double quotes take every value, with backslash escapes. Note that
    # python-dotenv expands ${NAME} in every kind of value, single-quoted too: quotes cannot stop that.
    single_ok = "'" not in value and "\n" not in value and "\r" not in value
    if style == "'" and single_ok or (style is None and single_ok and _env_needs_quotes(value)):
        return "'" + value.replace("\\", "\\\\") + "'"
    if style is None and not _env_needs_quotes(value):
        return value
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r"))
    return '"' + escaped + '"'


def _env_needs_quotes(value: str) -> bool:
    return value == "" or bool(_ENV_NEEDS_QUOTES.search(value)) or not value.isprintable()


@dataclass
class _EnvSegment:
    """One binding of python-dotenv's parser: the text it covers, split where an edit needs it."""

    key: str | None
    value: str | None
    blank: str  # whole blank lines before the binding
    text: str  # the binding itself, from its indentation to its line ending


def _env_segments(text: str) -> list[_EnvSegment]:
    from dotenv.parser import parse_stream

    segments = []
    for binding in parse_stream(io.StringIO(text)):
        raw = binding.original.string
        body = raw.lstrip()
        lead = raw[: len(raw) - len(body)]
        cut = max(lead.rfind("\n"), lead.rfind("\r")) + 1
        segments.append(_EnvSegment(binding.key, binding.value, lead[:cut], lead[cut:] + body))
    return segments


def _env_rewrite(segment: _EnvSegment, key: str, value: str) -> str:
    """The binding's text with VALUE in place of its value; indentation, export, comment and ending kept."""
    indent = segment.text[: len(segment.text) - len(segment.text.lstrip(" \t"))]
    body = segment.text[len(indent):]
    head = _ENV_HEAD.match(body)
    ending = re.search(r"(\r\n|\n|\r)?\Z", body).group()
    if head is None:  # `KEY` alone, without `=` (perhaps with a comment)
        key_part = re.match(r"(?:export[^\S\r\n]+)?(?:'[^']+'|[^=#\s]+)", body).group()
        return indent + key_part + "=" + _env_quote(value, None) + body[len(key_part):]
    rest = body[head.end():]
    gap = re.match(r"[^\S\r\n]*", rest).group()
    rest = rest[len(gap):]
    style = rest[:1] if rest[:1] in _ENV_QUOTED else None
    if style:
        quoted = _ENV_QUOTED[style].match(rest)
        end = quoted.end() if quoted else len(rest.rstrip("\r\n"))
    elif gap and rest.startswith("#"):  # `KEY= # comment`: an empty value, then a comment
        end = 0
    else:
        line = rest[: len(rest) - len(ending)]
        comment = re.search(r"\s+#", line)
        end = comment.start() if comment else len(line.rstrip())
    tail = rest[end:]
    if tail.startswith("#"):
        tail = " " + tail
    return indent + body[: head.end()] + gap + _env_quote(value, style) + tail


def _patch_env(text: str, patch: dict) -> str:
    from dotenv import dotenv_values

    bom, original = _split_bom(text)
    updates: dict[str, str | None] = {}
    for key, value in patch.items():
        if not _ENV_KEY.match(key):
            raise UsageError(f"not a valid .env key name: {key!r} (letters, digits, _ . -; not starting "
                             "with a digit)")
        updates[key] = None if value is None else _env_value(key, value)

    segments = _env_segments(original)
    current = {s.key: s.value for s in segments if s.key is not None}  # the last assignment wins
    newline = _newline_of(original)
    appended = []
    changed = False
    for key, value in updates.items():
        mine = [s for s in segments if s.key == key]
        if value is None:
            for segment in mine:
                segment.text, changed = "", True
        elif not mine:
            appended.append(f"{key}={_env_quote(value, None)}{newline}")
        elif current[key] != value:
            mine[-1].text, changed = _env_rewrite(mine[-1], key, value), True
    if not changed and not appended:
        return text

    result = "".join(s.blank + s.text for s in segments)
    if appended:
        if result and not _ends_with_newline(result):
            result += newline
        result += "".join(appended)

    expected = dict(dotenv_values(stream=io.StringIO(original), interpolate=False))
    for key, value in updates.items():
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    if dict(dotenv_values(stream=io.StringIO(result), interpolate=False)) != expected:
        raise ToolkitError("the patched .env does not read back as expected; the file was not changed")
    return bom + result


def env_keys(text: str) -> list[str]:
    """The keys a .env text defines, each once, in the order they first appear."""
    return list(dict.fromkeys(s.key for s in _env_segments(text.removeprefix(_BOM)) if s.key is not None))
