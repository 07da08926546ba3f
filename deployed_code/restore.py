"""restore BACKUP: a release folder gets the backup's tree built aside and switched in; a git working copy gets
its files put back one by one, then HEAD."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

from backup_store.manifest import Backup
from backup_store.store import refuse_damaged, resolve_component
from backup_store.trees import diff_tree, restore_tree, tree_entries
from common.cli import Context, Result
from common.errors import ToolkitError
from deployed_code.backups import SafetyBackupMeanwhile, record_deployed, take_backup
from deployed_code.build import BuildStats, build_tree
from deployed_code.git import head_plan, is_repository, move_head
from deployed_code.layout import build_path, nothing_to_save, switch_and_keep
from deployed_code.paths import SCRIPT, TREE, CodePaths
from deployed_code.release_steps import KeptRelease, ReleaseSteps
from deployed_code.source import CodeSource
from deployed_code.tree import code_excluder, remove_tree


def restore(ctx: Context) -> Result:
    """restore BACKUP: the tree built aside (every checksum checked) while the live one is saved, then switched in;
    a kept release that is the backup's tree is checked and switched in as it is."""
    paths = CodePaths.from_settings(ctx.settings)
    if paths.in_place:
        return _restore_in_place(ctx, paths)
    live = paths.deployment
    steps = ReleaseSteps.from_settings(ctx, paths)  # hooks and shared files checked before anything changes
    with paths.store.lock(f"{SCRIPT} restore"):
        # Its entries are read when first needed: a switch to a kept release never needs them.
        backup = resolve_component(paths.store, ctx.args.backup, lazy=True)
        skipped = safety_skipped(ctx, live)
        kept = steps.kept_for_backup(backup, dry_run=ctx.dry_run)
        if ctx.dry_run:
            return _dry_run(paths, backup, kept, skipped)
        if ctx.confirm(f"Replace the code in {live} with backup {backup.id}?"):
            kept = steps.recheck(kept)
        if kept is not None and kept.ok:
            result = steps.switch_to_kept(ctx, kept, f"before restore of {backup.id}", skipped, backup, None)[0]
            result.data["backup"] = backup.summary()
            result.lines.insert(0, f"restored {backup.id} into {live} (a kept release)")
            return result
        return _build_and_switch(ctx, paths, steps, backup, kept, skipped)


def _build_and_switch(ctx: Context, paths: CodePaths, steps: ReleaseSteps, backup: Backup, kept: KeptRelease | None,
                      skipped: str | None) -> Result:
    """The backup's tree built aside, shared paths linked and BUILD_HOOK run, while the live tree is saved on
    another thread; then the switch, and what follows it (caller holds the lock)."""
    live = paths.deployment
    # Built beside the live tree (or in its releases folder), so the switch is a rename on one filesystem.
    # The build checks every file's size and sha256 as it copies: a damaged backup stops here, before
    # anything live changes, with no separate checksum pass (and a release's manifest takes them from it).
    target = build_path(live)
    started = time.perf_counter()
    safety = None if skipped else SafetyBackupMeanwhile(paths, f"before restore of {backup.id}", steps.snapshot_base())
    built = BuildStats()
    known = {rel: entry.sha256 for rel, entry in tree_entries(backup, TREE).items() if entry.sha256}
    try:
        with safety or nullcontext(), ctx.progress(f"building {target}", lambda: built.bytes, backup.size):
            build_tree(backup, TREE, target, stats=built)
            prepared = steps.prepare(target, known, backup=backup)
            build_seconds = time.perf_counter() - started
    except BaseException:
        if target.exists():
            remove_tree(target)
        if safety and safety.backup:  # nothing changed, so the copy of the unchanged live tree goes too
            paths.store.remove(safety.backup)
        raise
    ids = [safety.backup.id] if safety and safety.backup else []
    previous = Path(os.path.realpath(live)) if live.is_symlink() else None
    try:
        switched, kept_tree = switch_and_keep(target, live, backup.id, prepared.write_manifest)
    except BaseException:
        if ids:
            ctx.warn(f"the backup of the live tree taken before the switch failed: {ids[0]}")
        raise
    steps.remember_safety(previous, safety.backup if safety else None)
    deployed = steps.record_new_release(prepared, backup, None, f"deployed by restore of {backup.id}")
    seconds = {"build": build_seconds, "safety_backup": safety.seconds if safety else 0.0,
               "switch": switched.seconds, "total": time.perf_counter() - started}
    lines = [f"restored {backup.id} into {live} ({switched.how}, {switched.seconds * 1000:.1f} ms)",
             *([kept.line()] if kept else []), *switch_lines(ids, kept_tree, skipped)]
    result = Result({"backup": backup.summary(), "switch": switched.to_json(),
                     "safety_backup": ids[0] if ids else None, "safety_backup_skipped": skipped,
                     "replaced_tree": str(kept_tree) if kept_tree else None,
                     "kept_release": kept.to_json() if kept else None, "seconds": seconds},
                    lines, backup_ids=list(dict.fromkeys([backup.id, *ids, deployed.id])))
    steps.after_switch(ctx, result, previous, ids)
    return result


