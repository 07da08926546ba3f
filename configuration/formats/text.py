"""Line endings and byte order marks, shared by the editors, the line merge and the parse checks."""

from __future__ import annotations

import re

_BOM = "\ufeff"
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+$")


def _split_lines(text: str) -> list[str]:
    """Lines with their own endings; \\r\\n, \\n and a lone \\r all end a line, as in YAML."""
    return _LINE.findall(text)


def _newline_of(text: str) -> str:
    match = re.search(r"\r\n|\n|\r", text)
    return match.group() if match else "\n"


def _ends_with_newline(text: str) -> bool:
    return text.endswith(("\n", "\r"))


def _split_bom(text: str) -> tuple[str, str]:
    return (_BOM, text[1:]) if text.startswith(_BOM) else ("", text)
