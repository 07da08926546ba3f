"""The health check as a run of rollback.py asks for it: URL and thresholds from its flags, else the settings,
and the database's sessions when a database is configured."""

from __future__ import annotations

from common.cli import Context
from common.components import DATABASE
from database.server import DbServer
from restore_points.health import HealthReport, Thresholds, run_health


def thresholds_for(ctx: Context) -> Thresholds:
    """The thresholds: each flag given, else its HEALTH_* setting, else the runbook's."""
    args = ctx.args
    return Thresholds.from_settings(ctx.settings, max_error_rate_percent=args.max_error_rate,
                                    max_p95_ms=args.max_p95_ms, max_cpu_percent=args.max_cpu,
                                    max_memory_percent=args.max_memory, requests=args.health_requests)


def health_url(ctx: Context) -> str | None:
    """--health-url, else HEALTHCHECK_URL; None: no HTTP check."""
    return ctx.args.health_url or ctx.settings.text("HEALTHCHECK_URL")


def check_health(ctx: Context, thresholds: Thresholds, url: str | None) -> HealthReport:
    """HTTP (when a URL is given), this host's CPU and memory (unless --no-system-check), the database's sessions."""
    server = DbServer.from_settings(ctx.settings) if DATABASE.configured(ctx.settings) else None
    return run_health(thresholds, url=url, server=server, system=not ctx.args.no_system_check)
