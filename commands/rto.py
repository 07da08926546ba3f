"""Recovery time objectives: how long a restore or rollback of each component may take, and whether it did.

The runbook's objectives are the defaults: configuration 5 minutes, code 15, database 30. Each can be set
in seconds (fractions allowed) with RTO_CONFIG_SECONDS, RTO_CODE_SECONDS and RTO_DATABASE_SECONDS.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.components import BY_NAME
from common.settings import Settings


def rto_for(settings: Settings, component: str) -> float:
    """The objective in seconds of component `component` (config, code, db); a malformed or negative setting is
    a SettingError."""
    found = BY_NAME.get(component)
    if found is None or found.rto_setting is None or found.rto_default is None:
        raise ValueError(f"no recovery time objective for component {component!r}")
    return settings.number(found.rto_setting, found.rto_default, minimum=0)


@dataclass
class RtoReport:
    """How long one restore or rollback took against its component's objective."""

    component: str
    operation: str
    seconds: float
    objective: float

    @property
    def met(self) -> bool:
        """Whether the operation finished within its objective."""
        return self.seconds <= self.objective

    def to_json(self) -> dict:
        """The form --json output carries under `rto`."""
        return {
            "component": self.component,
            "operation": self.operation,
            "seconds": round(self.seconds, 3),
            "objective": self.objective,
            "met": self.met,
        }

    def line(self) -> str:
        """One line for people, e.g. `restore took 2.4 s of its 300 s RTO (config)`."""
        if self.met:
            return f"{self.operation} took {self.seconds:.1f} s of its {self.objective:g} s RTO ({self.component})"
        return f"{self.operation} took {self.seconds:.1f} s: OVER its {self.objective:g} s RTO ({self.component})"
