"""Roles and tablespaces in database backups: kept with every backup (pg_dumpall --globals-only), refused when a
restore's dump needs a role the server lacks, and created first by `restore --with-globals`, into a second,
fresh cluster, with the scripts run as processes."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import database_state, run_script
from pg_cluster import Database, ThrowawayCluster

from backup_store.manifest import load_backup
from database.backup_info import DbBackupInfo
from database.dump_roles import parse_entry, statement_roles
from database.globals_script import MEMBERSHIP, ROLE, classify

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
    made = App(pg_db, tmp_path, f"app_owner_{tag}", f"App readers {tag}", f"reader_{tag}")  # a name to quote
    pg_cluster.query("postgres", f"""
        CREATE ROLE {made.owner} LOGIN CONNECTION LIMIT 7 PASSWORD 'pw-{tag}';
        CREATE ROLE "{made.group}" NOLOGIN;
        CREATE ROLE {made.reader} LOGIN IN ROLE "{made.group}";
        ALTER ROLE {made.reader} SET search_path = app, public;
        ALTER ROLE {made.reader} SET work_mem = '12MB';
        ALTER DATABASE {pg_db.name} OWNER TO {made.owner}""")
    pg_cluster.query(pg_db.name, f"""
        SET ROLE {made.owner};
        CREATE SCHEMA app;
        CREATE TABLE app.items (id int PRIMARY KEY, name text);
        INSERT INTO app.items SELECT i, 'item ' || i FROM generate_series(1, 50) i;
        GRANT USAGE ON SCHEMA app TO "{made.group}";
        GRANT SELECT ON app.items TO "{made.group}";""")
    yield made
    pg_cluster.drop_database(pg_db.name)
    pg_cluster.query("postgres", f'DROP ROLE {made.reader}; DROP ROLE "{made.group}"; DROP ROLE {made.owner}')


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


# -- a restore into a server without the roles --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["swap", "in-place"])
def test_restore_into_a_fresh_cluster_refuses_then_creates_the_roles_with_globals(app: App, fresh, mode: str):
    state = database_state(app.db)
    app.backup()
    args = ["restore", "latest", "--yes"]
    if mode == "in-place":  # in place needs a database to restore into: an empty one, as a new host has
        fresh.create_database(app.db.name)
        args.append("--in-place")
    databases = databases_on(fresh)

    refused = app.on(fresh, *args)
    assert refused.returncode == 1
    first = "the database" if mode == "swap" else "SCHEMA app"  # a new database would be the owner's too
    assert refused.stderr.startswith("database_rollback.py: error: roles ")
    assert f"{app.owner} (owner of {first} and " in refused.stderr
    assert f'"{app.group}" (named in ACL SCHEMA app' in refused.stderr  # a grantee only
    assert "do not exist on this server: restore with --with-globals to create them from the backup" in refused.stderr
    assert roles_on(fresh, app) == {} and databases_on(fresh) == databases

    result = app.on(fresh, *args, "--with-globals")
    assert result.returncode == 0, result.stderr
    assert f"created role {app.owner} (LOGIN CONNECTION LIMIT 7)" in result.stdout
    assert roles_on(fresh, app) == {app.owner: (True, 7, None), app.group: (False, -1, None),
                                    app.reader: (True, -1, ["search_path=app, public", "work_mem=12MB"])}
    assert members_on(fresh, app) == [(app.group, app.reader)]
    restored = Database(app.db.name, fresh)
    assert database_state(restored) == state
    owner = app.owner if mode == "swap" else "postgres"  # a new database takes the dump's; in place keeps its own
    assert fresh.query("postgres", f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = "
                                   f"'{app.db.name}'") == [(owner,)]
    assert fresh.query(app.db.name, "SELECT tableowner FROM pg_tables WHERE tablename = 'items'") == [(app.owner,)]
    assert fresh.query(app.db.name, f"SELECT has_table_privilege('{app.reader}', 'app.items', 'SELECT')") == [(True,)]


def test_dry_run_lists_what_it_would_create_and_changes_nothing(app: App, fresh):
    app.backup()
    databases = databases_on(fresh)
    result = app.on(fresh, "restore", "latest", "--with-globals", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would create role {app.owner} (LOGIN CONNECTION LIMIT 7)" in result.stdout
    assert f'would create role "{app.group}"\n' in result.stdout
    assert f"would create role {app.reader} (LOGIN), with 2 setting(s)" in result.stdout
    assert f'would make {app.reader} a member of "{app.group}"' in result.stdout
    assert f"a new database here: its owner is {app.owner}, as in the dump" in result.stdout
    assert roles_on(fresh, app) == {} and databases_on(fresh) == databases


def test_an_existing_role_is_left_as_it_is_and_the_difference_noted(app: App, fresh):
    app.backup()
    fresh.query("postgres", f"CREATE ROLE {app.owner} NOLOGIN CONNECTION LIMIT 2")
    result = app.on(fresh, "restore", "latest", "--yes", "--with-globals")
    assert result.returncode == 0, result.stderr
    assert roles_on(fresh, app)[app.owner] == (False, 2, None)
    assert (f"note: role {app.owner} exists here and was left as it is; in the backup it has CONNECTION LIMIT 7 "
            "(here CONNECTION LIMIT 2), LOGIN (here NOLOGIN)") in result.stdout
    assert f"created role {app.owner}" not in result.stdout
    assert members_on(fresh, app) == [(app.group, app.reader)]  # the missing ones are still created
    assert fresh.query(app.db.name, "SELECT count(*) FROM app.items") == [(50,)]


def test_a_restore_that_fails_after_creating_the_roles_drops_them_again(app: App, fresh):
    app.backup()
    fresh.create_database(app.db.name)  # in place, into a database whose schema app something else depends on
    fresh.query(app.db.name, "CREATE SCHEMA app; CREATE TABLE app.local_only (id int)")
    result = app.on(fresh, "restore", "latest", "--yes", "--in-place", "--with-globals")
    assert result.returncode == 1
    assert "cannot drop schema app because other objects depend on it" in result.stderr
    assert "warning" not in result.stderr  # every role it created dropped again
    assert roles_on(fresh, app) == {}  # created for the restore, gone with it
    assert fresh.query(app.db.name, "SELECT count(*) FROM app.local_only") == [(0,)]


def test_with_globals_takes_a_superuser(app: App, fresh):
    app.backup()
    operator = "operator_" + secrets.token_hex(3)
    fresh.query("postgres", f"CREATE ROLE {operator} LOGIN CREATEDB")
    databases = databases_on(fresh)
    result = app.on(fresh, "restore", "latest", "--yes", "--with-globals", DB_USER=operator)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"database_rollback.py: error: restore --with-globals creates roles and tablespaces, which takes a "
        f"superuser, and {operator} is not one: nothing was changed"]
    assert roles_on(fresh, app) == {} and databases_on(fresh) == databases


def test_a_backup_from_before_roles_were_kept_still_loads_and_says_what_to_do(app: App, fresh):
    backup = app.backup()
    manifest_path = backup.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("has_globals", "role_passwords"):
        del manifest[key]
    manifest["entries"] = [entry for entry in manifest["entries"] if entry["path"] != GLOBALS]
    manifest_path.write_text(json.dumps(manifest))
    (backup.path / GLOBALS).unlink()
    old = load_backup(backup.path)
    assert (DbBackupInfo.load(old).has_globals, DbBackupInfo.load(old).role_passwords) == (None, None)
    assert app.run("verify", backup.id).returncode == 0
    listed = app.run("list")
    assert listed.returncode == 0 and backup.id in listed.stdout

    refused = app.on(fresh, "restore", backup.id, "--yes", "--with-globals")
    assert refused.returncode == 2
    assert f"--with-globals: backup {backup.id} keeps no roles or tablespaces" in refused.stderr
    refused = app.on(fresh, "restore", backup.id, "--yes")
    assert refused.returncode == 1
    assert f'and the backup keeps no role "{app.group}", {app.owner}: create them first' in refused.stderr
    assert roles_on(fresh, app) == {}


def test_a_missing_tablespace_is_created_where_its_folder_exists_else_named(app: App, pg_cluster, fresh):
    kept, gone = pg_cluster.server_folder("ts-kept-"), pg_cluster.server_folder("ts-gone-")
    names = [f"ts_kept_{app.owner[-6:]}", f"ts_gone_{app.owner[-6:]}"]
    pg_cluster.query("postgres", f"CREATE TABLESPACE {names[0]} OWNER {app.owner} LOCATION '{kept}'")
    pg_cluster.query("postgres", f"CREATE TABLESPACE {names[1]} LOCATION '{gone}'")
    try:
        app.backup()
    finally:  # the folders are left empty: one is the new host's to use, the other goes
        for name in names:
            pg_cluster.query("postgres", f"DROP TABLESPACE {name}")
    shutil.rmtree(gone)
    result = app.on(fresh, "restore", "latest", "--yes", "--with-globals")
    assert result.returncode == 0, result.stderr
    assert f"created tablespace {names[0]} at {kept}" in result.stdout
    assert (f"warning: tablespace {names[1]} not created: its location {gone} does not exist on the server"
            in result.stderr)
    assert fresh.query("postgres", "SELECT spcname, pg_get_userbyid(spcowner), pg_tablespace_location(oid)"
                                   " FROM pg_tablespace WHERE spcname LIKE 'ts\\_%'") == [(names[0], app.owner, kept)]
    fresh.query("postgres", f"DROP TABLESPACE {names[0]}")  # the folder is the session cluster's


# -- reading pg_dumpall's and pg_restore's output ----------------------------------------------------------


def test_statements_are_told_apart_by_what_they_are_about():
    role = classify('ALTER ROLE "odd ""name""" WITH NOSUPERUSER NOINHERIT LOGIN CONNECTION LIMIT 3 '
                    "PASSWORD 'SCRAM-SHA-256$4096:x'")
    assert (role.kind, role.name) == (ROLE, 'odd "name"')
    assert role.flags == {"rolconnlimit": 3, "rolsuper": False, "rolinherit": False, "rolcanlogin": True}
    grant = classify('GRANT "app group" TO "reader" WITH INHERIT TRUE GRANTED BY "admin"')
    assert (grant.kind, grant.pairs, grant.grantor) == (MEMBERSHIP, [("app group", "reader")], "admin")
    assert grant.without_grantor() == 'GRANT "app group" TO "reader" WITH INHERIT TRUE'


