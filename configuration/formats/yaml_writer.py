"""Writing YAML that means what the JSON patch meant to every reader, YAML 1.1 (PyYAML...) and 1.2 alike.

YAML 1.1 reads the plain scalars yes, no, on, off, y, n as booleans, 12:30 as the number 750 and 010 as 8,
and reads 1e+300 (no dot) as a string; YAML 1.2 reads 1e3 and 0o10 as numbers. ruamel.yaml writes for 1.2
only. Here a string is quoted when any version would read its plain form as something else, and a float
always has a dot before its exponent, so that both versions read a number.
"""

from __future__ import annotations

import functools
import math
from typing import Any


def yaml_writer() -> Any:
    """A round-trip ruamel.yaml YAML for dumping (not loading): unambiguous to YAML 1.1 and 1.2 readers."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.width = 1 << 30  # never fold long lines
    yaml.Resolver, yaml.Representer = _writer_classes()
    return yaml


@functools.cache
def _writer_classes() -> tuple[type, type]:
    from ruamel.yaml.representer import RoundTripRepresenter
    from ruamel.yaml.resolver import VersionedResolver, implicit_resolvers

    every_version: dict[str, list[tuple[str, Any]]] = {}
    for _versions, tag, regexp, first in implicit_resolvers:
        for char in first:
            every_version.setdefault(char, []).append((tag, regexp))

    class EveryVersionResolver(VersionedResolver):
        """Resolves a plain scalar as YAML 1.1 and 1.2 both would: the writer quotes a string that either
        version would read as something else."""

        @property
        def versioned_resolver(self) -> dict[str, list[tuple[str, Any]]]:
            return every_version

    class BothVersionsRepresenter(RoundTripRepresenter):
        """Writes a float with a dot before its exponent: 1.0e+300, which YAML 1.1 reads as a number too."""

        def represent_float(self, data: float) -> Any:
            if not math.isfinite(data):  # only from the file itself (.inf): JSON has no such number
                return super().represent_float(data)
            text = repr(data).lower()
            if "." not in text and "e" in text:
                text = text.replace("e", ".0e", 1)
            return self.represent_scalar("tag:yaml.org,2002:float", text)

    BothVersionsRepresenter.add_representer(float, BothVersionsRepresenter.represent_float)
    return EveryVersionResolver, BothVersionsRepresenter
