"""What `migrate --sql` and `rollback --sql` print: the SQL the toolkit would run, its bookkeeping included,
as a script for `psql -v ON_ERROR_STOP=1 -f`: transactional parts between BEGIN and COMMIT, each
no-transaction file on its own with its row marked dirty until it has run."""

from __future__ import annotations

from common.components import DATABASE
from database.migration_rollback import RollbackPlan, batches
from database.migrations import (
    ADD_DIRTY_COLUMN,
    CREATE_TRACKING_TABLE,
    DELETE_ROW,
    INSERT_ROW,
    SET_DIRTY,
    Applied,
    Migration,
    current_id,
    display_id,
)
from database.sessions import LOCK_KEY
from database.sql import quote_literal, read_sql, refuse_transaction_control, terminated


def migrate_script(dbname: str, migrations: list[Migration], rows: list[Applied], todo: list[Migration],
                   lock_timeout: int) -> str:
    """The script that applies `todo` to `dbname`, whose tracking rows are `rows`, as migrate would."""
    current = display_id(current_id(rows), migrations) or "no migration"
    if not todo:
        return f"-- nothing to apply: {dbname} is at {current}\n"
    lines = _preamble(f"{dbname}: migrate from {current} to {todo[-1].id}", rows, lock_timeout)
    for migration in todo:
        text = read_sql(migration.up)
        values = tuple(_literal(v) for v in (migration.version, migration.name, migration.up_sha256, None))
        if migration.up_no_transaction:
            lines += [f"-- {migration.up.name}, outside any transaction: its row is marked dirty until it has run",
                      _insert(*values, "true"), terminated(text).rstrip("\n"),
                      SET_DIRTY % ("false", migration.version) + ";"]
        else:
            refuse_transaction_control(migration.up, text)
            lines += [f"-- {migration.up.name}", "BEGIN;", terminated(text).rstrip("\n"), _insert(*values, "false"),
                      "COMMIT;"]
        lines.append("")
    return "\n".join(lines + _ending())


def rollback_script(dbname: str, rows: list[Applied], plan: RollbackPlan, lock_timeout: int) -> str:
    """The script that runs `plan` on `dbname`, whose tracking rows are `rows`, as rollback would."""
    if not plan.steps:
        return f"-- {plan.render()}\n"
    lines = _preamble(f"{dbname}: roll back from {plan.current_id} to {plan.target_label}", rows, lock_timeout)
    for part in batches(plan.steps):
        if part[0].no_transaction:
            step = part[0]
            lines += [f"-- {step.file.name}, outside any transaction: its row is marked dirty until it has run",
                      SET_DIRTY % ("true", step.version) + ";", terminated(step.sql).rstrip("\n"),
                      DELETE_ROW % step.version + ";", ""]
            continue
        lines.append("BEGIN;")
        for step in part:
            lines += [f"-- {step.file.name}", terminated(step.sql).rstrip("\n"), DELETE_ROW % step.version + ";"]
        lines += ["COMMIT;", ""]
    return "\n".join(lines + _ending())


def _preamble(what: str, rows: list[Applied], lock_timeout: int) -> list[str]:
    """Stop on the first error; take the migration lock; make the tracking table ready (as migrate does under
    the lock); and check that the applied migrations are still those the script was made for."""
    versions = "{" + ",".join(str(row.version) for row in rows) + "}"
    return [
        f"-- {what}: the SQL {DATABASE.script} would run",
        "-- run it with psql -v ON_ERROR_STOP=1 -f FILE; it stops before any migration runs if the applied",
        "-- migrations are not those it was made for",
        "\\set ON_ERROR_STOP on",
        f"SET lock_timeout = '{int(lock_timeout)}s';",
        "DO $$BEGIN",
        f"  IF NOT pg_try_advisory_lock({LOCK_KEY})",
        "  THEN RAISE EXCEPTION 'another migrate or rollback is running on this database';",
        "  END IF;",
        "END$$;",
        CREATE_TRACKING_TABLE.strip() + ";",
        # As migrate does: the ALTER (and its exclusive lock) only when the column is missing.
        "DO $$BEGIN",
        "  IF NOT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = 'public'",
        "                 AND table_name = 'schema_migrations' AND column_name = 'dirty')",
        f"  THEN {ADD_DIRTY_COLUMN};",
        "  END IF;",
        "END$$;",
        "DO $$BEGIN",
        "  IF (SELECT coalesce(array_agg(version ORDER BY version), '{}') FROM public.schema_migrations)",
        f"       IS DISTINCT FROM '{versions}'::bigint[] OR EXISTS (SELECT FROM public.schema_migrations WHERE dirty)",
        "  THEN RAISE EXCEPTION 'the applied migrations are not those this script was made for: make it again';",
        "  END IF;",
        "END$$;",
        "",
    ]


def _ending() -> list[str]:
    return [f"DO $$BEGIN PERFORM pg_advisory_unlock({LOCK_KEY}); END$$;", ""]


def _insert(version: str, name: str, sha256: str, duration_ms: str, dirty: str) -> str:
    return INSERT_ROW % (version, name, sha256, duration_ms, dirty) + ";"


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    return str(value) if isinstance(value, int) else quote_literal(str(value))
