"""Which backups a cleanup keeps, and why: one model for every store, local or remote, and restore points.

Regular backups (taken with `backup`) stay while any rule of the policy keeps them: younger than DAYS, one
of the newest N, or the newest of one of the last D days, W weeks, M months or Y years that have a backup
(restic's and borg's `--keep-*`; days, weeks (ISO) and months in UTC, as every time the toolkit shows).
Safety backups (what a restore, update, migrate or rollback replaced) are a class of their own: kept for
SAFETY_KEEP_DAYS, and those taken since the newest regular backup always (they undo what was done since);
they are never counted among the regular backups' rules, so they never push one out. Whatever the rules
say, the newest regular backup stays, and so does every backup held: pinned, named by a restore point, or
what the live tree was restored from.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from backup_store.manifest import Backup, format_time
from common.errors import UsageError
from common.settings import Settings

DEFAULT_KEEP = 3  # --keep's default beside DAYS
DEFAULT_SAFETY_KEEP_DAYS = 7
# The calendar rules: name, and the period a backup's time falls in.
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "daily": lambda when: (when.year, when.month, when.day),
    "weekly": lambda when: tuple(when.isocalendar()[:2]),
    "monthly": lambda when: (when.year, when.month),
    "yearly": lambda when: (when.year,),
}
_SHOWN = {"daily": "day {0:04d}-{1:02d}-{2:02d}", "weekly": "week {0:04d}-W{1:02d}", "monthly": "month {0:04d}-{1:02d}",
          "yearly": "year {0:04d}"}


@dataclass(frozen=True)
class RetentionPolicy:
    """What a cleanup keeps of the regular backups; safety backups stay `safety_days`."""

    days: int | None = None  # every regular backup younger than this stays
    last: int = 0  # the newest N regular backups (--keep N, --keep-last N, last=N)
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    safety_days: int = DEFAULT_SAFETY_KEEP_DAYS

    @classmethod
    def parse(cls, text: str, safety_days: int = DEFAULT_SAFETY_KEEP_DAYS) -> RetentionPolicy:
        """A RETENTION setting: `last=5,daily=7,weekly=4,monthly=12` (any of last, days, daily, weekly, monthly,
        yearly; whole numbers of 0 or more)."""
        counts: dict[str, int] = {}
        for part in text.replace(" ", "").split(","):
            name, sep, value = part.partition("=")
            if not sep or name not in ("last", "days", *PERIODS) or not value.isdigit() or name in counts:
                raise UsageError(f"RETENTION={text!r}: expected a list such as last=5,daily=7,weekly=4,monthly=12 "
                                 "(names: last, days, daily, weekly, monthly, yearly)")
            counts[name] = int(value)
        return cls(**counts, safety_days=safety_days).checked()

    @classmethod
    def from_command(cls, args: argparse.Namespace, settings: Settings) -> RetentionPolicy:
        """The policy a `cleanup` command line gives: DAYS and --keep N as ever, the --keep-* rules, or else the
        RETENTION setting. Safety backups stay SAFETY_KEEP_DAYS; unset, 7 days or DAYS if longer (so that
        `cleanup 30` keeps them 30 days, as it always has)."""
        given = {name: getattr(args, f"keep_{name}", None) for name in ("last", *PERIODS)}
        longest = max(DEFAULT_SAFETY_KEEP_DAYS, args.days or 0)
        safety_days = settings.integer("SAFETY_KEEP_DAYS", longest, minimum=0)
        counts = {name: value or 0 for name, value in given.items()}
        if args.days is None and args.keep is None and all(value is None for value in given.values()):
            text = settings.text("RETENTION")
            if not text:
                raise UsageError("cleanup needs DAYS, a --keep-* rule or the RETENTION setting "
                                 "(e.g. RETENTION=last=5,daily=7,weekly=4,monthly=12)")
            return cls.parse(text, safety_days)
        if args.keep is not None:
            if args.keep < 1:
                raise UsageError("--keep must be at least 1: the newest backup is never removed")
            counts["last"] = max(counts["last"], args.keep)
        elif args.days is not None and not counts["last"]:
            counts["last"] = DEFAULT_KEEP
        return cls(days=args.days, **counts, safety_days=safety_days).checked()

    @property
    def kept_days(self) -> int:
        """How long the things a cleanup finds beside the backups (replaced trees, kept databases) stay: DAYS, or
        SAFETY_KEEP_DAYS under calendar rules."""
        return self.days if self.days is not None else self.safety_days

    def checked(self) -> RetentionPolicy:
        """This policy, unless a count is negative or it keeps nothing but the newest backup by chance."""
        counts = {"DAYS": self.days or 0, "--keep-last": self.last, "SAFETY_KEEP_DAYS": self.safety_days,
                  **{f"--keep-{name}": getattr(self, name) for name in PERIODS}}
        for name, value in counts.items():
            if value < 0:
                raise UsageError(f"{name} must be 0 or more")
        if self.days is None and not (self.last or any(getattr(self, name) for name in PERIODS)):
            raise UsageError("the retention keeps nothing: give DAYS, or at least one of --keep-last, --keep-daily, "
                             "--keep-weekly, --keep-monthly, --keep-yearly")
        return self

    def describe(self) -> str:
        """The policy in RETENTION's own words."""
        parts = [f"days={self.days}"] if self.days is not None else []
        parts += [f"{name}={getattr(self, name)}" for name in ("last", *PERIODS) if getattr(self, name)]
        return ",".join(parts) + f" (safety backups: {self.safety_days} days)"


