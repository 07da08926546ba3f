"""Configuration file formats: merge-patch YAML, JSON and .env files in place, and check that files parse.

The promise of `patch_text` is that every line a patch does not touch stays byte for byte. Round-trip
serialisers normalise some layout (spacing inside flow collections, comment columns, indentation that
differs from the rest of the file), so the serialiser's output is not written as is: its line changes are
merged into the original text (see `_merge_lines`), and the result is parsed again before it is accepted.
"""

from __future__ import annotations

import copy
import difflib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ToolkitError, UsageError

# Suffix -> format; .env files are recognised by name instead (see file_format).
FORMATS = {".yml": "yaml", ".yaml": "yaml", ".json": "json", ".toml": "toml", ".ini": "ini"}
EDITABLE = ("yaml", "json", "env")

_BOM = "\ufeff"
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+$")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_YAML_FILLER = re.compile(r"[ \t]*(?:#.*)?")  # lines without data: blank, or only a comment
_JSON_FILLER = re.compile(r"[ \t]*")
_NOTHING = re.compile(r"(?!)")


# ---------------------------------------------------------------------------------------------------------
# Which file is which


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


# ---------------------------------------------------------------------------------------------------------
# RFC 7386 JSON merge patch


def parse_merge_patch(text: str) -> dict:
    """Parse a JSON merge patch given on the command line; UsageError unless it is a JSON object."""
    try:
        patch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the patch is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                         ) from None
    if not isinstance(patch, dict):
        raise UsageError(f"the patch must be a JSON object, got {_kind(patch)}")
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """Apply PATCH to TARGET as RFC 7386 says and return the result.

    A mapping target is changed in place (so that a ruamel.yaml CommentedMap keeps its comments).
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if not isinstance(target, MutableMapping):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            old = target.get(key)
            new = apply_merge_patch(old, value)
            if new is not old:  # re-assigning a merged child could disturb ruamel's bookkeeping
                target[key] = new
        else:
            target[key] = _keep_style(target.get(key), copy.deepcopy(value))
    return target


_QUOTED_YAML_STRINGS = ("SingleQuotedScalarString", "DoubleQuotedScalarString")


def _keep_style(old: Any, new: Any) -> Any:
    """NEW in the YAML style of the value it replaces: quotes for a string, flow style for a collection."""
    # Matched by class name and attribute so that this module needs ruamel.yaml only when it parses YAML.
    if isinstance(new, str) and type(old).__name__ in _QUOTED_YAML_STRINGS:
        return type(old)(new)
    if isinstance(new, list | dict) and hasattr(old, "fa") and old.fa.flow_style():
        from ruamel.yaml.comments import CommentedMap, CommentedSeq

        styled = CommentedSeq(new) if isinstance(new, list) else CommentedMap(new)
        styled.fa.set_flow_style()
        return styled
    return new


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def _same(a: Any, b: Any) -> bool:
    """Equality of plain data that tells true from 1 and 1 from 1.0 and lets NaN equal NaN."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, float) and isinstance(b, float)):
            return False
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------------------
# Patching file text


def patch_text(fmt: str, text: str, patch: dict) -> str:
    """Return TEXT (a whole yaml, json or env file) with PATCH applied, every untouched line as it was.

    A patch that changes nothing returns TEXT itself. Bad input raises UsageError.
    """
    if fmt == "yaml":
        return _patch_yaml(text, patch)
    if fmt == "json":
        return _patch_json(text, patch)
    if fmt == "env":
        return _patch_env(text, patch)
    raise UsageError(f"cannot edit {fmt} files (editable: yaml, json, env)")


def _split_lines(text: str) -> list[str]:
    """Lines with their own endings; \\r\\n, \\n and a lone \\r all end a line, as in YAML."""
    return _LINE.findall(text)


def _newline_of(text: str) -> str:
    match = re.search(r"\r\n|\n|\r", text)
    return match.group() if match else "\n"


def _ends_with_newline(text: str) -> bool:
    return text.endswith(("\n", "\r"))


