"""configuration.formats: merge patches that leave untouched lines alone, parse checks, masked diffs."""

from __future__ import annotations

import copy
import difflib
import io
import json
import random
import re
import time
from pathlib import Path

import pytest
import yaml as pyyaml
from dotenv import dotenv_values
from ruamel.yaml import YAML

import configuration.formats as cf
from common.errors import ToolkitError, UsageError
from configuration.formats.bounds import MAX_DEPTH

# ---------------------------------------------------------------------------------------------------------
# helpers


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes, so that CRLF and a missing final newline stay as given
    return path


def patch_file(path: Path, patch: dict, fmt: str | None = None) -> str:
    """Patch a real file the way `update` does: read bytes, patch, write bytes; return the new text."""
    old = path.read_bytes().decode("utf-8")
    new = cf.patch_text(fmt or cf.editable_format(path), old, patch)
    path.write_bytes(new.encode("utf-8"))
    return new


def changed(old: str, new: str) -> list[tuple[list[str], list[str]]]:
    """The (old lines, new lines) of every change between two texts, lines with their endings."""
    return [(before, after) for _, before, after in changed_at(old, new)]


def changed_at(old: str, new: str) -> list[tuple[int, list[str], list[str]]]:
    """Like `changed`, with the index in OLD where each change starts."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    return [(i1, a[i1:i2], b[j1:j2])
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
            if tag != "equal"]


def yaml_data(text: str):
    return YAML(typ="safe", pure=True).load(text)


def dash_column(text: str, item: str) -> int:
    line = next(line for line in text.splitlines() if line.strip() == f"- {item}")
    return line.index("-")


# ---------------------------------------------------------------------------------------------------------
# which file is which


@pytest.mark.parametrize(("name", "fmt"), [
    ("app.yml", "yaml"), ("app.YAML", "yaml"), ("settings.json", "json"), (".env", "env"),
    (".env.production", "env"), ("staging.env", "env"), ("pyproject.toml", "toml"), ("setup.ini", "ini"),
])
def test_file_format_by_name(name, fmt):
    assert cf.file_format(Path("conf") / name) == fmt


def test_file_format_env_file_by_identity(tmp_path):
    env_file = write(tmp_path / "settings", "A=1\n")
    assert cf.file_format(tmp_path / "settings", env_file) == "env"
    assert cf.file_format(tmp_path / "." / "settings", env_file) == "env"


def test_unknown_and_read_only_formats_are_refused():
    with pytest.raises(UsageError, match=r"unknown file type: notes\.txt \(known: .*\.yml"):
        cf.file_format(Path("notes.txt"))
    with pytest.raises(UsageError, match="unknown file type: notes.txt"):
        cf.editable_format(Path("notes.txt"))
    with pytest.raises(UsageError, match="only checked, not edited"):
        cf.editable_format(Path("pyproject.toml"))
    with pytest.raises(UsageError, match="only checked, not edited"):
        cf.editable_format(Path("setup.ini"))
    assert cf.editable_format(Path("a.yaml")) == "yaml"


# ---------------------------------------------------------------------------------------------------------
# the patch itself


def test_parse_merge_patch():
    assert cf.parse_merge_patch('{"a": {"b": null}}') == {"a": {"b": None}}
    with pytest.raises(UsageError, match="line 2 column 5"):
        cf.parse_merge_patch('{"a":\n  1,,}')
    with pytest.raises(UsageError, match="the patch must be a JSON object, got a list"):
        cf.parse_merge_patch("[1, 2]")
    with pytest.raises(UsageError, match="got a string"):
        cf.parse_merge_patch('"x"')
    with pytest.raises(UsageError, match="got null"):
        cf.parse_merge_patch("null")
    with pytest.raises(UsageError, match="NaN is not a JSON value"):
        cf.parse_merge_patch('{"a": NaN}')


# The examples of RFC 7386, appendix A.
@pytest.mark.parametrize(("target", "patch", "result"), [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
])
def test_apply_merge_patch_rfc_examples(target, patch, result):
    assert cf.apply_merge_patch(copy.deepcopy(target), patch) == result


def test_apply_merge_patch_changes_mappings_in_place():
    target = {"a": {"b": 1}, "c": 2}
    inner = target["a"]
    assert cf.apply_merge_patch(target, {"a": {"d": 3}}) is target
    assert target["a"] is inner and inner == {"b": 1, "d": 3}


# ---------------------------------------------------------------------------------------------------------
# YAML


def long_commented_yaml() -> str:
    sections = []
    for i in range(12):
        sections.append(f"""
# ---- service {i} ------------------------------------------------------------
# The settings of service {i}; the port must stay unique across the file.
service_{i}:
  name: svc-{i}          # the name shown on dashboards
  enabled: {'true' if i % 2 else 'false'}
  port: {8000 + i}   # listening port
  retries:    3      #   odd spacing, kept as written
  hosts: [a{i}.example.org,  b{i}.example.org]
  tags:
    - t{i}
    - 'quoted-{i}'
  limits: {{cpu: {i}, memory: "{i}Gi"}}
  # timeouts, in seconds
  timeout: {i}.5
