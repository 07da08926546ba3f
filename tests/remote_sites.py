"""The sites the off-host tests work on: one component's live files and local store, pointed at a remote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import run_script, tree_snapshot
from s3_server import Bucket


class Site:
    """One component's live files and local store, pointed at a remote; `script` runs against them."""

    script = ""
    root: Path
    env: dict[str, str]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return run_script(self.script, *args, env={**self.env, **env}, cwd=self.root)

    def backup(self) -> str:
        result = self.run("--json", "backup")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["backup"]["id"]


class ConfigSite(Site):
    """A config folder and .env with their local store, pointed at a remote."""

    script = "config_rollback.py"

    def __init__(self, root: Path, remote: Bucket, **settings: str):
        self.root = root
        self.config = root / "config"
        (self.config / "services").mkdir(parents=True)
        (self.config / "app.yml").write_text("server:\n  port: 8080  # the public port\nsecret_word: albatross\n")
        (self.config / "services" / "cache.json").write_text('{"ttl": 60, "host": "cache.internal"}\n')
        (root / ".env").write_text("API_TOKEN=plaintext-token-value-123\n")
        os.chmod(root / ".env", 0o600)
        self.store = root / "config_backups"
        self.env = {"CONFIG_DIR": str(self.config), "CONFIG_BACKUP_DIR": str(self.store),
                    "ENV_FILE": str(root / ".env"), **remote.env, **settings}

    def state(self) -> dict:
        return {"tree": tree_snapshot(self.config), "env": (self.root / ".env").read_bytes()}


def make_code_tree(root: Path, files: int = 200, big: int = 0) -> None:
    for i in range(files):
        folder = root / f"pkg{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{i}.py").write_text(f"VALUE = {i}\n" * (1 + i % 7))
    os.symlink("pkg0/mod0.py", root / "entry.py")
    (root / "empty").mkdir()
    if big:
        with open(root / "assets.bin", "wb") as out:
            for _ in range(big):
                out.write(os.urandom(1024 * 1024))


class CodeSite(Site):
    """A deployed tree with its local store, pointed at a remote."""

    script = "code_rollback.py"

    def __init__(self, root: Path, remote: Bucket, big: int = 0):
        self.root = root
        self.deploy = root / "deploy"
        make_code_tree(self.deploy, big=big)
        self.env = {"DEPLOYMENT_DIR": str(self.deploy), "CODE_BACKUP_DIR": str(root / "code_backups"),
                    **remote.env}


def remote_ids(run) -> list[str]:
    result = run("--json", "list", "--remote")
    assert result.returncode == 0, result.stderr
    return [b["id"] for b in json.loads(result.stdout)["backups"]]
