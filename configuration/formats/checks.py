"""Checking that a file parses: `ParseProblem` and `check_file` for YAML, JSON, TOML, INI and .env files."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UsageError

from .bounds import Refused, bounded_yaml, check_toml_depth, load_json, long_integer
from .text import _BOM, _ends_with_newline, _split_lines


@dataclass(frozen=True)
class ParseProblem:
    """Where and why a file does not parse; line and column count from 1 (column 1: only the line known)."""

    path: Path
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}: line {self.line}, column {self.column}: {self.message}"


def check_file(path: Path, fmt: str) -> ParseProblem | None:
    """Parse PATH read-only as FMT; None when it parses, else the first problem found."""
    try:
        raw = path.read_bytes()
    except OSError as exc:  # verify reports an unreadable file rather than stopping at it
        return ParseProblem(path, 1, 1, f"cannot read the file: {exc.strerror}")
    try:
        text = raw.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return ParseProblem(path, line, column, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")
    checker = {"yaml": _check_yaml, "json": _check_json, "toml": _check_toml, "ini": _check_ini,
               "env": _check_env}.get(fmt)
    if checker is None:
        raise UsageError(f"cannot check {fmt} files")
    found = checker(text)
    return ParseProblem(path, *found) if found else None


def _yaml_error_position(exc: Exception, text: str) -> tuple[int, int, str]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = (getattr(exc, "problem", None) or getattr(exc, "reason", None)
               or str(exc).strip().splitlines()[-1])
    # ruamel quotes the values of duplicate keys in its message; values may be secrets
    problem = re.sub(r' with value ".*', "", problem, flags=re.S)
    context = getattr(exc, "context", None)
    message = f"{problem} ({context})" if context else problem
    if mark:
        return mark.line + 1, mark.column + 1, message
    offset = getattr(exc, "position", None)  # a ReaderError (a character YAML does not allow) has only this
    if isinstance(offset, int):
        before = text[:offset]
        return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1, message
    return 1, 1, message


def _check_yaml(text: str) -> tuple[int, int, str] | None:
    from ruamel.yaml.constructor import SafeConstructor
    from ruamel.yaml.error import YAMLError

    class TolerantConstructor(SafeConstructor):
        """The safe constructor, which also accepts application tags (!Ref, !include...) as plain data."""

    def untagged(constructor: Any, suffix: str, node: Any) -> Any:
        kind = type(node).__name__
        if kind == "MappingNode":
            return constructor.construct_mapping(node)
        if kind == "SequenceNode":
            return constructor.construct_sequence(node)
        return constructor.construct_scalar(node)

    TolerantConstructor.add_multi_constructor("", untagged)
    yaml = bounded_yaml("safe", TolerantConstructor)
    try:
        for _ in yaml.load_all(text):
            pass
    except Refused as exc:
        return exc.line, exc.column, exc.message
    except YAMLError as exc:
        return _yaml_error_position(exc, text)
    return None


def _check_json(text: str) -> tuple[int, int, str] | None:
    try:
        load_json(text)
    except Refused as exc:
        return exc.line, exc.column, exc.message
    except json.JSONDecodeError as exc:
        return exc.lineno, exc.colno, exc.msg
    return None


def _check_toml(text: str) -> tuple[int, int, str] | None:
    import tomllib

    try:
        check_toml_depth(text)
        tomllib.loads(text)
    except Refused as exc:
        return exc.line, exc.column, exc.message
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError has no position attributes, only "... (at line L, column C)".
        message = str(exc)
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if at:
            return int(at.group(1)), int(at.group(2)), message[: at.start()]
        lines = _split_lines(text)
        end_line = len(lines) + (1 if not lines or _ends_with_newline(text) else 0)
        end_column = 1 if not lines or _ends_with_newline(text) else len(lines[-1]) + 1
        return end_line, end_column, re.sub(r"\s*\(at end of document\)$", " at the end of the file", message)
    except ValueError:  # not a TOMLDecodeError: an integer longer than Python reads
        found = long_integer(text)
        return (found.line, found.column, found.message) if found else (1, 1, "a value that cannot be read")
    return None


def _check_ini(text: str) -> tuple[int, int, str] | None:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.MissingSectionHeaderError as exc:
        return exc.lineno, 1, "a setting before the first [section] header"
    except configparser.ParsingError as exc:  # the messages quote the line, which may hold a secret
        return exc.errors[0][0], 1, "not a [section] header, a 'key = value' line or a comment"
    except (configparser.DuplicateSectionError, configparser.DuplicateOptionError) as exc:
        what = (f"option {exc.option!r} appears twice in section [{exc.section}]"
                if isinstance(exc, configparser.DuplicateOptionError)
                else f"section [{exc.section}] appears twice")
        return exc.lineno or 1, 1, what
    except configparser.Error as exc:
        return getattr(exc, "lineno", None) or 1, 1, exc.message.splitlines()[0]
    return None


def _check_env(text: str) -> tuple[int, int, str] | None:
    from dotenv.parser import parse_stream

    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raw = binding.original.string
            lead = raw[: len(raw) - len(raw.lstrip())]  # the binding starts with the blank lines before it
            line = binding.original.line + len(re.findall(r"\r\n|\n|\r", lead))
            return line, 1, "not a KEY=value line, a comment or a blank line (an unclosed quote?)"
    return None
