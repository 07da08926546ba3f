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
