"""Showing a change without showing secrets: `masked_diff`."""

from __future__ import annotations

import difflib
import re

from common.text import MASK, mask_url_password

# A key names a secret when one of its words (DB_PASS, sessionKey, x-api-key) is one of these: short words
# count only whole (KEYBOARD_LAYOUT and PASSENGERS are not secrets), long ones anywhere (dbpassword).
_SECRET_WORD = re.compile(r"pass|pwd|pw|keys?|private|apikey|pin")
_SECRET_PART = re.compile(r"password|passwd|passphrase|secret|token|credential")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")  # DB_PASS -> DB PASS, apiKey -> api Key
# KEY=value (.env), key: value (YAML, also in a "- key: value" item), "key": value (JSON)
_ASSIGNMENT = re.compile(
    r"""(?P<indent>[ \t]*(?:-[ \t]+)*)
        (?: (?:export[ \t]+)?(?P<envkey>[A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*
          | (?P<q>["'])(?P<qkey>[^"']*)(?P=q)[ \t]*:(?:[ \t]+|$)
          | (?P<key>[^\s"'#:{}\[\],=-][^#:{}\[\],=]*?)[ \t]*:(?:[ \t]+|$) )
        (?P<value>.*)""",
    re.X,
)
# A value that continues on the lines below: a YAML block scalar, a nested mapping, a JSON object or array
_OPENS_BLOCK = re.compile(r"(?:![^\s]*[ \t]+)?(?:[|>][0-9+-]*)?(?:[ \t]+#.*)?|[{\[]")
# key: value inside a one-line flow mapping or JSON object; a value does not open a collection, so that
# "all: {password: x" is read as the key `password` inside `all`, not as `all` with a value "{password:"
_INLINE = re.compile(
    r"""(?P<key>["']?[A-Za-z0-9_.-]+["']?[ \t]*:[ \t]*)(?P<value>"(?:\\.|[^"\\])*"|'[^']*'|[^,{}\[\]\s][^,}\]\s]*)""")


def masked_diff(old: str, new: str, name: str) -> str:
    """A unified diff of OLD -> NEW for file NAME in which the values of secret-looking keys read ********."""
    lines = list(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                      f"a/{name}", f"b/{name}", n=3))
    out = lines[:2]  # the ---/+++ header
    # '-' and '+' lines interleave, so each side keeps its own note of an open secret block
    open_block: dict[str, int | None] = {"-": None, "+": None}
    for line in lines[2:]:
        if line.startswith("@@"):
            open_block = {"-": None, "+": None}
            out.append(line)
            continue
        mark, content = line[:1], line[1:]
        masked = content
        for side in ("-", "+") if mark == " " else (mark,):
            masked_side, open_block[side] = _mask_line(content, open_block[side])
            masked = masked_side if masked_side != content else masked
        out.append(mark + masked)
    return "".join(line if line.endswith("\n") else line + "\n" for line in out)


def names_a_secret(key: str) -> bool:
    """Whether KEY (DB_PASS, PWD, SESSION_KEY, apiToken, client-secret) names a value to keep out of sight."""
    words = [word.lower() for word in _WORDS.findall(key)]
    return any(_SECRET_WORD.fullmatch(word) or _SECRET_PART.search(word) for word in words)


def _mask_line(content: str, block_indent: int | None) -> tuple[str, int | None]:
    """CONTENT with secret values masked, and the indent of a secret block still open after it."""
    body = content.rstrip("\r\n")
    ending = content[len(body):]
    indent = len(body) - len(body.lstrip())
    if block_indent is not None:
        if not body.strip():
            return content, block_indent
        if indent > block_indent or indent == block_indent and body.lstrip().startswith("-"):
            prefix = re.match(r"[ \t]*(?:-[ \t]+)*", body).group()  # keep a list item's dash
            return prefix + MASK + ending, block_indent
        block_indent = None
    match = _ASSIGNMENT.fullmatch(body)
    key = match and (match.group("envkey") or match.group("qkey") or match.group("key") or "")
    if match and names_a_secret(key):
        value = match.group("value")
        if not match.group("envkey") and _OPENS_BLOCK.fullmatch(value.strip()):
            block_indent = len(match.group("indent"))
            shown = value if value.strip() in ("", "{", "[") else MASK
        else:
            shown = MASK + ("," if match.group("q") == '"' and value.rstrip().endswith(",") else "")
        return body[: match.start("value")] + shown + ending, block_indent
    body = _INLINE.sub(lambda m: m.group("key") + MASK if names_a_secret(m.group("key")) else m.group(), body)
    return mask_url_password(body) + ending, block_indent