""")
    head = "# Application settings.\n# Edited by hand and by the toolkit: keep the comments.\n---"
    return head + "".join(sections)


def test_one_key_change_in_a_long_commented_yaml_changes_exactly_one_line(tmp_path):
    path = write(tmp_path / "services.yaml", long_commented_yaml())
    old = path.read_text()
    assert len(old.splitlines()) > 150
    new = patch_file(path, {"service_5": {"port": 9999}})
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    assert len(old_lines) == len(new_lines)
    differing = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    assert len(differing) == 1
    assert old_lines[differing[0]] == "  port: 8005   # listening port\n"
    assert new_lines[differing[0]] == "  port: 9999   # listening port\n"
    assert yaml_data(new)["service_5"]["port"] == 9999


def test_change_inside_a_flow_mapping_of_a_long_yaml(tmp_path):
    path = write(tmp_path / "services.yaml", long_commented_yaml())
    old = path.read_text()
    new = patch_file(path, {"service_3": {"limits": {"cpu": 8}}})
    assert changed(old, new) == [(['  limits: {cpu: 3, memory: "3Gi"}\n'],
                                  ['  limits: {cpu: 8, memory: "3Gi"}\n'])]


# Block sequences under a key in four layouts: (text of the "ports" block, dash column relative to the key)
LAYOUTS = {
    "map4-dash2": ("server:\n    host: example.org\n    ports:\n      - 80\n      - 443\n", 2),
    "map4-dash4": ("server:\n    host: example.org\n    ports:\n        - 80\n        - 443\n", 4),
    "map2-dash2": ("server:\n  host: example.org\n  ports:\n    - 80\n    - 443\n", 2),
    "map2-dash0": ("server:\n  host: example.org\n  ports:\n  - 80\n  - 443\n", 0),
}


def layout_file(layout: str) -> str:
    head, _ = LAYOUTS[layout]
    indent = "    " if layout.startswith("map4") else "  "
    return (f"# flow and block styles side by side\n{head}"
            f"{indent}options: {{a: 1, b: 2}}   # flow mapping\n"
            f"{indent}names: [x, y]\n"
            f"{indent}nested:\n{indent}{indent}level: 3\n"
            "top_list:\n" + "\n".join(f"{' ' * LAYOUTS[layout][1]}- {x}" for x in ("one", "two")) + "\n"
            "last: true\n")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_yaml_layout_kept_after_change_to_another_key(tmp_path, layout):
    path = write(tmp_path / "app.yml", layout_file(layout))
    old = path.read_text()
    new = patch_file(path, {"server": {"host": "db.example.org"}})
    assert len(changed(old, new)) == 1
    (before, after), = changed(old, new)
    assert [line.strip() for line in before] == ["host: example.org"]
    assert [line.strip() for line in after] == ["host: db.example.org"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_yaml_layout_kept_after_change_inside_flow_mapping(tmp_path, layout):
    path = write(tmp_path / "app.yml", layout_file(layout))
    old = path.read_text()
    new = patch_file(path, {"server": {"options": {"b": 5}, "names": ["x", "y", "z"]}})
    indent = "    " if layout.startswith("map4") else "  "
    # The line of `names` is written anew, so its y is quoted: a YAML 1.1 reader takes a bare y for true.
    assert changed(old, new) == [
        ([f"{indent}options: {{a: 1, b: 2}}   # flow mapping\n", f"{indent}names: [x, y]\n"],
         [f"{indent}options: {{a: 1, b: 5}}   # flow mapping\n", f"{indent}names: [x, 'y', z]\n"]),
    ]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_new_block_sequence_follows_the_file_layout(tmp_path, layout):
    path = write(tmp_path / "app.yml", layout_file(layout))
    old = path.read_text()
    new = patch_file(path, {"server": {"extra": ["p", "q"]}})
    key_column = 4 if layout.startswith("map4") else 2
    assert dash_column(new, "p") - key_column == LAYOUTS[layout][1]
    assert dash_column(new, "p") == dash_column(new, "q")
    assert all(not before for before, _ in changed(old, new))  # only additions
    assert yaml_data(new)["server"]["extra"] == ["p", "q"]


def test_null_deletes_keys_and_leaves_the_rest(tmp_path):
    path = write(tmp_path / "app.yml", layout_file("map4-dash2"))
    old = path.read_text()
    new = patch_file(path, {"last": None, "server": {"ports": None, "nested": {"level": None}}})
    data = yaml_data(new)
    assert data == {"server": {"host": "example.org", "options": {"a": 1, "b": 2}, "names": ["x", "y"],
                               "nested": {}}, "top_list": ["one", "two"]}
    removed = [line for before, _ in changed(old, new) for line in before]
    assert removed == ["    ports:\n", "      - 80\n", "      - 443\n", "    nested:\n", "        level: 3\n",
                       "last: true\n"]
    assert [line for _, after in changed(old, new) for line in after] == ["    nested: {}\n"]


def test_adding_new_nested_keys(tmp_path):
    path = write(tmp_path / "app.yml", layout_file("map4-dash2"))
    old = path.read_text()
    new = patch_file(path, {"server": {"nested": {"cache": {"ttl": 60, "backend": "redis"}}},
                            "brand_new": {"a": {"b": "c"}}})
    assert yaml_data(new)["server"]["nested"] == {"level": 3, "cache": {"ttl": 60, "backend": "redis"}}
    assert yaml_data(new)["brand_new"] == {"a": {"b": "c"}}
    assert all(not before for before, _ in changed(old, new))
    assert "        cache:\n            ttl: 60\n" in new  # the file's 4-space mapping indent


def test_long_lines_are_not_wrapped(tmp_path):
    long_value = " ".join(f"word{i}" for i in range(60))
    assert len(long_value) > 300
    path = write(tmp_path / "app.yaml", f"description: {long_value}\nother: 1\n")
    new = patch_file(path, {"other": 2, "added": long_value + " more"})
    assert new == f"description: {long_value}\nother: 2\nadded: {long_value} more\n"


def test_quoting_styles_are_kept(tmp_path):
    text = "s: 'single'\nd: \"double\"\np: plain\nn: '0123'\n"
    path = write(tmp_path / "app.yaml", text)
    assert patch_file(path, {"p": "other"}) == "s: 'single'\nd: \"double\"\np: other\nn: '0123'\n"
    assert patch_file(path, {"s": "new one", "d": "two"}) == "s: 'new one'\nd: \"two\"\np: other\nn: '0123'\n"


def test_yaml_bom_crlf_document_start_and_missing_final_newline(tmp_path):
    path = write(tmp_path / "app.yaml", "\ufeff# head\r\n---\r\na: 1\r\nb: 2   # two")
    assert patch_file(path, {"b": 3}) == "\ufeff# head\r\n---\r\na: 1\r\nb: 3   # two"
    assert patch_file(path, {"c": 4}) == "\ufeff# head\r\n---\r\na: 1\r\nb: 3   # two\r\nc: 4"


def test_yaml_comments_and_blank_lines_survive_a_deletion_nearby(tmp_path):
    text = "a: 1\n\n# about b\nb:\n  x: 1   # x\n  y: 2\n\n# about c\nc: 3\n"
    path = write(tmp_path / "app.yaml", text)
    assert patch_file(path, {"b": {"y": None}}) == "a: 1\n\n# about b\nb:\n  x: 1   # x\n\n# about c\nc: 3\n"


def test_empty_and_comment_only_yaml_get_the_new_mapping(tmp_path):
    assert cf.patch_text("yaml", "", {"a": 1}) == "a: 1\n"
    assert cf.patch_text("yaml", "# nothing yet\n", {"a": {"b": 1}}) == "# nothing yet\na:\n  b: 1\n"


def test_patch_that_changes_nothing_returns_the_same_text():
    text = "a:   1    # spaced\nb: {x: 1,y: 2}\n"
    assert cf.patch_text("yaml", text, {"a": 1, "b": {"y": 2}, "gone": None}) is text
    json_text = '{"a": 1}'
    assert cf.patch_text("json", json_text, {"a": 1, "z": None}) is json_text
    env_text = "A=1\nB='x y'\n"
    assert cf.patch_text("env", env_text, {"A": 1, "B": "x y", "C": None}) is env_text


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "must be a mapping, got a list"),
    ("just text\n", "must be a mapping, got a string"),
    ("a: 1\n---\nb: 2\n", "holds 2 documents"),
    ("a: [1\n", "does not parse: line 2 column 1"),
    ("a: 1\na: 2\n", "duplicate key"),
])
def test_yaml_documents_that_cannot_be_patched(text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        cf.patch_text("yaml", text, {"a": 2})


def test_yaml_anchors_and_aliases():
    text = ("defaults: &d {x: 1}\nprod: *d\n"
            "base: &b\n  adapter: pg\n  host: localhost\ndev:\n  <<: *b\n  db: dev\n")
    # The patch changes `prod` only, not `defaults` through the alias: prod gets its own copy.
    new = cf.patch_text("yaml", text, {"prod": {"x": 2}})
    assert changed(text, new) == [(["prod: *d\n"], ["prod: {x: 2}\n"])]
    # A key that came in through a merge is overridden where the patch says.
    new = cf.patch_text("yaml", text, {"dev": {"host": "db.internal"}})
    assert changed(text, new) == [([], ["  host: db.internal\n"])]
    assert yaml_data(new)["dev"] == {"adapter": "pg", "host": "db.internal", "db": "dev"}
    # Changing what a merge shares cannot be written as the patch means: refused, with the reason.
    with pytest.raises(ToolkitError, match=r"merge keys \(<<\) share"):
        cf.patch_text("yaml", text, {"base": {"host": "elsewhere"}})


# A hand-edited file: blocks indented by 3 and by 9, lists with and without indented dashes, a flow list
# over three lines, "~" for null, block scalars, a directive and document markers. ruamel.yaml writes all
# of these its own way; the lines a patch does not touch must still come out as they were.
MIXED_YAML = """\
%YAML 1.2
---
# hand-edited
top:   value      # spaced
multi: [one,
        two,
    three]
