"""Bounds on what a configuration document may be, so that a crafted file is refused at once.

A YAML "billion laughs" (aliases of aliases of lists) would expand to billions of values, and brackets
nested thousands deep end in a RecursionError: either would hang or crash `update` while it holds the
store's lock. Every reader in this package (the patch, update's editors, verify's checks) applies the same
bounds, checked while reading, before anything expands; documents within them are read as before.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from typing import Any

MAX_DEPTH = 100  # collections inside collections: real configuration stays far below
MAX_ALIAS_VALUES = 100_000  # values YAML aliases may add to a document, each alias counted as a copy

_MAX_DIGITS = sys.get_int_max_str_digits()  # Python refuses to read longer integers (0: no limit)


class Refused(ValueError):
    """A document beyond a bound, at a line and column counted from 1."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"{message} (line {line} column {column})")
        self.message, self.line, self.column = message, line, column

    @classmethod
    def at(cls, message: str, text: str, offset: int) -> Refused:
        """Refused at OFFSET into TEXT."""
        line = text.count("\n", 0, offset) + 1
        return cls(message, line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


def _too_deep() -> str:
    return f"nested deeper than {MAX_DEPTH} levels"


def _too_long(digits: int) -> str:
    return f"an integer of {digits} digits (at most {_MAX_DIGITS} can be read)"


# --- JSON -------------------------------------------------------------------------------------------------

# Outside strings, valid JSON has only brackets, numbers, true/false/null, commas and colons.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]|-?[0-9][0-9.eE+-]*|-?Infinity|NaN')


def load_json(text: str) -> Any:
    """The JSON TEXT as Python data, as RFC 8259 defines JSON and within the bounds.

    Raises json.JSONDecodeError for what is not JSON (NaN and Infinity included), Refused for nesting
    deeper than MAX_DEPTH, a number beyond a float's range or an integer longer than Python reads.
    """
    try:
        data = json.loads(text, parse_float=_finite_float, parse_constant=_not_a_constant)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError):  # too deep, a number out of range, NaN or Infinity: find where
        raise _first_problem(text) from None
    if _depth(data) > MAX_DEPTH:
        raise _first_problem(text)
    return data


def _finite_float(number: str) -> float:
    value = float(number)
    if math.isinf(value):
        raise ValueError(number)
    return value


def _not_a_constant(name: str) -> None:
    raise ValueError(name)


def _depth(data: Any) -> int:
    """How deep lists and objects nest in DATA (1: a flat one), counted up to just past MAX_DEPTH."""
    deepest = 0
    stack = [(data, 1)] if isinstance(data, dict | list) else []
    while stack and deepest <= MAX_DEPTH:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _first_problem(text: str) -> Exception:
    """Where TEXT, which json.loads read or could not read for a bound, first goes beyond one."""
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        first = text[token.start()]
        if first in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return Refused.at(_too_deep(), text, token.start())
        elif first in "]}":
            depth -= 1
        elif first != '"' and (problem := _json_number_problem(token.group(), text, token.start())):
            return problem
    return Refused("a value that cannot be read", 1, 1)


def _json_number_problem(number: str, text: str, offset: int) -> Exception | None:
    if number.endswith(("Infinity", "NaN")):
        return json.JSONDecodeError(f"{number} is not a JSON value", text, offset)
    if any(c in number for c in ".eE"):
        try:
            value = float(number)
        except ValueError:
            return None
        if math.isinf(value):
            return Refused.at(f"{number} is beyond the range of a number (it would be read as infinity)",
                              text, offset)
    elif _MAX_DIGITS and len(number.lstrip("-")) > _MAX_DIGITS:
        return Refused.at(_too_long(len(number.lstrip("-"))), text, offset)
    return None


# --- TOML -------------------------------------------------------------------------------------------------

