"""A year of backups with chosen times: plan_retention keeps exactly the set that a small model of restic's and
borg's --keep-* rules gives, whatever the safety backups, and says why each one stays."""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup_store.manifest import Backup
from backup_store.retention import RetentionPolicy, plan_retention
from common.errors import UsageError
from common.settings import Settings

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_numbers = itertools.count()


def made(when: datetime, safety: bool = False) -> Backup:
    backup_id = when.strftime("%Y%m%dT%H%M%S.%f")[:-3] + f"Z-config-host-{next(_numbers):08x}"
    return Backup(Path(backup_id), backup_id, "config", when, None, {}, [], {"kind": "safety" if safety else "backup"})


def a_year(seed: int) -> list[Backup]:
    """Most days one backup at some hour, some days none, some several; about one in seven a safety backup."""
    rng = random.Random(seed)
    backups = []
    for day in range(400):
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            when = NOW - timedelta(days=day, seconds=rng.randrange(86_400))
            backups.append(made(when, safety=rng.random() < 0.15))
    return backups


PERIOD_OF: dict[str, Callable[[datetime], object]] = {
    "daily": lambda when: when.date(),
    "weekly": lambda when: when.isocalendar()[:2],
    "monthly": lambda when: (when.year, when.month),
    "yearly": lambda when: when.year,
}


def model(backups: list[Backup], policy: RetentionPolicy, held: set[str]) -> set[str]:
    """What the rules keep, worked out another way: group by period, take the newest periods, then the newest
    backup in each; safety backups by their own two rules."""
    regular = sorted((b for b in backups if not b.is_safety), key=lambda b: b.created_at, reverse=True)
    keep = set(held) | {b.id for b in regular[:max(policy.last, 1)]}
    for name, period_of in PERIOD_OF.items():
        periods: dict[object, list[Backup]] = {}
        for backup in regular:
            periods.setdefault(period_of(backup.created_at), []).append(backup)
        for period in sorted(periods, reverse=True)[:getattr(policy, name)]:
            keep.add(max(periods[period], key=lambda b: b.created_at).id)
    if policy.days is not None:
        keep |= {b.id for b in regular if NOW - b.created_at <= timedelta(days=policy.days)}
    safety = sorted((b for b in backups if b.is_safety), key=lambda b: b.created_at, reverse=True)
    newest_regular = regular[0].created_at if regular else None
    for index, backup in enumerate(safety):
        since = backup.created_at > newest_regular if newest_regular else index == 0
        if since or NOW - backup.created_at <= timedelta(days=policy.safety_days):
            keep.add(backup.id)
    return keep


POLICIES = [
    RetentionPolicy(daily=7, weekly=4, monthly=12),
    RetentionPolicy(last=5, daily=7, weekly=4, monthly=12, yearly=3),
    RetentionPolicy(daily=30),
    RetentionPolicy(weekly=52, safety_days=0),
    RetentionPolicy(monthly=3, yearly=1, safety_days=30),
    RetentionPolicy(days=10, last=3),
    RetentionPolicy(days=0, last=1, safety_days=0),
    RetentionPolicy(last=400),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda policy: policy.describe())
def test_a_year_of_backups_keeps_exactly_what_the_rules_define(policy: RetentionPolicy):
    for seed in range(3):
        # Besides the year, backups on either side of the DAYS and SAFETY_KEEP_DAYS cut-offs, and on them.
        edges = [made(NOW - timedelta(days=policy.safety_days, minutes=m), safety=True) for m in (-1, 0, 1)]
        edges += [made(NOW - timedelta(days=policy.days, minutes=m)) for m in (-1, 0, 1) if policy.days]
        backups = a_year(seed) + edges
        rng = random.Random(seed)
        held = {b.id for b in rng.sample(backups, 5)}
        plan = plan_retention(backups, policy, {i: ["pinned"] for i in held}, now=NOW)
        assert {b.id for b in plan.keep} == model(backups, policy, held)
        assert {b.id for b in plan.keep} | {b.id for b in plan.remove} == {b.id for b in backups}
        assert all(d.reasons for d in plan.decisions if d.keep) and not any(
            d.reasons for d in plan.decisions if not d.keep)


def test_safety_backups_never_push_a_regular_backup_out():
    for seed in range(3):
        backups = a_year(seed)
        regular = [b for b in backups if not b.is_safety]
        for policy in POLICIES:
            with_safety = {b.id for b in plan_retention(backups, policy, now=NOW).keep if not b.is_safety}
            assert with_safety == {b.id for b in plan_retention(regular, policy, now=NOW).keep}


def test_each_decision_says_which_rule_keeps_it():
    monday, sunday = made(datetime(2026, 11, 30, 9, tzinfo=UTC)), made(datetime(2026, 11, 29, 23, tzinfo=UTC))
    earlier_sunday, old = made(datetime(2026, 11, 29, 8, tzinfo=UTC)), made(datetime(2026, 10, 2, tzinfo=UTC))
    safety = made(datetime(2026, 11, 28, tzinfo=UTC), safety=True)
    plan = plan_retention([monday, sunday, earlier_sunday, old, safety], RetentionPolicy(daily=2, weekly=2), {},
                          now=NOW)
    reasons = {d.backup.id: d.reasons for d in plan.decisions}
    assert reasons[monday.id] == ["the newest backup", "daily: the newest of day 2026-11-30",
                                  "weekly: the newest of week 2026-W49"]
    assert reasons[sunday.id] == ["daily: the newest of day 2026-11-29", "weekly: the newest of week 2026-W48"]
    assert reasons[earlier_sunday.id] == [] and reasons[old.id] == []
    assert reasons[safety.id] == ["a safety backup younger than 7 days"]


def test_retention_setting_and_command_line():
    assert RetentionPolicy.parse("last=5, daily=7,weekly=4,monthly=12") == RetentionPolicy(
        last=5, daily=7, weekly=4, monthly=12)
    for bad in ("daily=7,daily=8", "hourly=3", "daily=-1", "daily", "daily=x", "last=0"):
        with pytest.raises(UsageError):
            RetentionPolicy.parse(bad)

    def policy(*argv: str, **settings: str) -> RetentionPolicy:
        parser = argparse.ArgumentParser()
        parser.add_argument("days", type=int, nargs="?")
        parser.add_argument("--keep", type=int)
        for name in ("last", "daily", "weekly", "monthly", "yearly"):
            parser.add_argument(f"--keep-{name}", type=int)
        return RetentionPolicy.from_command(parser.parse_args(argv), Settings.load(environ=settings))

    assert policy("30") == RetentionPolicy(days=30, last=3, safety_days=30)  # safety backups: DAYS when longer
    assert policy("30", SAFETY_KEEP_DAYS="2") == RetentionPolicy(days=30, last=3, safety_days=2)
    assert policy("0", "--keep", "1") == RetentionPolicy(days=0, last=1)
    assert policy("--keep-daily", "7", SAFETY_KEEP_DAYS="2") == RetentionPolicy(daily=7, safety_days=2)
    assert policy(RETENTION="monthly=6") == RetentionPolicy(monthly=6)
    assert policy("5", RETENTION="monthly=6") == RetentionPolicy(days=5, last=3)  # the command line wins
    with pytest.raises(UsageError, match="needs DAYS"):
        policy()
    with pytest.raises(UsageError, match="keeps nothing"):  # a rule given, even of 0, is the command line's
        policy("--keep-daily", "0", RETENTION="monthly=6")
    with pytest.raises(UsageError, match="--keep must be at least 1"):
        policy("3", "--keep", "0")
