"""verify [--compile]: the deployed tree against the backup it was last made from, its links to the shared paths,
and what stopped runs left."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from backup_store.store import DELETING_PREFIX, STAGING_PREFIX
from backup_store.trees import diff_tree, live_paths, tree_entries
from common.cli import Context, Result
from common.errors import EXIT_VERIFY
from common.text import count
from deployed_code.backups import deployed_backup
from deployed_code.git import git_state
from deployed_code.layout import leftovers
from deployed_code.linked import link_problems, shared_folder
from deployed_code.paths import SCRIPT, TREE, CodePaths
from deployed_code.source import CodeSource
from deployed_code.tree import code_excluder


def verify(ctx: Context) -> Result:
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
    if paths.linked and not paths.in_place:
        problems += link_problems(paths.live, shared_folder(paths.live), paths.linked)
    if ctx.args.compile:
        problems += compile_problems(live, code_excluder(paths.exclude))
    problems += [f"unfinished {path} (a run was stopped, or is running now): `{SCRIPT} cleanup` removes it"
                 for path in unfinished(paths)]
    lines = [f"verify {paths.live}: " + (count(len(problems), "problem") if problems else "OK")
             + (f" (against {backup.id})" if backup else "")] + [f"  {p}" for p in problems]
    return Result({"problems": problems, "against": backup.id if backup else None}, lines,
                  exit_code=EXIT_VERIFY if problems else 0, report=True)


def compile_problems(root: Path, excluded: Callable[[str], bool]) -> list[str]:
    """The Python files under `root` that do not compile, one line each (nothing is written into the tree)."""
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