_TOML_TOKEN = re.compile(
    r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[\[{]|[\]}]', re.S)


def check_toml_depth(text: str) -> None:
    """Refused if arrays and inline tables nest deeper than MAX_DEPTH (tomllib would recurse that deep)."""
    depth = 0
    for token in _TOML_TOKEN.finditer(text):
        char = text[token.start()]
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise Refused.at(_too_deep(), text, token.start())
        elif char in "]}":
            depth = max(0, depth - 1)


def long_integer(text: str) -> Refused | None:
    """Where TEXT holds an integer longer than Python reads (tomllib then raises a bare ValueError)."""
    if not _MAX_DIGITS:
        return None
    match = re.search(rf"(?<![\w.])[0-9](?:_?[0-9]){{{_MAX_DIGITS},}}", text)
    if match is None:
        return None
    return Refused.at(_too_long(len(match.group().replace("_", ""))), text, match.start())


# --- YAML -------------------------------------------------------------------------------------------------


def bounded_yaml(typ: str, constructor: type | None = None) -> Any:
    """A ruamel.yaml YAML(typ=TYP) that raises Refused for a document beyond the bounds, and a marked
    YAMLError (with the line) for a value Python cannot hold (a 13th month, a 5,000-digit integer).

    CONSTRUCTOR replaces the loader's own constructor class.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.scanner import Scanner

    yaml = YAML(typ=typ, pure=True)
    yaml.Scanner = _bounded_scanner(yaml.Scanner or Scanner)
    yaml.Composer = _bounded_composer(yaml.Composer)
    yaml.Constructor = _marking_constructor(constructor or yaml.Constructor)
    return yaml


@functools.cache
def _bounded_scanner(base: type) -> type:
    class BoundedScanner(base):
        """Stops at the first flow collection ([ or {) nested too deep: with a thousand of them open, each
        further token would cost a thousand steps (the scanner's pending simple keys, one per level)."""

        def fetch_flow_collection_start(self, token_class: Any, to_push: str) -> None:
            if self.flow_level >= MAX_DEPTH:
                mark = self.reader.get_mark()
                raise Refused(_too_deep(), mark.line + 1, mark.column + 1)
            super().fetch_flow_collection_start(token_class, to_push)

    return BoundedScanner


@functools.cache
def _bounded_composer(base: type) -> type:
    from ruamel.yaml.events import AliasEvent, ScalarEvent
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    class BoundedComposer(base):
        """Counts, while composing, how deep the document nests and how many values its aliases add."""

        def compose_document(self) -> Any:
            self.expanded_sizes: dict[int, int] = {}  # node id -> values in it, aliases counted as copies
            self.added_by_aliases = 0
            return super().compose_document()

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.parser.peek_event()
            mark = event.start_mark
            if isinstance(event, AliasEvent):
                node = super().compose_node(parent, index)
                size = self.expanded_sizes.get(id(node))
                if size is None:  # the node named is still being composed: it contains its own alias
                    raise Refused(f"the alias *{event.anchor} is inside what it names (endless data)",
                                  mark.line + 1, mark.column + 1)
                self.added_by_aliases += size
                if self.added_by_aliases > MAX_ALIAS_VALUES:
                    raise Refused(f"aliases expand the document by more than {MAX_ALIAS_VALUES:,} values "
                                  "(an alias bomb?)", mark.line + 1, mark.column + 1)
                return node
            if self.depth >= MAX_DEPTH and not isinstance(event, ScalarEvent):  # as JSON counts: collections
                raise Refused(_too_deep(), mark.line + 1, mark.column + 1)
            node = super().compose_node(parent, index)
            sizes = self.expanded_sizes
            if isinstance(node, SequenceNode):
                sizes[id(node)] = 1 + sum(sizes[id(item)] for item in node.value)
            elif isinstance(node, MappingNode):
                sizes[id(node)] = 1 + sum(sizes[id(key)] + sizes[id(value)] for key, value in node.value)
            else:
                sizes[id(node)] = 1
            return node

    return BoundedComposer


@functools.cache
def _marking_constructor(base: type) -> type:
    from ruamel.yaml.constructor import ConstructorError

    class MarkingConstructor(base):
        """Turns the ValueError of a value Python cannot hold into a YAMLError that names its line."""

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep=deep)
            except (ValueError, OverflowError) as exc:
                if isinstance(exc, Refused):
                    raise
                raise ConstructorError(None, None, _value_problem(exc, node.value), node.start_mark) from None

    return MarkingConstructor


def _value_problem(exc: Exception, value: Any) -> str:
    if "integer string conversion" in str(exc) and isinstance(value, str):
        return _too_long(sum(c.isdigit() for c in value))
    return f"a value that cannot be read ({exc})"
