"""Keeping untouched lines: the three-way merge of the serialiser's change into the file."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator

from common.errors import ToolkitError

from .text import _ends_with_newline, _newline_of, _split_lines

# base   = the serialiser's rendering of the document as it is
# theirs = its rendering of the patched document
# ours   = the file itself
# The lines base -> theirs changes are applied to ours where they correspond; the candidates are then
# tried in turn by `_first_reading_back`, which keeps the first that parses back to the patched data.


# A line of the merged text: (text, its indent in the serialiser's layout or None if unknown, and where it
# comes from: "file", "serialiser", or "context" for a replaced line of the file that is not written)
_Line = tuple[str, int | None, str]
# A line for comparing: (the keys of the lines it is nested under, its text without line ending)
_Placed = tuple[tuple[str, ...], str]
# The key a YAML or JSON line starts with (after any "- ")
_KEY_LINE = re.compile(
    r"""[ \t]*(?:-[ \t]+)?("(?:\\.|[^"\\])*"|'[^']*'|[^\s#'"?:{}\[\],-][^#:]*?)[ \t]*:(?:[ \t]|$)""")

_NOTHING = re.compile(r"(?!)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _level(line: str) -> tuple[int, bool]:
    """How deep a line is: its indent, and whether it is a "- " item (an item nests under a key above it
    at the same indent, as in "key:\n- item")."""
    rest = line.lstrip(" \t")
    return _indent(line), rest[:1] == "-" and rest[1:2] in ("", " ", "\t")


def _key_of(line: str) -> str | None:
    match = _KEY_LINE.match(line)
    return match.group(1) if match else None


def _placed(lines: list[str], filler: re.Pattern[str]) -> list[_Placed]:
    """Each line with the keys it is nested under, so that a diff pairs lines by place as well as text:
    "- x" under one key is not "- x" under another."""
    stack: list[tuple[tuple[int, bool], str]] = []
    out = []
    for line in lines:
        text = line.rstrip("\r\n")
        if filler.fullmatch(text):  # comments and blank lines say nothing about nesting
            out.append((tuple(key for _, key in stack), text))
            continue
        level = _level(text)
        while stack and stack[-1][0] >= level:
            stack.pop()
        out.append((tuple(key for _, key in stack), text))
        stack.append((level, _key_of(text) or ""))
    return out


def _matched(a: list, b: list) -> dict[int, int]:
    """Index in A -> index in B for the items that difflib pairs as equal."""
    pairs: dict[int, int] = {}
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        pairs.update((block.a + k, block.b + k) for k in range(block.size))
    return pairs


def _pair(base: list[_Placed], ours: list[_Placed]) -> dict[int, int]:
    """Index in BASE -> index in OURS for lines that say the same thing, however the serialiser laid them out.

    Equal lines pair; so do lines one for one where as many lines differ on both sides (re-spaced lines),
    and otherwise lines that start with the same key in the same place.
    """
    pairs: dict[int, int] = {}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, ours, autojunk=False).get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            pairs.update(zip(range(i1, i2), range(j1, j2), strict=True))
        elif tag == "replace":
            keys_b, keys_o = ([(path, _key_of(text)) for path, text in lines]
                              for lines in (base[i1:i2], ours[j1:j2]))
            for block in difflib.SequenceMatcher(None, keys_b, keys_o, autojunk=False).get_matching_blocks():
                pairs.update((i1 + block.a + k, j1 + block.b + k) for k in range(block.size)
                             if keys_b[block.a + k][1] is not None)
    return pairs


def _merge_lines(ours: str, base: str, theirs: str, filler: re.Pattern[str]) -> str:
    """Three-way merge by lines: the changes base -> theirs, applied to ours.

    BASE is the serialiser's rendering of the unpatched document, THEIRS its rendering of the patched one,
    OURS the file as it is. Lines of base that difflib pairs with an equal line of ours and of theirs are
    stable; between two stable lines, a stretch the patch did not change is taken from ours as it is, and a
    stretch it changed is merged by `_merge_stretch`. FILLER matches lines that carry no data (blank lines,
    YAML comments). The caller parses the result again, so a wrong guess here cannot go unnoticed.
    """
    ours_lines = _split_lines(ours)
    ours_p, base_p, theirs_p = (_placed(_split_lines(text), filler) for text in (ours, base, theirs))
    newline = _newline_of(ours)

    to_ours, to_theirs = _matched(base_p, ours_p), _matched(base_p, theirs_p)
    # Comments and blank lines are not anchors: they may sit between a key and the block the patch adds
    stable = [(b, to_ours[b], to_theirs[b]) for b in range(len(base_p))
              if b in to_ours and b in to_theirs and not filler.fullmatch(base_p[b][1])]
    stable.append((len(base_p), len(ours_lines), len(theirs_p)))  # sentinel: the end of all three

    out: list[_Line] = []
    b0 = o0 = t0 = 0
    for b1, o1, t1 in stable:
        if theirs_p[t0:t1] == base_p[b0:b1]:
            out += _as_ours(ours_lines[o0:o1], base_p[b0:b1], _pair(base_p[b0:b1], ours_p[o0:o1]))
        else:
            out += _merge_stretch(base_p[b0:b1], ours_lines[o0:o1], ours_p[o0:o1], theirs_p[t0:t1], filler,
                                  newline)
        if b1 < len(base_p):
            out.append((ours_lines[o1], _indent(base_p[b1][1]), "file"))
        b0, o0, t0 = b1 + 1, o1 + 1, t1 + 1

    lines = _reindent(out, filler)
    # ours' last line may lack its newline and no longer be last
    lines = [line if _ends_with_newline(line) or i == len(lines) - 1 else line + newline
             for i, line in enumerate(lines)]
    return _final_newline_as(ours, "".join(lines))


def _as_ours(ours: list[str], base: list[_Placed], pairs: dict[int, int]) -> list[_Line]:
    """Lines of ours, each with the indent of the base line it pairs with."""
    ref = {j: _indent(base[i][1]) for i, j in pairs.items()}
    return [(line, ref.get(j), "file") for j, line in enumerate(ours)]


def _merge_stretch(base: list[_Placed], ours: list[str], ours_p: list[_Placed], theirs: list[_Placed],
                   filler: re.Pattern[str], newline: str) -> list[_Line]:
    """A stretch between stable lines that the patch changed: its changes placed into ours where they map.

    Ours may differ from base here too (the serialiser re-laid out lines near the change); the changes are
    placed through the pairs `_pair` finds, and where one does not map cleanly, the smallest region around
    it that does is taken from theirs.
    """
    pairs = _pair(base, ours_p)
    changes, commas, unchanged = _changes(base, theirs, ours_p, pairs, filler)
    kept = _as_ours(ours, base, pairs)
    for i, comma in commas:
        if (n := _ours_end_of(i, pairs, base, filler)) is not None:
            text, ref, kind = kept[n]
            body = text.rstrip().removesuffix(",") + ("," if comma else "")
            kept[n] = (body + text[len(text.rstrip()):], ref, kind)
    out: list[_Line] = []
    at = 0
    for start, end, j1, j2 in _place(changes, pairs, unchanged, base, ours_p, theirs, filler):
        new: list[_Line] = [(text + newline, _indent(text), "serialiser") for _, text in theirs[j1:j2]]
        replaced: list[_Line] = [(text, ref, "context") for text, ref, _ in kept[start:end]]
        out += kept[at:start] + _interleave(replaced, new)
        at = end
    return out + kept[at:]


def _changes(base: list[_Placed], theirs: list[_Placed], ours: list[_Placed], pairs: dict[int, int],
             filler: re.Pattern[str]) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, bool]],
                                               dict[int, int]]:
    """The changes base -> theirs as (i1, i2, j1, j2); the lines that only gain or lose a trailing comma,
    as (line of base, has a comma now); and line of base -> line of theirs for the lines that stay."""
    opcodes = difflib.SequenceMatcher(None, base, theirs, autojunk=False).get_opcodes()
    unchanged = {i1 + k: j1 + k for tag, i1, i2, j1, _ in opcodes if tag == "equal" for k in range(i2 - i1)}
    changes: list[tuple[int, int, int, int]] = []
    commas: list[tuple[int, bool]] = []
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            continue
        if tag != "insert":
            # ruamel.yaml keeps the comments and blank lines below a value with the value, so deleting or
            # replacing it would take along the comment that introduces the next key: keep those lines.
            while i2 > i1 and filler.fullmatch(base[i2 - 1][1]):
                i2 -= 1
        if j1 < j2:
            # New lines under a key the serialiser writes otherwise than the file ("key: ~" as "key:"):
            # the key's line changes too, or the file's "~" would stay above the new block.
            k = i1 - 1
            while k >= 0 and filler.fullmatch(base[k][1]):  # comments between the key and its block
                k -= 1
            parent = base[k][1] if k >= 0 else ""
            if (k in pairs and (not changes or changes[-1][1] <= k) and ours[pairs[k]][1] != parent
                    and re.sub(r"\s+#.*", "", parent).endswith(":")
                    and _level(theirs[j1][1]) > _level(parent)):
                i1, j1 = k, j1 - (i1 - k)
        # JSON: a line that only gains or loses its comma (a neighbour was added or removed after it) is
        # split off the change, so that ours' line stays and only its comma changes.
        bare_b, bare_t = ([(path, text.rstrip().removesuffix(",")) for path, text in lines]
                          for lines in (base[i1:i2], theirs[j1:j2]))
        part = [i1, i1, j1, j1]
        matcher = difflib.SequenceMatcher(None, bare_b, bare_t, autojunk=False)
        for sub, a1, a2, b1, b2 in matcher.get_opcodes():
            if sub != "equal":
                part[1], part[3] = i1 + a2, j1 + b2
                continue
            for b, t in zip(range(i1 + a1, i1 + a2), range(j1 + b1, j1 + b2), strict=True):
                if base[b][1] == theirs[t][1]:
                    part[1], part[3] = b + 1, t + 1
                    continue
                if part[0] < part[1] or part[2] < part[3]:
                    changes.append((part[0], part[1], part[2], part[3]))
                commas.append((b, theirs[t][1].rstrip().endswith(",")))
                unchanged[b] = t
                part = [b + 1, b + 1, t + 1, t + 1]
        if part[0] < part[1] or part[2] < part[3]:
            changes.append((part[0], part[1], part[2], part[3]))
    return changes, commas, unchanged


