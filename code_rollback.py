#!/usr/bin/env python3
"""code_rollback.py: back up, restore and verify the deployed application code."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backup_store.manifest import Backup, load_backup
from backup_store.store import (
    BACKUP_ID,
    DELETING_PREFIX,
    STAGING_PREFIX,
    BackupStore,
    refuse_damaged,
    resolve_component,
)
from backup_store.trees import diff_tree, live_paths, restore_tree, tree_entries
from commands.run import run
from commands.store_commands import add_store_commands, add_verify_command, cleanup_backups, list_backups
from common.cli import (
    Context,
    Result,
    add_backup_argument,
    add_backup_arguments,
    add_command,
    add_no_backup_argument,
    make_parser,
)
from common.components import CODE
from common.errors import ToolkitError, UsageError
from common.files import atomic_write
from common.progress import Progress, no_progress
from common.settings import Settings
from common.signals import stop_signals_held
from common.text import count, human_size
from deployed_code.git import (
    check_out,
    export_commit,
    git_state,
    head_plan,
    is_repository,
    local_changes,
    move_head,
    resolve_commit,
)
from deployed_code.layout import build_path, leftovers, nothing_to_save, replaced_trees, switch_and_keep
from deployed_code.source import LAYOUT_IN_PLACE, LAYOUT_RELEASE, CodeSource
from deployed_code.tree import BuildStats, SnapshotStats, build_tree, code_excluder, remove_tree, snapshot_tree
from offsite.pull import open_store

SCRIPT = "code_rollback.py"
TREE = "tree"  # where the deployed tree lives inside a backup
DEPLOYED = "deployed.json"  # in the store: which backup the live tree was last made from


@dataclass
class CodePaths:
    """The deployed code, the repository and the store, from the settings."""

    repo: Path | None
    deployment: Path | None
    store: BackupStore
    exclude: list[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> CodePaths:
        """REPO_PATH, DEPLOYMENT_DIR, CODE_BACKUP_DIR (./code_backups) and CODE_EXCLUDE (comma or space separated)."""
        return cls(
            repo=settings.path("REPO_PATH"),
            deployment=settings.path("DEPLOYMENT_DIR"),
            store=open_store(settings, CODE),
            exclude=[p for p in re.split(r"[,\s]+", settings.text("CODE_EXCLUDE", "")) if p],
        )

    @property
    def in_place(self) -> bool:
        """The git working copy is what runs (DEPLOYMENT_DIR unset or the same as REPO_PATH)."""
        if self.deployment is None:
            return True
        return self.repo is not None and os.path.realpath(self.deployment) == os.path.realpath(self.repo)

    @property
    def live(self) -> Path:
        """The tree that is backed up and replaced."""
        live = self.repo if self.in_place else self.deployment
        if live is None:
            raise UsageError("neither DEPLOYMENT_DIR nor REPO_PATH is set: set the folder the code runs from")
        return live


def take_backup(paths: CodePaths, label: str | None, safety: bool = False, progress: Progress = no_progress,
                deployed_commit: str | None = None, cancelled: Callable[[], bool] | None = None
                ) -> tuple[Backup, dict]:
    """Snapshot the deployed tree, hard-linking files unchanged since the newest backup (caller holds the lock).

    `deployed_commit` (after a rollback) is recorded as the backup's commit instead of REPO_PATH's HEAD;
    `cancelled` stops a snapshot taken on a thread (see snapshot_tree)."""
    previous = paths.store.newest()
    stats = SnapshotStats()
    with paths.store.new_backup(label, safety=safety) as staging:
        source = CodeSource(host=socket.gethostname(), layout=LAYOUT_IN_PLACE if paths.in_place else LAYOUT_RELEASE,
                            live=str(paths.live.absolute()), **git_state(paths.repo))
        if deployed_commit:
            source.commit = deployed_commit
        staging.source = source.dump()
        # The previous backup's size is the estimate: code trees change little between deploys.
        with progress(f"backing up {paths.live}", lambda: stats.bytes, previous.size if previous else None):
            snapshot_tree(staging, paths.live, TREE, previous, paths.exclude, stats, cancelled)
    return staging.backup, stats.to_json()


def record_deployed(paths: CodePaths, backup: Backup) -> None:
    """Remember which backup the live tree now is, for verify."""
    atomic_write(paths.store.root / DEPLOYED, json.dumps({"backup": backup.id}).encode())


def deployed_id(paths: CodePaths) -> str | None:
    """The id of the backup the live tree was last restored or rolled back to, if recorded (and well formed)."""
    try:
        backup_id = json.loads((paths.store.root / DEPLOYED).read_text())["backup"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return backup_id if isinstance(backup_id, str) and BACKUP_ID.fullmatch(backup_id) else None


def deployed_backup(paths: CodePaths) -> Backup | None:
    """The backup of the last restore, else the newest backup."""
    backup_id = deployed_id(paths)
    if backup_id is not None and (paths.store.root / backup_id).is_dir():
        return load_backup(paths.store.root / backup_id)
    return paths.store.latest()


# -- the commands -----------------------------------------------------------------------------------


def cmd_backup(ctx: Context) -> Result:
    """backup: snapshot the deployed tree."""
    paths = CodePaths.from_settings(ctx.settings)
    if ctx.dry_run:
        return Result({"dry_run": True, "live": str(paths.live)}, [f"would back up {paths.live}"], report=True)
    with paths.store.lock(f"{SCRIPT} backup"):
        backup, stats = take_backup(paths, ctx.args.label, progress=ctx.progress)
    commit = CodeSource.load(backup).commit
    return Result({"backup": backup.summary(), "snapshot": stats, "commit": commit},
                  [f"backup {backup.id}: {len(backup.files)} files, {human_size(backup.size)} "
                   f"({stats['copied']} copied, {stats['linked'] + stats['rehashed']} unchanged and linked)"
                   + (f", commit {commit[:12]}" if commit else "")], backup_ids=[backup.id])


def cmd_restore(ctx: Context) -> Result:
    """restore BACKUP: the tree built aside (every checksum checked) while the live one is saved, then switched in."""
    paths = CodePaths.from_settings(ctx.settings)
    if paths.in_place:
        return _restore_in_place(ctx, paths)
    live = paths.deployment
    with paths.store.lock(f"{SCRIPT} restore"):
        backup = resolve_component(paths.store, ctx.args.backup)
        skipped = safety_skipped(ctx, live)
        if ctx.dry_run:
            refuse_damaged(backup)
            diff = diff_tree(tree_entries(backup, TREE), Path(os.path.realpath(live)), code_excluder(paths.exclude))
            return Result({"dry_run": True, "backup": backup.summary(), "changes": diff.restore_json(),
                           "safety_backup_skipped": skipped},
                          [f"would switch {live} to a copy of backup {backup.id}, which would:",
                           *diff.restore_lines(str(live), done=False)] if diff else
                          [f"would switch {live} to a copy of backup {backup.id}, whose files are the same"],
                          report=True)
        ctx.confirm(f"Replace the code in {live} with backup {backup.id}?")
        # Built beside the live tree (or in its releases folder), so the switch is a rename on one filesystem.
        # The build checks every file's size and sha256 as it copies: a damaged backup stops here, before
        # anything live changes, with no separate checksum pass.
        target = build_path(live)
        started = time.perf_counter()
        safety = None if skipped else SafetyBackupMeanwhile(paths, f"before restore of {backup.id}")
        built = BuildStats()
        try:
            with safety or nullcontext(), ctx.progress(f"building {target}", lambda: built.bytes, backup.size):
                build_tree(backup, TREE, target, stats=built)
                build_seconds = time.perf_counter() - started
        except BaseException:
            if target.exists():
                remove_tree(target)
            if safety and safety.backup:  # nothing changed, so the copy of the unchanged live tree goes too
                paths.store.remove(safety.backup)
            raise
        ids = [safety.backup.id] if safety and safety.backup else []
        try:
            switched, kept = switch_and_keep(target, live, backup.id)
        except BaseException:
            if ids:
                ctx.warn(f"the backup of the live tree taken before the switch failed: {ids[0]}")
            raise
        record_deployed(paths, backup)
        seconds = {"build": build_seconds, "safety_backup": safety.seconds if safety else 0.0,
                   "switch": switched.seconds, "total": time.perf_counter() - started}
    lines = [f"restored {backup.id} into {live} ({switched.how}, {switched.seconds * 1000:.1f} ms)",
             *switch_lines(ids, kept, skipped)]
    return Result({"backup": backup.summary(), "switch": switched.to_json(), "safety_backup": ids[0] if ids else None,
                   "safety_backup_skipped": skipped, "replaced_tree": str(kept) if kept else None,
                   "seconds": seconds}, lines, backup_ids=[backup.id, *ids])


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


class SafetyBackupMeanwhile:
    """The safety backup of the live tree, taken on a thread while the new tree is built.

    The snapshot mostly stats and links on one core while the build's copies keep the others busy, so
    a restore costs about the build alone. Leaving the block waits for the snapshot and raises its
    error. When the block fails, or a stop signal comes, the snapshot is cancelled (its staging folder
    removed) and waited for before the error goes on; one that had finished is `backup`.
    """

    def __init__(self, paths: CodePaths, label: str):
        self.paths, self.label = paths, label
        self.backup: Backup | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._take, name="safety-backup", daemon=True)

    def _take(self) -> None:
        started = time.perf_counter()
        try:
            self.backup = take_backup(self.paths, self.label, safety=True, cancelled=self.stop.is_set)[0]
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread when it leaves the block
            self.error = exc
        self.seconds = time.perf_counter() - started

    def __enter__(self) -> SafetyBackupMeanwhile:
        try:
            with stop_signals_held(self.stop.set):
                self.thread.start()
        except BaseException:  # stopped while starting: the cancelled snapshot ends before the stop goes on
            self._wait(cancel=True)
            raise
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        self._wait(cancel=error is not None)
        if error is None and self.error is not None:
            raise self.error

    def _wait(self, cancel: bool) -> None:
        """Wait for the snapshot to end; a stop signal meanwhile cancels it, and is delivered once it has ended."""
        if cancel:
            self.stop.set()
        with stop_signals_held(self.stop.set):
            if self.thread.ident is not None:
                self.thread.join()


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


def cmd_rollback(ctx: Context) -> Result:
    """rollback COMMIT: the commit's tree switched in (release folder) or checked out (in-place)."""
    paths = CodePaths.from_settings(ctx.settings)
    if not is_repository(paths.repo):
        raise UsageError("REPO_PATH is not set to a git repository")
    commit = resolve_commit(paths.repo, ctx.args.commit)
    with paths.store.lock(f"{SCRIPT} rollback"):
        changes = local_changes(paths.repo) if paths.in_place else []
        if changes and not ctx.args.stash:
            raise ToolkitError(f"{paths.repo} has local changes ({'; '.join(changes[:5])}"
                               f"{' ...' if len(changes) > 5 else ''}): commit them, or pass --stash to keep them"
                               " in the stash; nothing changed")
        skipped = safety_skipped(ctx, paths.live)
        if ctx.dry_run:
            return Result({"dry_run": True, "commit": commit, "safety_backup_skipped": skipped},
                          [f"would roll {paths.live} back to {commit[:12]}"], report=True)
        ctx.confirm(f"Roll the code in {paths.live} back to {commit[:12]}?")
        label = f"before rollback to {commit[:12]}"
        data = {"commit": commit, "safety_backup_skipped": skipped}
        lines = [f"rolled {paths.live} back to {commit[:12]} ({ctx.args.commit})"]
        if paths.in_place:
            ids = [] if skipped else [take_backup(paths, label, safety=True)[0].id]
            data["previous_commit"] = git_state(paths.repo)["commit"]
            stash = f"{SCRIPT}: before rollback to {commit[:12]}" if changes else None
            data["undo"] = check_out(paths.repo, commit, stash)
            if stash:
                lines.append(f"local changes stashed as stash@{{0}} ({stash})")
            lines.append(f"to undo: {' && '.join(data['undo'])}")
        else:
            # The commit's tree first: one that cannot be exported stops the rollback before anything is saved.
            target = build_path(paths.live)
            export_commit(paths.repo, commit, target)
            try:
                ids = [] if skipped else [take_backup(paths, label, safety=True)[0].id]
            except BaseException:
                remove_tree(target)
                raise
            switched, kept = switch_and_keep(target, paths.live, f"commit-{commit[:12]}")
            data.update(switch=switched.to_json(), replaced_tree=str(kept) if kept else None,
                        undo=[f"{SCRIPT} restore {ids[0]} --yes"] if ids else [])
            lines += switch_lines(ids, kept, skipped)
        # A record of what is deployed now, for verify (marked safety so `latest` stays the user's restore point).
        deployed = take_backup(paths, f"deployed by rollback to {commit[:12]}", safety=True, deployed_commit=commit)[0]
        record_deployed(paths, deployed)
    data["safety_backup"] = ids[0] if ids else None
    return Result(data, lines, backup_ids=ids)


