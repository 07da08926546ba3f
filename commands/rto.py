"""Recovery time objectives: how long a restore or rollback of each component may take, and whether it did.

The runbook's objectives are the defaults: configuration 5 minutes, code 15, database 30. Each can be set
in seconds (fractions allowed) with RTO_CONFIG_SECONDS, RTO_CODE_SECONDS and RTO_DATABASE_SECONDS.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.settings import Settings

# The store's component name -> (its setting, the runbook's objective in seconds).
OBJECTIVES: dict[str, tuple[str, float]] = {
    "config": ("RTO_CONFIG_SECONDS", 300.0),
    "code": ("RTO_CODE_SECONDS", 900.0),
    "db": ("RTO_DATABASE_SECONDS", 1800.0),
}


def rto_for(settings: Settings, component: str) -> float:
    """The component's recovery time objective in seconds; a malformed or negative setting is a SettingError."""
    try:
        name, default = OBJECTIVES[component]
    except KeyError:
        raise ValueError(f"no recovery time objective for component {component!r}") from None
    return settings.number(name, default, minimum=0)


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