@dataclass
class Decision:
    """One backup's fate: whether it stays, and every reason it does (none when it goes)."""

    backup: Backup
    holds: list[str] = field(default_factory=list)  # kept whatever the rules say: pinned, part of a point...
    rules: list[str] = field(default_factory=list)  # the policy's rules that keep it

    @property
    def keep(self) -> bool:
        """Whether any hold or rule keeps it."""
        return bool(self.holds or self.rules)

    @property
    def reasons(self) -> list[str]:
        """Every reason it stays, holds first."""
        return self.holds + self.rules

    def to_json(self) -> dict:
        """What --json shows of the decision."""
        return {"id": self.backup.id, "keep": self.keep, "reasons": self.reasons}


@dataclass
class RetentionPlan:
    """Every backup's decision, newest first."""

    decisions: list[Decision]

    @property
    def remove(self) -> list[Backup]:
        """The backups that go."""
        return [d.backup for d in self.decisions if not d.keep]

    @property
    def keep(self) -> list[Backup]:
        """The backups that stay."""
        return [d.backup for d in self.decisions if d.keep]

    def explained(self, where: str = "") -> list[str]:
        """What a dry run prints: `would remove ID (time)` for each backup that goes (`where` added after the
        id), then `keep ID: reasons` for each that stays."""
        lines = [f"would remove {d.backup.id}{where} ({format_time(d.backup.created_at)}): no rule keeps it"
                 for d in self.decisions if not d.keep]
        return lines + [f"keep {d.backup.id}: {'; '.join(d.reasons)}" for d in self.decisions if d.keep]

    def held_only(self, label: str) -> list[Decision]:
        """The backups no rule keeps that a hold whose reason starts with `label` keeps (a point needs them)."""
        return [d for d in self.decisions if not d.rules and any(r.startswith(label) for r in d.holds)]


def plan_retention(backups: Iterable[Backup], policy: RetentionPolicy, holds: dict[str, list[str]] | None = None,
                   now: datetime | None = None) -> RetentionPlan:
    """Decide, for each backup, whether it stays and why. `holds` maps backup ids to reasons that keep them
    whatever the rules say (a pin, a restore point that names it, the live tree's origin)."""
    now = now or datetime.now(UTC)
    newest_first = sorted(backups, key=lambda backup: (backup.created_at, backup.id), reverse=True)
    decisions = {backup.id: Decision(backup, list((holds or {}).get(backup.id, ()))) for backup in newest_first}
    kept_by = {backup_id: decision.rules.append for backup_id, decision in decisions.items()}
    regular = [backup for backup in newest_first if not backup.is_safety]
    if regular:
        kept_by[regular[0].id]("the newest backup")
    for backup in regular[:policy.last]:
        kept_by[backup.id](f"one of the newest {policy.last}")
    if policy.days is not None:
        cutoff = now - timedelta(days=policy.days)
        for backup in regular:
            if backup.created_at >= cutoff:
                kept_by[backup.id](f"younger than {policy.days} days")
    for name, period in PERIODS.items():
        wanted = getattr(policy, name)
        seen: set[tuple[int, ...]] = set()
        for backup in regular:
            if len(seen) >= wanted:
                break
            key = period(backup.created_at.astimezone(UTC))
            if key not in seen:
                seen.add(key)
                kept_by[backup.id](f"{name}: the newest of {_SHOWN[name].format(*key)}")
    since_regular = newest_first.index(regular[0]) if regular else 1  # with none, the newest safety backup
    safety_cutoff = now - timedelta(days=policy.safety_days)
    for index, backup in enumerate(newest_first):
        if not backup.is_safety:
            continue
        if index < since_regular:
            kept_by[backup.id]("a safety backup taken since the newest backup")
        elif backup.created_at >= safety_cutoff:
            kept_by[backup.id](f"a safety backup younger than {policy.safety_days} days")
    return RetentionPlan([decisions[backup.id] for backup in newest_first])