def _ours_end_of(i: int, pairs: dict[int, int], base: list[_Placed], filler: re.Pattern[str]) -> int | None:
    """The line of ours where base's line i ends: its pair, or for the line that closes a block ours writes
    on fewer lines, the last line of ours that pairs with a line of the block."""
    if i in pairs:
        return pairs[i]
    level = _level(base[i][1])
    for k in range(i - 1, -1, -1):
        if not filler.fullmatch(base[k][1]) and _level(base[k][1]) <= level:
            paired = [pairs[n] for n in range(k, i) if n in pairs]
            return max(paired) if paired else None
    return None


def _interleave(replaced: list[_Line], new: list[_Line]) -> list[_Line]:
    """The new lines with the lines they replace just before them, matched by key where they share one.

    The replaced lines are not written, but they tell _reindent how the file indents each place.
    """
    keys_old, keys_new = ([_key_of(text) for text, _, _ in lines] for lines in (replaced, new))
    out: list[_Line] = []
    matcher = difflib.SequenceMatcher(None, keys_old, keys_new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for old_line, new_line in zip(replaced[i1:i2], new[j1:j2], strict=True):
                out += [old_line, new_line]
        elif new[j1:j2] and replaced[i1:i2] and (new[j1][1] or 0) > (replaced[i1][1] or 0):
            out += new[j1:j2] + replaced[i1:i2]  # deeper new lines close the block above the replaced ones
        else:
            out += replaced[i1:i2] + new[j1:j2]
    return out


def _place(changes: list[tuple[int, int, int, int]], pairs: dict[int, int], unchanged: dict[int, int],
           base: list[_Placed], ours: list[_Placed], theirs: list[_Placed],
           filler: re.Pattern[str]) -> list[tuple[int, int, int, int]]:
    """For each change, (start, end) of the lines of ours it replaces and (j1, j2) of the lines of theirs
    that replace them.

    A change is bounded by lines the patch leaves alone that pair with lines of ours. A line of ours that
    differs from its line of base (ours writes "a": [1, 2] on one line where base has four) can bound a
    change that it does not hold; above a change, together with the lines base nests under it.
    """
    paired_ours = set(pairs.values())
    solid = [n for n, (_, text) in enumerate(base) if not filler.fullmatch(text)]
    head_of: dict[int, int] = {}  # last line of a block in base -> the line that opens it
    for i, h in enumerate(solid):
        n = i + 1
        while n < len(solid) and _level(base[solid[n]][1]) > _level(base[h][1]):
            n += 1
        if n > i + 1:
            closes = n < len(solid) and _level(base[solid[n]][1]) == _level(base[h][1]) \
                and base[solid[n]][1].strip()[:1] in ("]", "}")
            head_of[solid[n] if closes else solid[n - 1]] = h
    heads = set(head_of.values())

    def keeps(k: int, inside: list[tuple[str, ...]]) -> bool:
        """Whether line k of base can stay as ours has it while the lines with paths INSIDE change."""
        if k not in pairs or k not in unchanged:
            return False
        path, text = base[k]
        own = (*path, _key_of(text) or "")
        return ours[pairs[k]][1] == text or not any(p[:len(own)] == own for p in inside)

    def above(i: int, inside: list[tuple[str, ...]]) -> tuple[int, int] | None:
        """(start in ours, start in theirs) for a change that begins at line i of base."""
        if i == 0:
            return 0, 0
        k = i - 1
        if keeps(k, inside) and (k not in heads or ours[pairs[k]][1] == base[k][1]):
            return pairs[k] + 1, unchanged[k] + 1
        h = head_of.get(k)  # k closes a block: the change can follow ours' version of the whole block
        if h is not None and keeps(h, inside) and all(n in unchanged for n in range(h, k + 1)):
            return max(pairs[n] for n in range(h, k + 1) if n in pairs) + 1, unchanged[k] + 1
        return None

    def below(i: int, inside: list[tuple[str, ...]]) -> tuple[int, int] | None:
        """(end in ours, end in theirs) for a change that ends before line i of base."""
        if i == len(base):
            return len(ours), len(theirs)
        return (pairs[i], unchanged[i]) if keeps(i, inside) else None

    edits: list[tuple[int, int, int, int, int, int]] = []  # (i1, i2) of base, (start, end), (j1, j2)
    for i1, i2, j1, j2 in changes:
        inside = [path for path, _ in base[i1:i2] + theirs[j1:j2]]
        top, bottom = above(i1, inside), below(i2, inside)
        if i1 < i2 and all(i in pairs for i in range(i1, i2)) and pairs[i2 - 1] - pairs[i1] == i2 - 1 - i1:
            start, end = pairs[i1], pairs[i2 - 1] + 1
            # ours may continue the last line on deeper lines base lacks (a flow list over three lines)
            deeper = _indent(ours[end - 1][1])
            while (end < len(ours) and end not in paired_ours and not filler.fullmatch(ours[end][1])
                   and _indent(ours[end][1]) > deeper):
                end += 1
        elif i1 == i2 and (top or bottom):
            start = end = top[0] if top else bottom[0]
        elif i1 < i2 and top and bottom:
            start, end = top[0], bottom[0]  # the change fills the gap between two lines that stay
        else:  # widen the change to the nearest lines that can bound it
            while (top := above(i1, inside)) is None:
                i1 -= 1
            while (bottom := below(i2, inside)) is None:
                i2 += 1
            (start, j1), (end, j2) = top, bottom
        edit = (i1, i2, start, end, j1, j2)
        while edits and (edit[0] < edits[-1][1] or edit[2] < edits[-1][3] or edit[4] < edits[-1][5]):
            # overlapping edits become one
            last = edits.pop()
            edit = (min(last[0], edit[0]), max(last[1], edit[1]), min(last[2], edit[2]),
                    max(last[3], edit[3]), min(last[4], edit[4]), max(last[5], edit[5]))
        edits.append(edit)
    return [edit[2:] for edit in edits]


def _reindent(lines: list[_Line], filler: re.Pattern[str]) -> list[str]:
    """The texts of LINES, with the serialiser's lines moved to the indentation of the file's lines around.

    A file may indent one block by 3 and another by 2, or put one list's dashes under its key and indent
    another's, while the serialiser lays out all alike. A line from the serialiser takes the indent of the
    file's sibling line above it, else below it, else keeps its offset from its parent.
    """
    def level(k: int) -> tuple[int, bool] | None:
        text, ref, _ = lines[k]
        if ref is None or filler.fullmatch(text.rstrip("\r\n")):
            return None
        return ref, _level(text)[1]

    def sibling_below(k: int, at: tuple[int, bool]) -> int | None:
        for n in range(k + 1, len(lines)):
            below = level(n)
            if below is not None and below < at:
                return None  # the block ended
            if below == at and lines[n][2] != "serialiser":
                return _indent(lines[n][0])
        return None

    stack: list[tuple[tuple[int, bool], int]] = []  # (level in the serialiser's layout, indent in the file)
    out = []
    for k, (text, ref, kind) in enumerate(lines):
        at = level(k)
        if at is not None:
            while stack and stack[-1][0] > at:
                stack.pop()
            indent = _indent(text)
            if kind == "serialiser" and ref is not None:
                if stack and stack[-1][0] == at:
                    indent = stack[-1][1]
                elif (below := sibling_below(k, at)) is not None:
                    indent = below
                elif stack:
                    indent = stack[-1][1] + ref - stack[-1][0][0]
                if indent != ref:
                    text = " " * indent + text.lstrip(" ")
            if stack and stack[-1][0] == at:
                stack.pop()
            stack.append((at, indent))
        if kind != "context":
            out.append(text)
    return out


def _final_newline_as(original: str, text: str) -> str:
    """TEXT without its final line ending if ORIGINAL has none."""
    return re.sub(r"(?:\r\n|\n|\r)\Z", "", text) if original and not _ends_with_newline(original) else text


def _in_style_of(original: str, serialised: str) -> str:
    """Serialiser output (\\n line endings) with ORIGINAL's line ending and final-newline habit."""
    return _final_newline_as(original, serialised.replace("\n", _newline_of(original)))


def _merged(original: str, base: str, theirs: str, filler: re.Pattern[str]) -> Iterator[str]:
    """The candidate texts, best first: the merge, the merge that treats no line as filler (a "comment"
    may have been text in a YAML block scalar), and the serialiser's output itself."""
    for no_data in (filler, _NOTHING):
        try:
            yield _merge_lines(original, base, theirs, no_data)
        except (IndexError, KeyError, ValueError):  # the merge is a best effort; the next candidate is safe
            pass
    yield _in_style_of(original, theirs)


def _first_reading_back(candidates: Iterable[str], reads_back: Callable[[str], bool], bom: str,
                        what: str, hint: str = "") -> str:
    for candidate in candidates:
        if reads_back(candidate):
            return bom + candidate
    raise ToolkitError(f"the patched {what} does not read back as the patched data, so the file was not "
                       f"changed{hint}")