def test_an_owner_with_spaces_is_read_from_the_table_of_contents():
    known = {"odd owner", "postgres"}
    assert parse_entry("254; 1255 16438 FUNCTION app g(integer, text) odd owner", known) == (
        "odd owner", "FUNCTION app g(integer, text)")
    assert parse_entry("2; 3079 16401 EXTENSION - pgcrypto ", known) == (None, "EXTENSION pgcrypto")
    assert parse_entry("216; 1259 16389 TABLE app t stranger", known) == ("stranger", "TABLE app t")


def test_grants_name_their_grantees_and_default_privileges_their_roles():
    assert statement_roles('GRANT SELECT(a, "TO") ON TABLE app.t TO "app group", reader WITH GRANT OPTION') == [
        "app group", "reader"]
    assert statement_roles("REVOKE ALL ON SCHEMA public FROM PUBLIC") == []
    assert statement_roles("ALTER DEFAULT PRIVILEGES FOR ROLE owner IN SCHEMA app GRANT SELECT ON TABLES "
                           "TO reader") == ["owner", "reader"]
    assert statement_roles("CREATE POLICY p ON app.t TO reader, auditor USING ((owner = CURRENT_USER))") == [
        "reader", "auditor"]
    assert statement_roles("SET SESSION AUTHORIZATION grantor") == ["grantor"]


def test_a_membership_between_two_roles_that_exist_here_is_not_granted(app: App, fresh):
    app.backup()
    fresh.query("postgres", f'CREATE ROLE "{app.group}" NOLOGIN; CREATE ROLE {app.reader} LOGIN')
    result = app.on(fresh, "restore", "latest", "--yes", "--with-globals")
    assert result.returncode == 0, result.stderr
    assert members_on(fresh, app) == []  # what an existing role may do is not changed by a backup of elsewhere
    assert f"left as it is here: {app.reader} is not a member of" in result.stdout