def _matched(a: list[str], b: list[str]) -> dict[int, int]:
    """Index in A -> index in B for the lines that difflib pairs as equal."""
    pairs: dict[int, int] = {}
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            pairs[block.a + k] = block.b + k
    return pairs


def _merge_lines(ours: str, base: str, theirs: str, filler: re.Pattern[str]) -> str:
    """Three-way merge by lines: the changes base -> theirs, applied to ours.

    BASE is the serialiser's rendering of the unpatched document, THEIRS its rendering of the patched one,
    OURS the file as it is. Lines of base that difflib pairs with a line of ours and a line of theirs are
    stable; between two stable lines, a stretch the patch did not change is taken from ours as it is, and a
    stretch it changed is merged by `_merge_stretch`. FILLER matches lines that carry no data (blank lines,
    YAML comments). The caller parses the result again, so a wrong guess here cannot go unnoticed.
    """
    ours_lines = _split_lines(ours)
    ours_keys = [line.rstrip("\r\n") for line in ours_lines]
    base_keys = [line.rstrip("\r\n") for line in _split_lines(base)]
    theirs_keys = [line.rstrip("\r\n") for line in _split_lines(theirs)]
    newline = _newline_of(ours)

    to_ours, to_theirs = _matched(base_keys, ours_keys), _matched(base_keys, theirs_keys)
    stable = [(b, to_ours[b], to_theirs[b]) for b in range(len(base_keys)) if b in to_ours and b in to_theirs]
    stable.append((len(base_keys), len(ours_lines), len(theirs_keys)))  # sentinel: the end of all three

    out: list[str] = []
    b0 = o0 = t0 = 0
    for b1, o1, t1 in stable:
        if theirs_keys[t0:t1] == base_keys[b0:b1]:
            out += ours_lines[o0:o1]
        else:
            out += _merge_stretch(base_keys[b0:b1], ours_lines[o0:o1], theirs_keys[t0:t1], newline, filler)
        if b1 < len(base_keys):
            out.append(ours_lines[o1])
        b0, o0, t0 = b1 + 1, o1 + 1, t1 + 1

    # ours' last line may lack its newline and no longer be last
    out = [line if _ends_with_newline(line) or i == len(out) - 1 else line + newline
           for i, line in enumerate(out)]
    return _final_newline_as(ours, "".join(out))


def _merge_stretch(base: list[str], ours: list[str], theirs: list[str], newline: str,
                   filler: re.Pattern[str]) -> list[str]:
    """A stretch between stable lines that the patch changed: its changes placed into ours where they map.

    Ours may differ from base here too (the serialiser re-laid out lines near the change). The changes are
    placed through the lines ours and base share, else, when both have as many lines, by position (the
    serialiser re-spaced lines one for one); if neither places them all, the stretch is taken from theirs.
    """
    changes = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, theirs, autojunk=False).get_opcodes():
        if tag == "delete":
            # ruamel.yaml keeps the comments and blank lines below a key with the key, so deleting the key
            # would take along the comment that introduces the next one: keep those lines.
            while i2 > i1 and filler.fullmatch(base[i2 - 1]):
                i2 -= 1
            if i2 == i1:
                continue
        if tag != "equal":
            changes.append((tag, i1, i2, j1, j2))
    pairings = [_matched(base, [line.rstrip("\r\n") for line in ours])]
    if len(ours) == len(base):
        pairings.append({i: i for i in range(len(base))})
    for pairs in pairings:
        spans = _place(changes, pairs, len(base), len(ours))
        if spans is None:
            continue
        out, at = [], 0
        for (start, end), (_tag, _i1, _i2, j1, j2) in zip(spans, changes, strict=True):
            out += ours[at:start] + [line + newline for line in theirs[j1:j2]]
            at = end
        return out + ours[at:]
    return [line + newline for line in theirs]


