"""The database's `cleanup`: old backups, as every store's, and the databases restores and drills left beside
the live one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backup_store.retention import RetentionPolicy
from commands.retention_commands import cleanup_backups
from common.cli import Context, Result
from database.context import SCRIPT, DbContext
from database.scratch import (
    CLAIMED,
    KEPT_ROLES,
    being_built,
    drop_database,
    drop_if_unclaimed,
    scratch_databases,
)
from database.server import MAINTENANCE_DB


def cleanup_command(ctx: Context) -> Result:
    """cleanup DAYS: remove backups older than DAYS, old `__before_` databases beyond the newest --keep, and
    the `__restore_` and `__drill_` databases of runs that did not finish (not those of a run going on now)."""
    db = DbContext.from_settings(ctx.settings)
    # The server first: if it cannot be reached, nothing is removed and the next run tries again.
    policy = RetentionPolicy.from_command(ctx.args, ctx.settings)
    cutoff = datetime.now(UTC) - timedelta(days=policy.kept_days)
    with db.server.session(MAINTENANCE_DB, autocommit=True) as conn, conn.cursor() as cur:
        scratch = scratch_databases(cur, db.server.name)
        building = being_built(cur, [s.name for s in scratch if s.role in CLAIMED])
    kept = sorted((s for s in scratch if s.role in KEPT_ROLES), key=lambda s: s.age_order, reverse=True)
    old = [s.name for s in kept[max(policy.last, 1):] if s.made < cutoff]
    leftovers = [s.name for s in scratch if s.role in CLAIMED and s.name not in building]
    result = cleanup_backups(ctx, db.store, SCRIPT, policy=policy)
    result.lines += [f"kept database {name}: a run going on now is building it" for name in sorted(building)]
    if ctx.dry_run:
        result.data["would_drop_databases"] = old + leftovers
        result.lines += [f"would drop database {name}" for name in old + leftovers]
        return result
    notes: list[str] = []
    with db.store.lock(f"{SCRIPT} cleanup"):
        for name in old:
            notes += drop_database(db.server, name)
        dropped_leftovers = []
        for name in leftovers:
            dropped = drop_if_unclaimed(db.server, name)
            if dropped is not None:
                dropped_leftovers.append(name)
                notes += dropped
    result.data["dropped_databases"] = old + dropped_leftovers
    result.data["subscriptions_dropped"] = notes
    result.lines += [f"dropped database {name} (kept by an earlier restore)" for name in old]
    result.lines += [f"dropped database {name} (left by a restore or drill that did not finish)"
                     for name in dropped_leftovers]
    result.lines += notes
    return result
