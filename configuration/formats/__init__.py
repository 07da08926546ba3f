"""Configuration file formats: merge-patch YAML, JSON and .env files in place, and check that files parse.

The promise of `patch_text` is that every line a patch does not touch stays byte for byte. Round-trip
serialisers normalise some layout (spacing inside flow collections, comment columns, indentation that
differs from the rest of the file), so the serialiser's output is not written as is: its line changes are
merged into the original text (see `linemerge`), and the result is parsed again before it is accepted.

Modules: `kinds` (which file is which), `merge_patch` (RFC 7386), `documents` (`patch_text`, YAML and JSON),
`envfile` (.env), `linemerge` (the three-way line merge), `checks` (parse checks), `masking` (masked diffs),
`text` (line endings). Importing the package stays cheap: ruamel.yaml and python-dotenv load on first use.
"""

from __future__ import annotations

from .checks import ParseProblem, check_file
from .documents import patch_text
from .envfile import env_keys
from .kinds import EDITABLE, FORMATS, editable_format, file_format
from .masking import MASK, masked_diff
from .merge_patch import apply_merge_patch, parse_merge_patch

__all__ = [
    "EDITABLE",
    "FORMATS",
    "MASK",
    "ParseProblem",
    "apply_merge_patch",
    "check_file",
    "editable_format",
    "env_keys",
    "file_format",
    "masked_diff",
    "parse_merge_patch",
    "patch_text",
]
