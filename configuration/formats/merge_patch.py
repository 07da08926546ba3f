"""RFC 7386 JSON merge patch: parsing and applying a patch, and the helpers that keep the style of the
YAML values it replaces.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, MutableMapping
from typing import Any

from common.errors import UsageError

from .bounds import Refused, load_json


def parse_merge_patch(text: str) -> dict:
    """Parse a JSON merge patch given by the operator; UsageError unless it is a JSON object within the bounds."""
    try:
        patch = load_json(text)
    except Refused as exc:
        raise UsageError(f"the patch is refused: {exc.message} at line {exc.line} column {exc.column}") from None
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
        else:
            old = target.get(key)
            if isinstance(value, Mapping):
                new = apply_merge_patch(old, value)
            else:
                new = _replace(old, copy.deepcopy(value)) if key in target else copy.deepcopy(value)
            if new is not old:  # re-assigning a merged child could disturb ruamel's bookkeeping
                _forget_comments_inside(target, key, old)
                target[key] = new
    return target


def _forget_comments_inside(parent: Any, key: Any, old: Any) -> None:
    # ruamel.yaml keeps the comments above the first line of a list or mapping on the parent's entry for
    # its key; once the value is replaced, it can write them so that the new value no longer parses.
    entry = parent.ca.items.get(key) if hasattr(old, "fa") and hasattr(parent, "ca") else None
    if entry and len(entry) > 3:
        entry[3] = None


def _replace(old: Any, new: Any) -> Any:
    """NEW, made of OLD's own objects where they already hold the same data.

    Merge patches replace lists whole; rebuilding a ruamel.yaml list or mapping in place, rather than
    swapping in a plain one, keeps the comments, quotes and number formats of the items that stay.
    """
    if not isinstance(old, Mapping | list) and _same(old, new):
        return old
    if hasattr(old, "fa"):  # a ruamel.yaml collection
        if isinstance(old, MutableMapping) and isinstance(new, Mapping):
            for key in [key for key in old if key not in new]:
                del old[key]
            for key, value in new.items():
                item = _replace(old[key], value) if key in old else value
                if key not in old or item is not old[key]:
                    old[key] = item
            return old
        if isinstance(old, list) and isinstance(new, list):
            del old[len(new):]
            for i, value in enumerate(new):
                if i == len(old):
                    old.append(value)
                elif (item := _replace(old[i], value)) is not old[i]:
                    old[i] = item
            return old
    return _keep_style(old, new)


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
    for kind in (str, int):  # subclasses included: ruamel.yaml's scalars keep their style in them
        if isinstance(a, kind) or isinstance(b, kind):
            return isinstance(a, kind) and isinstance(b, kind) and a == b
    return type(a) is type(b) and a == b