def _place(changes: list[tuple], pairs: dict[int, int], base_len: int, ours_len: int) -> list | None:
    """For each change of base, the span of ours it replaces; None if one does not map cleanly."""
    spans: list[tuple[int, int]] = []
    for _tag, i1, i2, _j1, _j2 in changes:
        if i1 < i2:  # replaced or deleted lines: all must be paired, with lines that follow one another
            if not all(i in pairs for i in range(i1, i2)) or pairs[i2 - 1] - pairs[i1] != i2 - 1 - i1:
                return None
            span = (pairs[i1], pairs[i2 - 1] + 1)
        elif i1 == 0 or i1 - 1 in pairs:  # inserted lines go right after the line they follow in base
            span = (pairs[i1 - 1] + 1,) * 2 if i1 else (0, 0)
        elif i1 == base_len or i1 in pairs:
            span = (pairs[i1],) * 2 if i1 < base_len else (ours_len, ours_len)
        else:
            return None
        if spans and span[0] < spans[-1][1]:
            return None
        spans.append(span)
    return spans


def _final_newline_as(original: str, text: str) -> str:
    """TEXT without its final line ending if ORIGINAL has none."""
    return re.sub(r"(?:\r\n|\n|\r)\Z", "", text) if original and not _ends_with_newline(original) else text


def _in_style_of(original: str, serialised: str) -> str:
    """Serialiser output (\\n line endings) with ORIGINAL's line ending and final-newline habit."""
    return _final_newline_as(original, serialised.replace("\n", _newline_of(original)))


def _finish(original: str, bom: str, base: str, theirs: str, reads_back: Callable[[str], bool],
            what: str, filler: re.Pattern[str]) -> str:
    """Merge, check that the result reads back as the patched data, and fall back to THEIRS if it does not."""
    candidates = (_merge_lines(original, base, theirs, filler),
                  _merge_lines(original, base, theirs, _NOTHING), _in_style_of(original, theirs))
    for candidate in candidates:  # (a "comment" kept by the first merge may have been block scalar text)
        if reads_back(candidate):
            return bom + candidate
    raise ToolkitError(f"the patched {what} does not read back as the patched data; the file was not changed")


def _split_bom(text: str) -> tuple[str, str]:
    return (_BOM, text[1:]) if text.startswith(_BOM) else ("", text)


# --- YAML -------------------------------------------------------------------------------------------------


def _yaml_rt() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1 << 30  # never fold long lines
    return yaml


def _yaml_load_one(yaml: Any, text: str) -> Any:
    from ruamel.yaml.error import YAMLError

    try:
        docs = list(yaml.load_all(text))
    except YAMLError as exc:
        line, column, message = _yaml_error_position(exc, text)
        raise UsageError(f"the YAML file does not parse: line {line} column {column}: {message}") from None
    if len(docs) > 1:
        raise UsageError(f"the YAML file holds {len(docs)} documents; only a single document can be updated")
    return docs[0] if docs else None


def _yaml_plain(value: Any) -> Any:
    """ruamel's round-trip types as plain Python values, for comparing data."""
    from ruamel.yaml.scalarbool import ScalarBoolean

    if isinstance(value, Mapping):
        return {_yaml_plain(k): _yaml_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_plain(v) for v in value]
    if isinstance(value, bool | ScalarBoolean):
        return bool(value)
    for plain in (str, int, float):
        if isinstance(value, plain):
            return plain(value)
    return value