script: |
  # not a comment
  echo hi

folded: >-
   some folded
   text
mixed:
   three_space: 1
   nested:
         deep: 2
   list:
     - a
     -   b
   after: 3
dashes:
- x
- y
nulls: ~
last: {k: v}
...
"""


@pytest.mark.parametrize(("patch", "before", "after"), [
    ({"mixed": {"three_space": 4}}, ["   three_space: 1\n"], ["   three_space: 4\n"]),
    ({"mixed": {"nested": {"deep": 5}}}, ["         deep: 2\n"], ["         deep: 5\n"]),
    ({"mixed": {"nested": {"deeper": 6}}}, [], ["         deeper: 6\n"]),
    ({"mixed": {"list": ["a", "b", "c"]}}, [], ["     - c\n"]),
    ({"mixed": {"new": 7}}, [], ["   new: 7\n"]),
    ({"dashes": ["x", "y", "z"]}, [], ["- z\n"]),
    ({"multi": ["one", "two"]},
     ["multi: [one,\n", "        two,\n", "    three]\n"], ["multi: [one, two]\n"]),
    ({"nulls": {"set": True}}, ["nulls: ~\n"], ["nulls:\n", "   set: true\n"]),  # 3: the file's own indent
    ({"folded": "other text"}, ["   some folded\n", "   text\n"], ["   other text\n"]),
    ({"last": None}, ["last: {k: v}\n"], []),
])
def test_hand_edited_layouts_are_kept_around_a_change(patch, before, after):
    new = cf.patch_text("yaml", MIXED_YAML, patch)
    assert changed(MIXED_YAML, new) == [(before, after)]
    expected = cf.apply_merge_patch(yaml_data(MIXED_YAML), patch)
    assert yaml_data(new) == expected


# ---------------------------------------------------------------------------------------------------------
# JSON


@pytest.mark.parametrize("unit", ["  ", "    ", "\t"])
def test_json_keeps_key_order_and_indentation(tmp_path, unit):
    doc = {"zeta": 1, "alpha": {"inner": [1, 2], "b": "é"}, "mid": True}
    text = json.dumps(doc, indent=unit, ensure_ascii=False) + "\n"
    path = write(tmp_path / "app.json", text)
    new = patch_file(path, {"alpha": {"b": "ü", "new": None}, "added": {"k": "v"}})
    expected = {"zeta": 1, "alpha": {"inner": [1, 2], "b": "ü"}, "mid": True, "added": {"k": "v"}}
    assert new == json.dumps(expected, indent=unit, ensure_ascii=False) + "\n"
    assert list(json.loads(new)) == ["zeta", "alpha", "mid", "added"]


def test_compact_json_stays_on_one_line(tmp_path):
    path = write(tmp_path / "compact.json", '{"b":1,"a":{"x":[1,2]}}')
    assert patch_file(path, {"a": {"y": "z"}}) == '{"b":1,"a":{"x":[1,2],"y":"z"}}'
    path = write(tmp_path / "spaced.json", '{"b": 1, "a": {"x": [1, 2]}}\n')
    assert patch_file(path, {"b": None}) == '{"a": {"x": [1, 2]}}\n'


def test_json_untouched_hand_formatted_lines_stay(tmp_path):
    text = '{\n  "name": "app",\n  "point": {"x": 1, "y": 2},\n  "list": [1, 2, 3],\n  "port": 80\n}'
    path = write(tmp_path / "app.json", text)
    new = patch_file(path, {"port": 81})
    assert new == text.replace('"port": 80', '"port": 81')
    new = patch_file(path, {"debug": False})
    assert new == text.replace('"port": 80', '"port": 81,\n  "debug": false')


def test_json_hand_formatting_next_to_a_change_stays():
    text = '{\n  "name": "caf\\u00e9",\n  "point": {"x": 1, "y": 2},\n  "list": [1, 2, 3]\n}\n'
    # a key added after the last one: the line above only gains its comma, its escapes stay
    assert cf.patch_text("json", text, {"added": True}) == text.replace("3]\n", '3],\n  "added": true\n')
    # the last key removed: the line above only loses its comma
    assert cf.patch_text("json", text, {"list": None}) == text.replace('2},\n  "list": [1, 2, 3]', "2}")
    # a change inside a one-line object rewrites that object; the lines around stay
    new = cf.patch_text("json", text, {"point": {"y": 5}})
    (before, after), = changed(text, new)
    assert before == ['  "point": {"x": 1, "y": 2},\n'] and json.loads(new)["point"] == {"x": 1, "y": 5}


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "must be an object, got a list"),
    ('"text"', "must be an object, got a string"),
    ('{"a": 1,}', "does not parse: line 1 column "),  # the column and wording are the json module's own
])
def test_json_documents_that_cannot_be_patched(text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        cf.patch_text("json", text, {"a": 2})


def test_json_bom_and_crlf(tmp_path):
    path = write(tmp_path / "app.json", '\ufeff{\r\n    "b": 1\r\n}\r\n')
    assert patch_file(path, {"c": "x"}) == '\ufeff{\r\n    "b": 1,\r\n    "c": "x"\r\n}\r\n'


# ---------------------------------------------------------------------------------------------------------
# .env

ENV_TEXT = """\
# Database settings
export DB_HOST=db.internal
DB_PASSWORD="s3cret value"  # rotated monthly
GREETING='hello world'