def _dry_run(paths: CodePaths, backup: Backup, kept: KeptRelease | None, skipped: str | None) -> Result:
    """What a restore would do: switch to a kept release, or the changes the switch to a new copy would make."""
    live = paths.deployment
    data = {"dry_run": True, "backup": backup.summary(), "safety_backup_skipped": skipped,
            "kept_release": kept.to_json() if kept else None}
    if kept is not None and kept.ok:
        return Result(data, [f"would switch {live} to the kept release {kept.folder} (checked: whole; no copy)"],
                      report=True)
    refuse_damaged(backup)
    diff = diff_tree(tree_entries(backup, TREE), Path(os.path.realpath(live)), code_excluder(paths.exclude))
    lines = [f"would switch {live} to a copy of backup {backup.id}, which would:",
             *diff.restore_lines(str(live), done=False)] if diff else \
        [f"would switch {live} to a copy of backup {backup.id}, whose files are the same"]
    if kept is not None:
        lines.append(kept.line(dry_run=True))
    return Result({**data, "changes": diff.restore_json()}, lines, report=True)


def safety_skipped(ctx: Context, live: Path) -> str | None:
    """Why no safety backup is taken before `live` is replaced (--no-backup, or nothing there), else None."""
    return "--no-backup was given" if ctx.args.no_backup else nothing_to_save(live)


def switch_lines(ids: list[str], kept: Path | None, skipped: str | None) -> list[str]:
    """What a switch leaves for people: how to undo it, where the replaced tree is, why nothing was saved."""
    lines = [f"saved the previous code as {ids[0]}; to undo: {SCRIPT} restore {ids[0]} --yes"] if ids else []
    if kept:
        lines.append(f"the replaced tree is kept at {kept} until `{SCRIPT} cleanup` removes it")
    if skipped and not ids:
        lines.append(f"no safety backup: {skipped}")
    return lines


def _restore_in_place(ctx: Context, paths: CodePaths) -> Result:
    """restore in a git working copy: its files become the backup's, file by file, then HEAD goes back.

    The working copy cannot be swapped as a whole without moving .git, so each changed file is written
    beside its live copy and renamed over it (as config restores do). HEAD then goes back where the
    backup was taken (see deployed_code.git.head_plan), with the index as HEAD, so `git status` shows only the
    backup's own local changes; nothing else of .git is touched.
    """
    with paths.store.lock(f"{SCRIPT} restore"):
        backup = resolve_component(paths.store, ctx.args.backup)
        refuse_damaged(backup)
        excluded = code_excluder(paths.exclude)
        diff = diff_tree(tree_entries(backup, TREE), paths.live, excluded)
        head = head_plan(paths.repo, CodeSource.load(backup), backup.id) if is_repository(paths.repo) else None
        moves_head = head is not None and head.how in ("branch", "detached")
        data = {"backup": backup.summary(), "changes": diff.restore_json(), "head": head.to_json() if head else None}
        if ctx.dry_run or not (diff or moves_head):
            lines = ([f"restoring {backup.id} would:", *diff.restore_lines(str(paths.live), done=False),
                      *([f"  {head.note}"] if head else [])]
                     if ctx.dry_run else [f"{paths.live} already matches backup {backup.id}"])
            return Result({**data, "dry_run": ctx.dry_run}, lines, report=ctx.dry_run)
        ctx.confirm(f"Replace the files of the working copy {paths.live} with backup {backup.id}?")
        ids = [] if ctx.args.no_backup else [take_backup(paths, f"before restore of {backup.id}", safety=True)[0].id]
        diff = diff_tree(tree_entries(backup, TREE), paths.live, excluded)  # as it is now, after the prompt
        restore_tree(backup, TREE, paths.live, diff)
        if moves_head:
            try:
                move_head(paths.repo, head, f"{SCRIPT}: restore of {backup.id}")
            except ToolkitError as exc:
                raise ToolkitError(f"the files of backup {backup.id} are back in {paths.live}, but {exc}") from None
        record_deployed(paths, backup)
    changes = diff.restore_lines(str(paths.live))
    lines = [f"restored {backup.id} into the working copy {paths.live}: {len(changes)} paths changed", *changes]
    if head:
        lines.append(head.note)
    if ids:
        lines.append(f"saved the previous files as {ids[0]}; to undo: {SCRIPT} restore {ids[0]} --yes")
    return Result({**data, "changes": diff.restore_json(), "safety_backup": ids[0] if ids else None}, lines,
                  backup_ids=[backup.id, *ids])
