"""Patching file text: `patch_text`, and the YAML and JSON editors behind it."""

from __future__ import annotations

import copy
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from common.errors import UsageError

from .bounds import Refused, bounded_yaml, load_json
from .checks import _yaml_error_position
from .envfile import _patch_env
from .linemerge import _first_reading_back, _in_style_of, _merged
from .merge_patch import _kind, _same, apply_merge_patch
from .text import _ends_with_newline, _newline_of, _split_bom
from .yaml_writer import yaml_writer

# Lines without data: blank, only a comment, or a document marker
_YAML_FILLER = re.compile(r"[ \t]*(?:#.*)?|(?:---|\.\.\.)(?:[ \t].*)?")
_JSON_FILLER = re.compile(r"[ \t]*")


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


# --- YAML -------------------------------------------------------------------------------------------------


def _yaml_rt() -> Any:
    """A round-trip loader (see yaml_writer for dumping)."""
    yaml = bounded_yaml("rt")
    yaml.preserve_quotes = True
    return yaml


def _yaml_load_one(yaml: Any, text: str) -> Any:
    from ruamel.yaml.error import YAMLError

    try:
        docs = list(yaml.load_all(text))
    except Refused as exc:
        raise UsageError(f"the YAML file is refused: line {exc.line} column {exc.column}: {exc.message}") from None
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
        return {_yaml_key(k): _yaml_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_plain(v) for v in value]
    if isinstance(value, bool | ScalarBoolean):
        return bool(value)
    for plain in (str, int, float):
        if isinstance(value, plain):
            return plain(value)
    return value


def _yaml_key(key: Any) -> Any:
    plain = _yaml_plain(key)
    if isinstance(plain, list):  # a complex key (? [a, b]) must stay usable as a key
        return tuple(plain)
    return repr(plain) if isinstance(plain, dict) else plain


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


def _unshare(data: Any, patch: dict) -> None:
    """Give the collections the patch changes in place their own copy if YAML aliases (*name, <<) share them.

    A merge patch means "change here"; changing a shared node would change every place that refers to it.
    """
    refs: Counter[int] = Counter()

    def count(node: Any) -> None:
        if isinstance(node, Mapping | list):
            refs[id(node)] += 1
            if refs[id(node)] == 1:
                for _, source in getattr(node, "merge", []):
                    count(source)
                for child in node.values() if isinstance(node, Mapping) else node:
                    count(child)

    def walk(node: Any, patch: Mapping) -> None:
        for key, change in patch.items():
            child = node.get(key)
            in_place = isinstance(change, Mapping) or isinstance(change, list) and isinstance(child, list)
            if isinstance(child, Mapping | list) and refs[id(child)] > 1 and in_place:
                fresh = copy.deepcopy(child)
                fresh.anchor.value = None
                if child.anchor.value:
                    child.yaml_set_anchor(child.anchor.value, always_dump=True)  # keep &name where it is
                node[key] = child = fresh
            if isinstance(change, Mapping) and isinstance(child, Mapping):
                walk(child, change)

    count(data)
    walk(data, patch)


def _flow_empty(node: Any) -> None:
    """Write empty collections as {} and []: ruamel.yaml can write a mapping the patch emptied, with a
    comment above its first key, as "key:", a blank line and "{}", which does not parse."""
    if isinstance(node, Mapping | list):
        if not node and hasattr(node, "fa"):
            node.fa.set_flow_style()
        for child in node.values() if isinstance(node, Mapping) else node:
            _flow_empty(child)


def _patch_yaml(text: str, patch: dict) -> str:
    from ruamel.yaml.comments import CommentedMap

    bom, original = _split_bom(text)
    source = re.sub(r"\r\n?", "\n", original)
    data = _yaml_load_one(_yaml_rt(), source)
    if data is not None and not isinstance(data, CommentedMap):
        raise UsageError(f"the YAML document must be a mapping, got {_kind(data)}")
    before = _yaml_plain(data) if data is not None else {}
    expected = apply_merge_patch(copy.deepcopy(before), patch)
    if _same(before, expected):
        return text

    writer = yaml_writer()
    mapping, sequence, offset = _yaml_layout(data)
    writer.indent(mapping=mapping, sequence=sequence, offset=offset)
    # ruamel drops a "---" that follows leading comments; keep it when the file has one before its content
    writer.explicit_start = bool(re.match(r"(?:[ \t]*(?:#[^\n]*)?\n)*---(?:[ \t]|$)", source, re.M))

    def dump(doc: Any) -> str:
        out = io.StringIO()
        writer.dump(doc, out)
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
        candidates: Iterable[str] = (original + glue + theirs.replace("\n", newline),
                                     _in_style_of(original, theirs))
    else:
        base = dump(data)
        _unshare(data, patch)
        apply_merge_patch(data, patch)
        _flow_empty(data)
        candidates = _merged(original, base, dump(data), _YAML_FILLER)
    hint = ""
    if re.search(r"(?:^|[\s:\[{,-])[&*][^\s,\[\]{}]+|<<\s*:", source, re.M):
        hint = ": the patch changes data that anchors, aliases or merge keys (<<) share; edit it by hand"
    return _first_reading_back(candidates, reads_back, bom, "YAML", hint)


# --- JSON -------------------------------------------------------------------------------------------------


def _json_style(text: str) -> tuple[str | None, tuple[str, str]]:
    """(indent unit, or None for one-line JSON; (item separator, key separator)) as the file writes them."""
    # A raw newline cannot occur inside a JSON string, so a bracket followed by a newline is structural.
    match = re.search(r"[\[{][ \t]*\r?\n[\r\n]*([ \t]*)[^\s\]}]", text)
    indent = match.group(1) if match else ("  " if "\n" in text.strip() else None)
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
        data = load_json(original)
    except Refused as exc:
        raise UsageError(f"the JSON file is refused: line {exc.line} column {exc.column}: {exc.message}") from None
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

    return _first_reading_back(_merged(original, dump(data), dump(expected), _JSON_FILLER), reads_back, bom,
                               "JSON")