def cmd_verify(ctx: Context) -> Result:
    """verify [--compile]: the deployed tree against the last deploy's manifest; drift exits 3."""
    paths = CodePaths.from_settings(ctx.settings)
    backup = deployed_backup(paths)
    problems: list[str] = []
    live = Path(os.path.realpath(paths.live))
    if backup is None:
        problems.append(f"no backups in {paths.store.root}: nothing to compare {paths.live} with")
    else:
        diff = diff_tree(tree_entries(backup, TREE), live, code_excluder(paths.exclude))
        problems += [f"{kind} {path}" for kind, names in diff.to_json().items() for path in names if path != "."]
        # Only a working copy runs its HEAD; a release folder's REPO_PATH may have moved on since the deploy.
        expected = CodeSource.load(backup).commit if paths.in_place else None
        head = git_state(paths.repo).get("commit") if expected else None
        if expected and head and head != expected:
            problems.append(f"{paths.repo} is at {head[:12]}, expected {expected[:12]}")
    if ctx.args.compile:
        problems += _compile_problems(live, code_excluder(paths.exclude))
    problems += [f"unfinished {path} (a run was stopped, or is running now): `{SCRIPT} cleanup` removes it"
                 for path in unfinished(paths)]
    lines = [f"verify {paths.live}: " + (count(len(problems), "problem") if problems else "OK")
             + (f" (against {backup.id})" if backup else "")] + [f"  {p}" for p in problems]
    return Result({"problems": problems, "against": backup.id if backup else None}, lines,
                  exit_code=3 if problems else 0, report=True)


