"""A restore point's three parts for the tests: a config folder, code from a git repository, a PostgreSQL database."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import database_state, git, run_script, tree_snapshot

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers(id), total numeric(10,2));
INSERT INTO customers (name) SELECT 'customer ' || i FROM generate_series(1, 50) i;
INSERT INTO orders (customer_id, total) SELECT 1 + i % 50, i * 1.5 FROM generate_series(1, 300) i;
"""


class System:
    """An application's configuration, deployed code (from a git repository) and database, with all stores."""

    def __init__(self, root: Path, pg_db):
        self.root, self.pg_db = root, pg_db
        self.config = root / "config"
        (self.config / "services").mkdir(parents=True)
        (self.config / "app.yml").write_text("server:\n  port: 8080  # public\n")
        (self.config / "services" / "cache.json").write_text('{"ttl": 60}\n')
        (root / ".env.app").write_text("API_URL=https://api.example.test\n")
        os.chmod(root / ".env.app", 0o600)
        self.repo = root / "repo"
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        (self.repo / "app.py").write_text("print('v1')\n")
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", "v1")
        git(self.repo, "tag", "v1")
        self.deploy = root / "deploy"
        self.deploy.mkdir()
        (self.deploy / "app.py").write_text("print('v1')\n")
        (self.deploy / "lib").mkdir()
        (self.deploy / "lib" / "util.py").write_text("X = 1\n")
        with pg_db.connect() as conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
        self.env = {
            "CONFIG_DIR": str(self.config), "CONFIG_BACKUP_DIR": str(root / "config_backups"),
            "ENV_FILE": str(root / ".env.app"),
            "REPO_PATH": str(self.repo), "DEPLOYMENT_DIR": str(self.deploy),
            "CODE_BACKUP_DIR": str(root / "code_backups"),
            "BACKUP_DIR": str(root / "db_backups"), "POINTS_DIR": str(root / "points"),
            # CPU and memory of a shared test machine are not what these tests are about.
            "HEALTH_MAX_CPU": "100", "HEALTH_MAX_MEMORY": "100",
            **pg_db.env,
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return run_script("rollback.py", *args, env={**self.env, **env}, cwd=self.root)

    def state(self) -> dict:
        return {"config": tree_snapshot(self.config), "env": (self.root / ".env.app").read_bytes(),
                "code": tree_snapshot(self.deploy), "db": database_state(self.pg_db)}

    def break_everything(self) -> None:
        (self.config / "app.yml").write_text("server: [broken\n")
        (self.config / "services" / "cache.json").unlink()
        (self.root / ".env.app").write_text("API_URL=https://wrong.example.test\n")
        (self.deploy / "app.py").write_text("print('v2, broken')\n")
        (self.deploy / "new_module.py").write_text("Y = 2\n")
        with self.pg_db.connect() as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM orders WHERE id > 100; ALTER TABLE customers ADD COLUMN email text;"
                        " CREATE TABLE audit (id int);")


def take_point(system: System, label: str = "before release 2") -> dict:
    result = system.run("--json", "backup", "--label", label)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["point"]
