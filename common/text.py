"""Text from outside (labels, a hook's output, URLs) made safe to print: one line, no terminal escapes, no password."""

from __future__ import annotations

import re
import unicodedata

MASK = "********"
_URL_PASSWORD = re.compile(r"(?P<user>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with control characters (newlines, carriage returns, ESC and the rest) and invisible format
    characters (bidirectional overrides) written as escapes, so it prints as what it is, on one line."""
    if text.isprintable():
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if char.isprintable() or char == " " or unicodedata.category(char) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co"):
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def mask_url_password(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by ********."""
    return _URL_PASSWORD.sub(r"\g<user>" + MASK + "@", text)


def count(number: int, noun: str) -> str:
    """`1 problem`, `3 problems`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def human_size(size: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart; a cell's control characters (a label's newline, a terminal
    escape) are shown escaped, so each row is one line and prints as what it holds."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]