PLAIN=value # trailing comment
EMPTY=
LEVEL=info
LEVEL=debug
UNTOUCHED="keep \\"me\\""
"""


def test_env_update_keeps_comments_quotes_and_export(tmp_path):
    path = write(tmp_path / ".env", ENV_TEXT)
    new = patch_file(path, {"DB_HOST": "db2.internal", "DB_PASSWORD": "n3w", "PLAIN": "two words",
                            "LEVEL": "warning", "EMPTY": "$HOME/x"})
    assert new == ENV_TEXT.replace("export DB_HOST=db.internal", "export DB_HOST=db2.internal") \
        .replace('DB_PASSWORD="s3cret value"', 'DB_PASSWORD="n3w"') \
        .replace("PLAIN=value #", "PLAIN='two words' #") \
        .replace("LEVEL=debug", "LEVEL=warning") \
        .replace("EMPTY=\n", "EMPTY='$HOME/x'\n")
    values = dotenv_values(path, interpolate=False)
    assert values["DB_HOST"] == "db2.internal" and values["PLAIN"] == "two words"
    assert values["EMPTY"] == "$HOME/x" and values["LEVEL"] == "warning"
    assert values["UNTOUCHED"] == 'keep "me"' and values["GREETING"] == "hello world"
    assert "LEVEL=info\n" in new  # only the effective (last) assignment changes


def test_env_quoting_of_awkward_values(tmp_path):
    path = write(tmp_path / "app.env", "A=1\nQ='old'\n")
    awkward = {"SPACE": "a b", "DOLLAR": "pa$$word", "HASH": "x#y", "QUOTE": "it's \"quoted\"",
               "BACKSLASH": "C:\\dir\\", "EMPTY": "", "EQUALS": "k=v", "Q": "can't", "NUM": 1.5, "FLAG": True,
               "LINES": "one\ntwo"}
    patch_file(path, awkward)
    expected = {key: value for key, value in awkward.items()}
    expected.update(A="1", NUM="1.5", FLAG="true")
    assert dotenv_values(path, interpolate=False) == expected
    text = path.read_text()
    assert "SPACE='a b'\n" in text and "DOLLAR='pa$$word'\n" in text and "FLAG=true\n" in text
    assert "Q=\"can't\"\n" in text  # the old single quotes cannot hold a single quote


def test_env_delete_and_append(tmp_path):
    path = write(tmp_path / ".env", ENV_TEXT)
    new = patch_file(path, {"LEVEL": None, "GREETING": None, "NEW_KEY": "v", "ANOTHER": 2})
    assert "LEVEL" not in new and "GREETING" not in new
    assert new.endswith('UNTOUCHED="keep \\"me\\""\nNEW_KEY=v\nANOTHER=2\n')
    assert "# Database settings\nexport DB_HOST=db.internal\n" in new
    assert "\n\nPLAIN=value # trailing comment\n" in new  # the blank line before the deleted key's neighbour
    values = dotenv_values(path, interpolate=False)
    assert "LEVEL" not in values and values["NEW_KEY"] == "v" and values["ANOTHER"] == "2"


def test_env_append_to_a_file_without_final_newline(tmp_path):
    path = write(tmp_path / ".env", "A=1")
    assert patch_file(path, {"B": "x"}) == "A=1\nB=x\n"
    path = write(tmp_path / ".env", "A=1\r\nB=2\r\n")
    assert patch_file(path, {"C": "3", "A": "one"}) == "A=one\r\nB=2\r\nC=3\r\n"


def test_env_key_without_value_gets_one():
    assert cf.patch_text("env", "A # set below\nexport B\n", {"A": "x", "B": "y z"}) == \
        "A=x # set below\nexport B='y z'\n"


@pytest.mark.parametrize("patch", [{"A": {"nested": 1}}, {"A": [1, 2]}, {"1BAD": "x"}, {"BAD KEY": "x"}])
def test_env_bad_values_and_keys(patch):
    with pytest.raises(UsageError):
        cf.patch_text("env", "A=1\n", patch)


def test_env_keys():
    assert cf.env_keys(ENV_TEXT) == ["DB_HOST", "DB_PASSWORD", "GREETING", "PLAIN", "EMPTY", "LEVEL",
                                     "UNTOUCHED"]
    assert cf.env_keys("\ufeffA=1\n# B=2\n  C = 3\n") == ["A", "C"]


# ---------------------------------------------------------------------------------------------------------
# check_file


@pytest.mark.parametrize(("name", "text", "line", "column"), [
    ("bad.yaml", "a: 1\nb: c: d\n", 2, 5),
    ("dup.yaml", "password: 1\npassword: hunter2\n", 2, 1),
    ("bad.json", '{\n  "a": 1,\n  "b" 2\n}\n', 3, 7),
    ("bad.toml", "a = 1\nb = \n", 2, 5),
    ("bad.ini", "[main]\na = 1\nthis is not a setting\n", 3, 1),
    ("nohead.ini", "a = 1\n", 1, 1),
    ("bad.env", "A=1\n\n\nB='unclosed\nC=3\n", 4, 1),
])
def test_check_file_reports_line_and_column(tmp_path, name, text, line, column):
    path = write(tmp_path / name, text)
    problem = cf.check_file(path, cf.file_format(path))
    assert problem is not None
    assert (problem.path, problem.line, problem.column) == (path, line, column)
    assert problem.message and "hunter2" not in problem.message
    assert str(problem).startswith(f"{path}: line {line}, column {column}: ")


@pytest.mark.parametrize(("name", "text"), [
    ("good.yaml", "a: 1\nb: !Ref other\nc: !Sub {x: 1}\nd: !Join [a, b]\n---\nsecond: doc\n"),
    ("good.json", '{"a": [1, 2]}'),
    ("good.toml", "[server]\nport = 80\n"),
    ("good.ini", "[server]\nport = 80\n"),
    (".env", ENV_TEXT),
])
def test_check_file_accepts_good_files(tmp_path, name, text):
    path = write(tmp_path / name, text)
    assert cf.check_file(path, cf.file_format(path)) is None


def test_check_file_reports_undecodable_bytes(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    problem = cf.check_file(path, "yaml")
    assert (problem.line, problem.column) == (2, 7) and "UTF-8" in problem.message


# Strings that a YAML 1.1 or 1.2 reader takes for something else when they are written bare.
AMBIGUOUS_STRINGS = ["yes", "no", "on", "off", "y", "n", "Y", "No", "ON", "true", "False", "null", "~", "",
                     "1e3", "0x10", "0o10", "010", "1_000", "12:30", "1:20:30.5", "-0", "+1", ".5", "1.",
                     ".inf", "-.Inf", ".NaN", "2001-12-14", "2001-12-14 21:59:43.10 -5", "=", "<<", "0b101"]
FLOATS = [1e300, 1e-05, 1e16, -2.5e-10, 0.1, 1.7976931348623157e308, 5e-324, -0.0]


def test_yaml_written_by_update_means_what_the_json_meant_to_yaml_1_1_and_1_2_readers():
    patch = {"values": AMBIGUOUS_STRINGS, "keys": {text: text for text in AMBIGUOUS_STRINGS if text != "<<"},
             "floats": FLOATS, "flow": {"mode": "on", "n": 1e300}, "big": 10**30, "flag": True, "nothing": [None]}
    for text in ("flow: {min: 2}\n", "# comments only\n", "flow: {min: 2}\nother: [a, b]\n"):
        new = cf.patch_text("yaml", text, patch)
        for read in (pyyaml.safe_load, yaml_data):  # YAML 1.1 (PyYAML) and YAML 1.2 (ruamel.yaml)
            data = read(new)
            for key, value in patch.items():
                expected = {"min": 2, **value} if key == "flow" and "min" in text else value
                assert json.dumps(data[key]) == json.dumps(expected), (read, key, new)
    # an existing key whose value becomes an ambiguous string
    assert pyyaml.safe_load(cf.patch_text("yaml", "feature: off-peak\n", {"feature": "off"})) == {"feature": "off"}


# ---------------------------------------------------------------------------------------------------------
# bounds: crafted documents are refused at once, with their position, by every reader


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each level a list of nine aliases of the level before (9**9 strings)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nport: 1\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BEYOND_BOUNDS = [  # (file name, text, line, column, message)
    ("bomb.yaml", alias_bomb(), 6, 10, "aliases expand the document by more than 100,000 values"),
    ("endless.yaml", "a: 1\nb: &b [1, *b]\n", 2, 11, "the alias *b is inside what it names"),
    ("flow.yaml", "a: " + nested(5000) + "\n", 1, 104, "nested deeper than 100 levels"),
    ("block.yaml", "".join(" " * i + f"k{i}:\n" for i in range(150)) + " " * 150 + "x: 1\n", 101, 101,
     "nested deeper than 100 levels"),
    ("deep.json", '{"a": ' + nested(900) + "}", 1, 106, "nested deeper than 100 levels"),
    ("deeper.json", '{"a": ' + nested(100_000) + "}", 1, 106, "nested deeper than 100 levels"),
    ("deep.toml", "a = " + nested(5000) + "\n", 1, 105, "nested deeper than 100 levels"),
    ("long.json", '{"n": ' + "7" * 5000 + "}", 1, 7, "an integer of 5000 digits"),
    ("long.yaml", "a: 1\nn: " + "7" * 5000 + "\n", 2, 4, "an integer of 5000 digits"),
    ("long.toml", "n = " + "7" * 5000 + "\n", 1, 5, "an integer of 5000 digits"),
    ("huge.json", '{"a": [1, 1e999]}', 1, 11, "1e999 is beyond the range of a number"),
    ("nan.json", '{"a": [1, NaN]}', 1, 11, "NaN is not a JSON value"),
    ("inf.json", '{"a": -Infinity}', 1, 7, "-Infinity is not a JSON value"),
    ("month.yaml", "a: 1\nb: 2024-13-01\n", 2, 4, "month must be in 1..12"),
]


@pytest.mark.parametrize(("name", "text", "line", "column", "message"), BEYOND_BOUNDS,
                         ids=[case[0] for case in BEYOND_BOUNDS])
def test_check_file_refuses_documents_beyond_the_bounds_at_once(tmp_path, name, text, line, column, message):
    path = write(tmp_path / name, text)
    started = time.monotonic()
    problem = cf.check_file(path, cf.file_format(path))
    assert time.monotonic() - started < 1
    assert problem is not None and (problem.line, problem.column) == (line, column), problem
    assert message in problem.message


@pytest.mark.parametrize(("name", "text", "line", "column", "message"),
                         [case for case in BEYOND_BOUNDS if not case[0].endswith(".toml")],
                         ids=[case[0] for case in BEYOND_BOUNDS if not case[0].endswith(".toml")])
def test_update_refuses_documents_beyond_the_bounds_at_once(name, text, line, column, message):
    started = time.monotonic()
    with pytest.raises(UsageError, match=rf"line {line} column {column}: .*{re.escape(message)}"):
        cf.patch_text(cf.editable_format(Path(name)), text, {"port": 2})
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(("patch", "message"), [
    ('{"a": ' + nested(900) + "}", "the patch is refused: nested deeper than 100 levels at line 1 column 106"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested deeper than 100 levels at line 1 column 601"),
    ('{"a": 1e999}', "the patch is refused: 1e999 is beyond the range of a number"),
    ('{"a": -1E+400}', "-1E+400 is beyond the range of a number"),
    ('{"a": Infinity}', "the patch is not valid JSON: Infinity is not a JSON value at line 1 column 7"),
    ('{"a": [-Infinity]}', "-Infinity is not a JSON value"),
    ('{"a": ' + "9" * 4301 + "}", "an integer of 4301 digits"),
])
def test_patches_beyond_the_bounds_are_refused(patch, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        cf.parse_merge_patch(patch)


def test_documents_just_within_the_bounds_are_patched():
    deepest: object = 1
    for _ in range(MAX_DEPTH):  # collections inside collections, the document's own included
        deepest = {"k": deepest}
    patch: dict = {"new": 2}
    for _ in range(MAX_DEPTH - 1):
        patch = {"k": patch}
    assert cf.parse_merge_patch(json.dumps(patch)) == patch
    text = json.dumps(deepest, indent=2)
    assert json.loads(cf.patch_text("json", text, patch)) == cf.apply_merge_patch(copy.deepcopy(deepest), patch)
    block = io.StringIO()
    YAML().dump(deepest, block)
    for text in (block.getvalue(), "a: " + json.dumps(deepest["k"]) + "\n"):
        expected = cf.apply_merge_patch(yaml_data(text), patch if text is block.getvalue() else {"a": patch["k"]})
        new = cf.patch_text("yaml", text, patch if text is block.getvalue() else {"a": patch["k"]})
        assert yaml_data(new) == expected
    # aliases that add fewer values than the bound are read as before
    shared = "base: &b [" + ", ".join(map(str, range(999))) + "]\n" + "".join(f"u{i}: *b\n" for i in range(99))
    assert yaml_data(cf.patch_text("yaml", shared + "x: 1\n", {"x": 2}))["u98"] == list(range(999))


# ---------------------------------------------------------------------------------------------------------
# masked_diff


def test_masked_diff_hides_secret_values():
    diff = cf.masked_diff("DB_HOST=a\nDB_PASSWORD=hunter2\n", "DB_HOST=b\nDB_PASSWORD=hunter3\n", ".env")
    assert diff.startswith("--- a/.env\n+++ b/.env\n@@ ")
    assert "hunter" not in diff
    assert "-DB_PASSWORD=********\n" in diff and "+DB_PASSWORD=********\n" in diff
    assert "-DB_HOST=a\n" in diff and "+DB_HOST=b\n" in diff

    old = "db:\n  user: app\n  password: hunter2\n  api_key: |\n    k1\n  url: postgres://app:pw1@h/db\n"
    new = old.replace("hunter2", "hunter3").replace("k1", "k2").replace("pw1", "pw2")
    diff = cf.masked_diff(old, new, "config/app.yaml")
    assert "hunter" not in diff and "k1" not in diff and "k2" not in diff and "pw1" not in diff
    assert "-  password: ********\n" in diff and "   user: app\n" in diff

    old, new = '{\n  "token": "t1",\n  "n": 1\n}\n', '{\n  "token": "t2",\n  "n": 2\n}\n'
    diff = cf.masked_diff(old, new, "a.json")
    assert "t1" not in diff and '-  "token": ********,\n' in diff

    diff = cf.masked_diff("db: {user: a, Secret_Key: s1}\n", "db: {user: b, Secret_Key: s2}\n", "f.yml")
    assert "s1" not in diff and "+db: {user: b, Secret_Key: ********}\n" in diff
    assert cf.masked_diff("same\n", "same\n", "x") == ""


SECRET_KEYS = ["DB_PASS", "PWD", "SESSION_KEY", "dbpassword", "apiKey", "x-api-key", "GITHUB_TOKEN", "PIN",
               "client_secret", "AWS_SECRET_ACCESS_KEY", "ssh_private_key", "credentials", "PASSPHRASE", "keys"]
PLAIN_KEYS = ["KEYBOARD_LAYOUT", "PASSENGER_COUNT", "MONKEY", "DB_HOST", "bypass", "PINNED_VERSION"]


@pytest.mark.parametrize("fmt", ["env", "yaml", "json", "flow"])
def test_masked_diff_hides_keys_that_name_a_secret_anywhere_in_the_key(fmt):
    def text(value: str) -> str:
        pairs = [(key, f"{value}{i}z") for i, key in enumerate(SECRET_KEYS + PLAIN_KEYS)]
        if fmt == "env":
            return "".join(f"{key}={v}\n" for key, v in pairs)
        if fmt == "yaml":
            return "".join(f"{key}: {v}\n" for key, v in pairs)
        if fmt == "json":
            return "{\n" + ",\n".join(f'  "{key}": "{v}"' for key, v in pairs) + "\n}\n"
        return "all: {" + ", ".join(f"{key}: {v}" for key, v in pairs) + "}\n"

    diff = cf.masked_diff(text("old"), text("new"), "f")
    for i, key in enumerate(SECRET_KEYS):
        assert f"old{i}z" not in diff and f"new{i}z" not in diff, key
    for i, key in enumerate(PLAIN_KEYS, start=len(SECRET_KEYS)):
        assert f"old{i}z" in diff and f"new{i}z" in diff, key


def test_masked_diff_hides_nested_secret_blocks():
    old = "secrets:\n- s1\n- s2\nx: 1\n"
    diff = cf.masked_diff(old, old.replace("s1", "s3").replace("x: 1", "x: 2"), "f.yaml")
    assert "s1" not in diff and "s3" not in diff and "-- ********\n" in diff and "+x: 2\n" in diff
    old = '{\n  "credentials": {\n    "user": "u1",\n    "key": "k1"\n  },\n  "n": 1\n}\n'
    diff = cf.masked_diff(old, old.replace("k1", "k2").replace('"n": 1', '"n": 2'), "f.json")
    assert "k1" not in diff and "k2" not in diff and "u1" not in diff and '+  "n": 2\n' in diff


# ---------------------------------------------------------------------------------------------------------
# randomised round trips

SAMPLE_YAML = """\
# sample configuration
app_name: demo            # shown in the UI
debug: false
workers: 4
database:
  host: db.internal
  port: 5432
  pool: {min_conn: 1, max_conn: 10}
  replicas:
    - r1.internal
    - r2.internal
