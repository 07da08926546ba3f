"""The `locks` command: the sessions on DB_NAME waiting for a lock and who blocks them, now; or one ended."""

from __future__ import annotations

from common.cli import Context, Result
from common.errors import UsageError
from common.text import table
from database.context import DbContext
from database.sessions import blocking_report, terminate


def locks_command(ctx: Context) -> Result:
    """locks [--terminate PID]: blocked sessions and who blocks them, now."""
    db = DbContext.from_settings(ctx.settings)
    conn = db.server.connect(autocommit=True)
    try:
        if ctx.args.terminate is not None:
            if ctx.dry_run:
                return Result({"dry_run": True, "terminate": ctx.args.terminate},
                              [f"would end session {ctx.args.terminate}"], report=True)
            ctx.confirm(f"End session {ctx.args.terminate} on {db.server.name}?")
            if not terminate(conn, ctx.args.terminate):
                raise UsageError(f"no session with pid {ctx.args.terminate}")
            return Result({"terminated": ctx.args.terminate}, [f"ended session {ctx.args.terminate}"])
        sessions = blocking_report(conn, db.server.name)
    finally:
        conn.close()
    rows = [(str(s["pid"]), str(s["user"]), str(s["application"] or ""), str(s["state"] or ""),
             str(s["since"] or ""), ",".join(map(str, s["blocked_by"])) or "-", (s["query"] or "")[:60])
            for s in sessions]
    lines = (table(("PID", "USER", "APPLICATION", "STATE", "SINCE", "BLOCKED BY", "QUERY"), rows) if rows
             else [f"no blocked sessions on {db.server.name}"])
    return Result({"sessions": sessions}, lines, report=True)