def _compile_problems(root: Path, excluded) -> list[str]:
    problems = []
    for rel in live_paths(root, excluded):
        path = root / rel
        if rel.endswith(".py") and path.is_file() and not path.is_symlink():
            try:
                # compile() in memory: checking must not write .pyc files into the live tree
                compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as exc:
                problems.append(f"{rel}: does not compile: {exc}")
    return problems


def unfinished(paths: CodePaths) -> list[Path]:
    """What stopped runs left: half-built trees beside DEPLOYMENT_DIR and backups never finished in the store."""
    found = [] if paths.in_place or paths.deployment is None else leftovers(paths.deployment)
    if paths.store.root.is_dir():
        found += sorted(item for item in paths.store.root.iterdir()
                        if item.name.startswith((STAGING_PREFIX, DELETING_PREFIX)) and item.is_dir())
    return found


def cmd_cleanup(ctx: Context) -> Result:
    """cleanup DAYS: remove backups and replaced trees older than DAYS, always keeping the newest --keep of each,
    and the half-built trees of stopped restores and rollbacks."""
    paths = CodePaths.from_settings(ctx.settings)
    cutoff = datetime.now(UTC) - timedelta(days=ctx.args.days)
    # What the live tree was restored from stays: verify compares the tree with it.
    result = cleanup_backups(ctx, paths.store, SCRIPT, protected=[i for i in [deployed_id(paths)] if i])
    if paths.in_place or paths.deployment is None:
        return result
    # Under the store's lock: a restore or rollback holds it for as long as its half-built tree exists.
    with paths.store.lock(f"{SCRIPT} cleanup"):
        old = [path for path, when in replaced_trees(paths.deployment)[max(ctx.args.keep, 1):] if when < cutoff]
        half_built = leftovers(paths.deployment)
        if ctx.dry_run:
            result.data["would_remove_trees"] = [str(path) for path in old]
            result.data["would_remove_half_built"] = [str(path) for path in half_built]
            result.lines += [f"would remove the replaced tree {path}" for path in old]
            result.lines += [f"would remove the half-built tree {path}" for path in half_built]
            return result
        for path in old + half_built:
            remove_tree(path)
    result.data["removed_trees"] = [str(path) for path in old]
    result.data["removed_half_built"] = [str(path) for path in half_built]
    result.lines += [f"removed the replaced tree {path}" for path in old]
    result.lines += [f"removed the half-built tree {path}" for path in half_built]
    return result