cache:
  backend: redis
  ttl_seconds: 300   # five minutes
  options:
    compress: true
    prefix: 'demo:'
features: [search, export]
# logging
logging:
  level: info
  format: "%(message)s"
"""


def random_value(rng: random.Random):
    return rng.choice([
        rng.randint(-5, 5000), rng.random() * 100, rng.choice([True, False]), f"text {rng.randint(0, 99)}",
        "plain", [rng.randint(0, 9), "x"], {"leaf": rng.randint(0, 9)},
    ])


def random_patch(rng: random.Random, data: dict, counter: list[int]) -> dict:
    """One to three random operations (set, delete, add, replace) merged into one patch."""
    paths = []

    def walk(node, prefix):
        for key, value in node.items():
            paths.append(((*prefix, key), value))
            if isinstance(value, dict):
                walk(value, (*prefix, key))

    walk(data, ())
    patch: dict = {}
    for _ in range(rng.randint(1, 3)):
        path, value = rng.choice(paths)
        operation = rng.choice(["set", "delete", "add", "replace"])
        if operation == "add":
            path = (*(path[:-1] if not isinstance(value, dict) else path), f"new_{counter[0]}")
            counter[0] += 1
        new = None if operation == "delete" else random_value(rng)
        if operation == "set" and isinstance(value, dict):
            new = {"leaf": 1}
        node = patch
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = new
    return patch


def patched_keys(patch: dict) -> set[str]:
    keys = set()
    for key, value in patch.items():
        keys.add(key)
        if isinstance(value, dict):
            keys |= patched_keys(value)
    return keys


def assert_only_patched_lines_changed(old: str, new: str, patch: dict) -> None:
    """Every changed line names a patched key, lies under one (a parent line names one), is the comment
    right above a deleted key, closes a patched JSON block, or only gained or lost a comma."""
    names = patched_keys(patch)
    alternatives = "|".join(map(re.escape, names))
    mentions = re.compile(rf"""(?<![\w.-])["']?(?:{alternatives})["']?\s*:""")
    old_lines, new_lines = old.splitlines(), set(new.splitlines())

    def level(line: str) -> tuple[int, bool]:
        return len(line) - len(line.lstrip()), line.lstrip().startswith("- ")  # "key:\n- item" nests

    def under_patched_key(n: int) -> bool:
        at = level(old_lines[n])
        for line in reversed(old_lines[:n]):
            if line.strip() and not line.lstrip().startswith("#") and level(line) < at:
                if mentions.search(line):
                    return True
                at = level(line)
        return False

    for start, before, _after in changed_at(old, new):
        for k, line in enumerate(before):
            n, line = start + k, line.rstrip("\n")
            if mentions.search(line) or under_patched_key(n):
                continue
            comment = re.fullmatch(r"\s*(#.*)?", line)
            if comment and any(mentions.search(later) for later in old_lines[n:n + 3]):
                continue  # the comment above a deleted key goes with it
            if not line.strip() and n and (mentions.search(old_lines[n - 1]) or under_patched_key(n - 1)):
                continue  # a blank line that ended a replaced block scalar
            if re.fullmatch(r"\s*[\]}],?", line) and any(mentions.search(prev) for prev in before[:k]):
                continue  # the bracket that closed a deleted JSON block
            if line + "," in new_lines or line.rstrip(",") in new_lines:
                continue  # JSON: a comma added or dropped because a neighbour was added or deleted
            raise AssertionError(f"line changed without being patched: {line!r}\npatch: {patch}")


@pytest.mark.parametrize("fmt", ["yaml", "json", "mixed-yaml"])
def test_random_patches_round_trip(fmt):
    rng = random.Random(7386)
    sample = MIXED_YAML if fmt == "mixed-yaml" else SAMPLE_YAML
    plain = YAML(typ="safe", pure=True).load(sample)
    text = json.dumps(plain, indent=2) + "\n" if fmt == "json" else sample
    counter = [0]
    for _ in range(40):
        patch = random_patch(rng, plain, counter)
        expected = cf.apply_merge_patch(copy.deepcopy(plain), copy.deepcopy(patch))
        new = cf.patch_text("json" if fmt == "json" else "yaml", text, patch)
        reread = json.loads(new) if fmt == "json" else YAML(typ="safe", pure=True).load(new)
        assert reread == expected, patch
        assert_only_patched_lines_changed(text, new, patch)


def test_random_env_patches_round_trip():
    rng = random.Random(1)
    values = ["plain", "two words", "$dollar", "it's", 'say "hi"', "back\\slash", "", "a=b", "#hash", 42,
              True]
    for _ in range(30):
        patch = {rng.choice(["DB_HOST", "DB_PASSWORD", "GREETING", "PLAIN", "EMPTY", "LEVEL", "NEW_ONE"]):
                 rng.choice([*values, None]) for _ in range(rng.randint(1, 3))}
        new = cf.patch_text("env", ENV_TEXT, patch)
        expected = dict(dotenv_values(stream=io.StringIO(ENV_TEXT), interpolate=False))
        for key, value in patch.items():
            if value is None:
                expected.pop(key, None)
            else:
                expected[key] = {True: "true"}.get(value, str(value)) if not isinstance(value, str) else value
        assert dict(dotenv_values(stream=io.StringIO(new), interpolate=False)) == expected
        assert "# Database settings\n" in new and 'UNTOUCHED="keep \\"me\\""\n' in new