def _yaml_layout(data: Any) -> tuple[int, int, int]:
    """(mapping indent, sequence indent, dash offset) most used in the file, in ruamel.yaml's terms.

    Measured from the positions ruamel records for keys and items: a nested block mapping's first key
    against its parent key, a block sequence's dash and first item against its parent key.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    mappings: Counter[int] = Counter()
    sequences: Counter[tuple[int, int]] = Counter()

    def walk(node: Any) -> None:
        if isinstance(node, CommentedMap):
            for key, value in node.items():
                try:
                    key_line, key_col = node.lc.key(key)
                except (KeyError, TypeError):  # a key that came in through a merge (<<)
                    continue
                if isinstance(value, CommentedMap) and value and not value.fa.flow_style():
                    line, col = value.lc.key(next(iter(value)))
                    if line > key_line and col > key_col:
                        mappings[col - key_col] += 1
                elif isinstance(value, CommentedSeq) and value and not value.fa.flow_style():
                    dash_line, dash_col = value.lc.line, value.lc.col
                    item_line, item_col = value.lc.item(0)
                    if dash_line > key_line and item_line == dash_line and item_col >= dash_col + 2:
                        sequences[(item_col - key_col, dash_col - key_col)] += 1
                walk(value)
        elif isinstance(node, CommentedSeq):
            for item in node:
                walk(item)

    walk(data)
    mapping = mappings.most_common(1)[0][0] if mappings else 2
    if sequences:
        sequence, offset = sequences.most_common(1)[0][0]
    else:  # no block sequence to copy: dash under the key for 2-space files, indented by 2 otherwise
        sequence, offset = mapping, max(0, mapping - 2)
    return mapping, sequence, offset


def _patch_yaml(text: str, patch: dict) -> str:
    from ruamel.yaml.comments import CommentedMap

    bom, original = _split_bom(text)
    source = re.sub(r"\r\n?", "\n", original)
    yaml = _yaml_rt()
    data = _yaml_load_one(yaml, source)
    if data is not None and not isinstance(data, CommentedMap):
        raise UsageError(f"the YAML document must be a mapping, got {_kind(data)}")
    before = _yaml_plain(data) if data is not None else {}
    expected = apply_merge_patch(copy.deepcopy(before), patch)
    if _same(before, expected):
        return text

    mapping, sequence, offset = _yaml_layout(data)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    # ruamel drops a "---" that follows leading comments; keep it when the file has one before its content
    yaml.explicit_start = bool(re.match(r"(?:[ \t]*(?:#[^\n]*)?\n)*---(?:[ \t]|$)", source, re.M))

    def dump(doc: Any) -> str:
        out = io.StringIO()
        yaml.dump(doc, out)
        return out.getvalue()

    def reads_back(candidate: str) -> bool:
        try:
            again = _yaml_load_one(_yaml_rt(), re.sub(r"\r\n?", "\n", candidate))
        except UsageError:
            return False
        return _same(_yaml_plain(again) if again is not None else {}, expected)

    if data is None:  # an empty file, or one with only comments: add the new mapping after what is there
        theirs = dump(apply_merge_patch(CommentedMap(), patch))
        newline = _newline_of(original)
        glue = newline if original and not _ends_with_newline(original) else ""
        appended = original + glue + theirs.replace("\n", newline)
        for candidate in (appended, _in_style_of(original, theirs)):
            if reads_back(candidate):
                return bom + candidate
        raise ToolkitError("the patched YAML does not read back as the patched data; "
                           "the file was not changed")

    base = dump(data)
    apply_merge_patch(data, patch)
    return _finish(original, bom, base, dump(data), reads_back, "YAML", _YAML_FILLER)


# --- JSON -------------------------------------------------------------------------------------------------


def _json_style(text: str) -> tuple[str | None, tuple[str, str]]:
    """(indent unit, or None for one-line JSON; (item separator, key separator)) as the file writes them."""
    # A raw newline cannot occur inside a JSON string, so a bracket followed by a newline is structural.
    match = re.search(r"[\[{][ \t]*\r?\n[\r\n]*([ \t]*)\S", text)
    indent = match.group(1) if match else None
    item_sep = key_sep = None
    for token in re.finditer(r'"(?:\\.|[^"\\])*"|(?P<sep>[ \t]*(?P<char>[:,])[ \t]*(?P<nl>\r?\n)?)', text):
        if token.group("char") == ":" and key_sep is None:
            key_sep = token.group("sep").rstrip("\r\n")
        elif token.group("char") == "," and item_sep is None:
            # with an indent, json.dumps puts the line break after the comma itself
            item_sep = "," if indent is not None or token.group("nl") else token.group("sep").lstrip(" \t")
        if key_sep is not None and item_sep is not None:
            break
    return indent, (item_sep or ("," if indent is not None else ", "), key_sep or ": ")


def _patch_json(text: str, patch: dict) -> str:
    bom, original = _split_bom(text)
    try:
        data = json.loads(original)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the JSON file does not parse: line {exc.lineno} column {exc.colno}: {exc.msg}"
                         ) from None
    if not isinstance(data, dict):
        raise UsageError(f"the JSON document must be an object, got {_kind(data)}")
    expected = apply_merge_patch(copy.deepcopy(data), patch)
    if _same(data, expected):
        return text

    indent, separators = _json_style(original)

    def dump(doc: Any) -> str:
        return json.dumps(doc, indent=indent, separators=separators, ensure_ascii=False) + "\n"

    def reads_back(candidate: str) -> bool:
        try:
            return _same(json.loads(candidate), expected)
        except json.JSONDecodeError:
            return False

    return _finish(original, bom, dump(data), dump(expected), reads_back, "JSON", _JSON_FILLER)


# --- .env -------------------------------------------------------------------------------------------------

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
    # backslashes are doubled; double quotes take every value, with backslash escapes.
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
    if head is None:  # `KEY` alone, without `=`
        return indent + body[: len(body) - len(ending)].rstrip() + "=" + _env_quote(value, None) + ending
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


# ---------------------------------------------------------------------------------------------------------
# Checking that a file parses


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
    from ruamel.yaml import YAML
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
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = TolerantConstructor
    try:
        for _ in yaml.load_all(text):
            pass
    except YAMLError as exc:
        return _yaml_error_position(exc, text)
    return None


def _check_json(text: str) -> tuple[int, int, str] | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.lineno, exc.colno, exc.msg
    return None


def _check_toml(text: str) -> tuple[int, int, str] | None:
    import tomllib

    try:
        tomllib.loads(text)
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


# ---------------------------------------------------------------------------------------------------------
# Showing a change without showing secrets

MASK = "********"
_SECRET_NAME = re.compile(r"password|passwd|secret|token|api[_-]?key|private[_-]?key|credential", re.I)
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
# key: value inside a one-line flow mapping or JSON object
_INLINE = re.compile(
    r"""(?P<key>["']?[A-Za-z0-9_.-]+["']?[ \t]*:[ \t]*)(?P<value>"(?:\\.|[^"\\])*"|'[^']*'|[^,}\]\s]+)""")
_URL_PASSWORD = re.compile(r"(?P<user>://[^/\s:@]*:)[^/\s@]+@")


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
    text = "".join(line if line.endswith("\n") else line + "\n" for line in out)
    return text


def _mask_line(content: str, block_indent: int | None) -> tuple[str, int | None]:
    """CONTENT with secret values masked, and the indent of a secret block still open after it."""
    body = content.rstrip("\r\n")
    ending = content[len(body):]
    indent = len(body) - len(body.lstrip())
    if block_indent is not None:
        if not body.strip():
            return content, block_indent
        if indent > block_indent:
            return body[:indent] + MASK + ending, block_indent
        block_indent = None
    match = _ASSIGNMENT.fullmatch(body)
    key = match and (match.group("envkey") or match.group("qkey") or match.group("key") or "")
    if match and _SECRET_NAME.search(key):
        value = match.group("value")
        if not match.group("envkey") and _OPENS_BLOCK.fullmatch(value.strip()):
            block_indent = len(match.group("indent"))
            shown = value if value.strip() in ("", "{", "[") else MASK
        else:
            shown = MASK + ("," if match.group("q") == '"' and value.rstrip().endswith(",") else "")
        return body[: match.start("value")] + shown + ending, block_indent
    body = _INLINE.sub(lambda m: m.group("key") + MASK if _SECRET_NAME.search(m.group("key")) else m.group(),
                       body)
    return _URL_PASSWORD.sub(r"\g<user>" + MASK + "@", body) + ending, block_indent