def cmd_list(ctx: Context) -> Result:
    """list: the backups, newest first."""
    return list_backups(CodePaths.from_settings(ctx.settings).store,
                        {"COMMIT": lambda b: (CodeSource.load(b).commit or "-")[:12]})


# -- the command line -------------------------------------------------------------------------------


def build_parser():
    """Every command of code_rollback.py."""
    parser, commands = make_parser(
        SCRIPT,
        "Back up, restore and verify the deployed code (DEPLOYMENT_DIR, or the git working copy REPO_PATH).",
        "settings (environment, then .env, then defaults):\n"
        "  REPO_PATH (a git repository)  DEPLOYMENT_DIR (the release folder, or a `current` symlink)\n"
        "  CODE_BACKUP_DIR=./code_backups  CODE_EXCLUDE (extra patterns; .git and __pycache__ always)\n"
        "A DEPLOYMENT_DIR that does not exist yet is created by restore and rollback (named `current`, or a\n"
        "symlink to nothing: as a symlink into a releases folder), with no safety backup: nothing to save.\n"
        "cleanup also removes the half-built .NAME.tmp-* trees of stopped restores and rollbacks.\n\n"
        "examples:\n"
        f"  {SCRIPT} backup --label release-1.4\n"
        f"  {SCRIPT} restore latest --yes\n"
        f"  {SCRIPT} verify --compile\n"
        f"  {SCRIPT} cleanup 30 --keep 5",
    )
    sub = add_command(commands, "backup", cmd_backup, "snapshot the deployed tree",
                      "Files unchanged since the previous backup are hard-linked to it (stored files are\n"
                      "read-only), so a backup of an unchanged tree costs almost no time or space; the\n"
                      "others are copied and hashed on every core.")
    add_backup_arguments(sub)

    sub = add_command(commands, "restore", cmd_restore, "make DEPLOYMENT_DIR exactly a backup",
                      "Builds the backup's tree beside DEPLOYMENT_DIR (.NAME.tmp-X, or in the releases\n"
                      "folder), checking every checksum as it copies, while it saves the current tree as a\n"
                      "backup; then switches it in: a `current` symlink is replaced atomically; a plain\n"
                      "folder is exchanged with the new tree in one rename, and the replaced folder is kept\n"
                      "beside it (.NAME.replaced-TIME-X) until cleanup. A run killed before the switch\n"
                      "leaves its .NAME.tmp-X tree: verify names it, cleanup removes it.\n"
                      "In-place checkout: the files are put back one by one, then HEAD goes back to the\n"
                      "backup's branch (if it still points at the backup's commit) or commit, the index to\n"
                      "HEAD, so git status shows only the backup's own local changes.")
    add_backup_argument(sub)
    add_no_backup_argument(sub, "the current tree")

    sub = add_command(commands, "rollback", cmd_rollback, "put the code of a git commit in place",
                      "COMMIT is anything git rev-parse accepts (sha, tag, branch, HEAD~1). Release folder:\n"
                      "the commit's tree (git archive) is built beside DEPLOYMENT_DIR and switched in; paths\n"
                      "or symlinks leading out of the tree, devices and hard links are refused.\n"
                      "In-place checkout: local changes stop the rollback unless --stash; the commit is\n"
                      "checked out detached. A backup is taken first; the output says how to undo (with\n"
                      "`git stash pop` after --stash).")
    sub.add_argument("commit", metavar="COMMIT", help="the commit to roll back to")
    sub.add_argument("--stash", action="store_true", help="in-place: stash local changes instead of stopping")
    add_no_backup_argument(sub, "the current tree")

    sub = add_verify_command(commands, cmd_verify, "compare the deployed tree with the last restore's backup",
                      "Names every added, removed and changed file, checks the working copy's HEAD\n"
                      "against the backup's commit, and names the half-built trees and unfinished backups\n"
                      "of stopped runs. Any of these exits 3.")
    sub.add_argument("--compile", action="store_true", help="also byte-compile the Python files")

    add_store_commands(commands, cmd_cleanup, cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run code_rollback.py."""
    return run(build_parser(), CODE, argv)


if __name__ == "__main__":
    sys.exit(main())
