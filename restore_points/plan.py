"""A restore point's restore before its first change: which parts, in what order, each one here and whole,
and what a dry run shows."""

from __future__ import annotations

from backup_store.manifest import MANIFEST, Backup, check_backup, load_backup
from backup_store.point_record import PointRecord, describe
from backup_store.store import BACKUP_ID
from common.cli import Context, Result
from common.components import BY_NAME, DATABASE, PARTS, Component
from common.errors import ToolkitError, UsageError
from common.settings import Settings
from offsite.pull import open_store
from restore_points.command_setup import runner_for
from restore_points.database_plan import DatabasePlan


def wanted_components(only: str | None) -> set[str]:
    """The names --only asks for (all three without it); an unknown name is bad usage."""
    if not only:
        return set(BY_NAME)
    names = {name.strip() for name in only.split(",") if name.strip()}
    unknown = names - set(BY_NAME)
    if unknown:
        raise UsageError(f"--only: unknown component {', '.join(sorted(unknown))}; use config, code, db")
    return names


def restore_plan(point: Backup, wanted: set[str]) -> list[Component]:
    """The wanted parts the point holds, in the runbook's order; none is bad usage."""
    parts = PointRecord.load(point).parts
    plan = [c for c in PARTS if c.name in parts and c.name in wanted]
    if not plan:
        raise UsageError(f"restore point {point.id} holds none of {', '.join(sorted(wanted))}")
    return plan


def absent_parts(point: Backup, wanted: set[str]) -> list[str]:
    """A note for each wanted part the point does not hold."""
    parts = PointRecord.load(point).parts
    return [f"not in this restore point: {c.title}" for c in PARTS if c.name in wanted and c.name not in parts]


def restore_order(point: Backup, plan: list[Component]) -> str:
    """The plan for people: each part's backup, in the order they are restored."""
    parts = PointRecord.load(point).parts
    return " -> ".join(f"{c.title} {parts[c.name]}" for c in plan)


def check_parts(settings: Settings, point: Backup, plan: list[Component]) -> None:
    """Refuse the point unless every part's backup is here (a part found only off-host, with REMOTE_URL set,
    is pulled now) and whole: its manifest sound and every checksum holding. Nothing has changed yet."""
    parts, missing, damaged = PointRecord.load(point).parts, [], []
    for component in plan:
        store = open_store(settings, component)
        backup_id = parts[component.name]
        if not isinstance(backup_id, str) or not BACKUP_ID.fullmatch(backup_id):
            raise ToolkitError(f"restore point {point.id} names {backup_id!r} as its {component.title} backup, "
                               "which is not a backup id: refused, nothing changed")
        here = (store.root / backup_id / MANIFEST).is_file()
        if not here and not (store.fetch is not None and store.fetch(backup_id)):
            missing.append(f"the {component.title} backup {backup_id} is no longer in {store.root}"
                           + (" nor on the remote" if store.fetch is not None else ""))
            continue
        try:
            problems = check_backup(load_backup(store.root / backup_id))
        except ToolkitError as exc:
            problems = [str(exc)]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            damaged.append(f"the {component.title} backup {backup_id} is damaged: {problems[0]}{more}")
    if missing:
        raise UsageError(f"restore point {point.id} cannot be restored: {'; '.join(missing + damaged)}; "
                         "nothing changed")
    if damaged:
        raise ToolkitError(f"restore point {point.id} cannot be restored: {'; '.join(damaged)}; nothing changed")


def step_arguments(point: Backup, plan: list[Component], database: DatabasePlan | None) -> dict[str, list[str]]:
    """Each part's script arguments: `restore BACKUP`, or what the database plan chose."""
    parts = PointRecord.load(point).parts
    chosen = {component.name: ["restore", parts[component.name]] for component in plan}
    if database:
        chosen[DATABASE.name] = database.step_args()
    return chosen


def preview(ctx: Context, point: Backup, plan: list[Component], order: str, absent: list[str],
            database: DatabasePlan | None) -> Result:
    """restore --dry-run: the order, the database's way back and why, and what each step's own --dry-run
    says it would change."""
    runner, parts = runner_for(ctx), PointRecord.load(point).parts
    steps, lines, exit_code = [], [f"would restore, in this order: {order}"], 0
    lines += database.lines() if database else []
    chosen = step_arguments(point, plan, database)
    for component in plan:
        args = chosen[component.name]
        code, said = runner.preview(component, *args)
        steps.append({"component": component.name, "backup": parts[component.name], "args": args,
                      "exit_code": code, "would": said})
        lines.append(f"{component.title} ({parts[component.name]}):")
        lines += [f"  {line}" for line in said]
        exit_code = exit_code or code
    return Result({"dry_run": True, "point": describe(point), "plan": [c.name for c in plan], "steps": steps,
                   "database_plan": database.to_dict() if database else None},
                  lines + absent, exit_code=exit_code, report=True)
