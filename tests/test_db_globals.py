"""Roles and tablespaces in database backups: kept with every backup (pg_dumpall --globals-only), refused when a
restore's dump needs a role the server lacks, and created first by `restore --with-globals`, into a second,
fresh cluster, with the scripts run as processes."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_script
from pg_cluster import Database, ThrowawayCluster

from backup_store.manifest import load_backup
from database.backup_info import DbBackupInfo

GLOBALS = "globals.sql"


@pytest.fixture(scope="module")
def fresh() -> Iterator[ThrowawayCluster]:
    """A second server, as a new host would have: none of the session cluster's roles."""
    cluster = ThrowawayCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@dataclass
class App:
    """A database owned by its own role, a group role with a member, and that member's settings."""

    db: Database
    root: Path
    owner: str
    group: str
    reader: str

    @property
    def env(self) -> dict[str, str]:
        return {**self.db.env, "BACKUP_DIR": str(self.root / "backups")}

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_script("database_rollback.py", *args, env={**self.env, **(env or {})}, cwd=self.root)

    def on(self, cluster: ThrowawayCluster, *args: str, **env: str) -> subprocess.CompletedProcess:
        """The script pointed at the same database name on another cluster, with the same store."""
        return self.run(*args, env={**cluster.env(self.db.name), **env})

    def backup(self, *args: str):
        result = self.run("backup", *args)
        assert result.returncode == 0, result.stderr
        return load_backup(self.root / "backups" / result.stdout.split()[1].rstrip(":"))


@pytest.fixture
def app(pg_db: Database, pg_cluster: ThrowawayCluster, tmp_path: Path) -> Iterator[App]:
    tag = secrets.token_hex(3)
    made = App(pg_db, tmp_path, f"app_owner_{tag}", f"readers_{tag}", f"reader_{tag}")
    pg_cluster.query("postgres", f"""
        CREATE ROLE {made.owner} LOGIN CONNECTION LIMIT 7 PASSWORD 'pw-{tag}';
        CREATE ROLE {made.group} NOLOGIN;
        CREATE ROLE {made.reader} LOGIN IN ROLE {made.group};
        ALTER ROLE {made.reader} SET search_path = app, public;
        ALTER ROLE {made.reader} SET work_mem = '12MB';
        ALTER DATABASE {pg_db.name} OWNER TO {made.owner}""")
    pg_cluster.query(pg_db.name, f"""
        SET ROLE {made.owner};
        CREATE SCHEMA app;
        CREATE TABLE app.items (id int PRIMARY KEY, name text);
        INSERT INTO app.items SELECT i, 'item ' || i FROM generate_series(1, 50) i;
        GRANT USAGE ON SCHEMA app TO {made.group};
        GRANT SELECT ON app.items TO {made.group}""")
    yield made
    pg_cluster.drop_database(pg_db.name)
    pg_cluster.query("postgres", f"DROP ROLE {made.reader}; DROP ROLE {made.group}; DROP ROLE {made.owner}")


def roles_on(cluster: ThrowawayCluster, app: App) -> dict[str, tuple]:
    """login, connection limit and settings of the app's roles that exist on `cluster`."""
    rows = cluster.query("postgres", "SELECT rolname, rolcanlogin, rolconnlimit, rolconfig FROM pg_roles"
                                     f" WHERE rolname IN ('{app.owner}', '{app.group}', '{app.reader}')")
    return {name: (login, limit, config) for name, login, limit, config in rows}


def members_on(cluster: ThrowawayCluster, app: App) -> list[tuple[str, str]]:
    return cluster.query("postgres", "SELECT r.rolname, m.rolname FROM pg_auth_members a"
                                     " JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member"
                                     f" WHERE m.rolname = '{app.reader}'")


def databases_on(cluster: ThrowawayCluster) -> set[str]:
    return {name for (name,) in cluster.query("postgres", "SELECT datname FROM pg_database")}


# -- what a backup keeps ------------------------------------------------------------------------------------


def test_a_backup_keeps_roles_memberships_and_settings_without_passwords(app: App):
    backup = app.backup()
    entry = next(e for e in backup.entries if e.path == GLOBALS)
    path = backup.path / GLOBALS
    assert entry.sha256 and entry.size == path.stat().st_size  # checksummed by the manifest, as the dump is
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert f'CREATE ROLE "{app.owner}";' in text
    assert f'GRANT "{app.group}" TO "{app.reader}"' in text
    assert f"ALTER ROLE \"{app.reader}\" SET \"work_mem\" TO '12MB';" in text
    assert "PASSWORD" not in text and "SCRAM-SHA-256" not in text
    info = DbBackupInfo.load(backup)
    assert (info.has_globals, info.role_passwords) == (True, False)


def test_with_role_passwords_the_file_holds_the_hash_and_stays_private(app: App, pg_cluster: ThrowawayCluster):
    [(hashed,)] = pg_cluster.query("postgres", f"SELECT rolpassword FROM pg_authid WHERE rolname = '{app.owner}'")
    assert hashed.startswith("SCRAM-SHA-256$")
    result = app.run("backup", "--with-role-passwords")
    assert result.returncode == 0, result.stderr
    assert "with the roles' password hashes (mode 0600)" in result.stdout
    backup = load_backup(app.root / "backups" / result.stdout.split()[1].rstrip(":"))
    path = backup.path / GLOBALS
    assert f"PASSWORD '{hashed}'" in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert DbBackupInfo.load(backup).role_passwords is True
    assert "--with-role-passwords" in app.run("backup", "--help").stdout


def test_a_non_superuser_gets_its_backup_and_without_the_privilege_a_warning(app: App):
    as_owner = {"DB_USER": app.owner}  # owns the database, is no superuser
    plain = app.run("backup", env=as_owner)
    assert plain.returncode == 0, plain.stderr
    assert "kept in globals.sql, without passwords" in plain.stdout  # pg_roles: any role may read it

    result = app.run("--json", "backup", "--with-role-passwords", env=as_owner)  # pg_authid: superusers only
    assert result.returncode == 0, result.stderr
    assert "warning: the backup keeps no roles or tablespaces" in result.stderr
    assert "permission denied" in result.stderr
    made = json.loads(result.stdout)
    assert made["globals"] == {"kept": False, "role_passwords": False}
    backup = load_backup(Path(made["backup"]["path"]))
    assert not (backup.path / GLOBALS).exists() and GLOBALS not in [e.path for e in backup.entries]
    assert DbBackupInfo.load(backup).has_globals is False
    checked = app.run("verify", backup.id)
    assert checked.returncode == 0, checked.stdout


def test_verify_finds_a_changed_globals_file(app: App):
    backup = app.backup()
    path = backup.path / GLOBALS
    path.write_text(path.read_text().replace("LOGIN", "LOGON", 1))
    result = app.run("verify", backup.id)
    assert result.returncode == 3
    assert f"{GLOBALS}: checksum mismatch (damaged)" in result.stdout
