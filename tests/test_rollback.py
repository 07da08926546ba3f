"""rollback.py: restore points across a real config folder, a real git repository and a real PostgreSQL database."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import git, run_script, script_argv, tree_snapshot
from point_system import System, take_point

from backup_store.manifest import load_backup


@pytest.fixture
def system(tmp_path: Path, pg_db) -> System:
    return System(tmp_path, pg_db)


def test_restore_point_puts_all_three_back_in_order(system: System):
    before = system.state()
    point = take_point(system)
    assert set(point["parts"]) == {"config", "code", "db"} and point["label"] == "before release 2"
    system.break_everything()
    assert system.state() != before

    result = system.run("--json", "restore", point["id"], "--yes")
    assert result.returncode == 0, result.stderr + result.stdout
    assert system.state() == before
    report = json.loads(result.stdout)
    assert report["restored"] == ["config", "code", "db"] and report["failure"] is None
    assert [r["component"] for r in report["rto"]] == ["config", "code", "db"]
    assert all(r["met"] for r in report["rto"]) and report["health"]["ok"]
    listing = json.loads(system.run("--json", "list").stdout)["points"]
    assert [p["id"] for p in listing] == [point["id"]]


def test_a_damaged_part_stops_the_restore_before_anything_changes(system: System):
    point = take_point(system)
    system.break_everything()
    broken = system.state()
    dump = system.root / "db_backups" / point["parts"]["db"] / "db.dump"
    os.chmod(dump, 0o600)
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped byte in the last step's part
    dump.write_bytes(bytes(data))

    for args in (["restore", point["id"], "--yes"], ["restore", point["id"], "--dry-run"]):
        result = system.run(*args)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "database backup" in result.stderr and "damaged" in result.stderr and "nothing changed" in result.stderr
    assert system.state() == broken
    config_backups = [p for p in (system.root / "config_backups").iterdir() if not p.name.startswith(".")]
    assert [p.name for p in config_backups if p.is_dir()] == [point["parts"]["config"]]  # no safety backup taken


def test_failure_in_the_code_step_stops_before_the_database_and_prints_working_undo(system: System):
    point = take_point(system)
    system.break_everything()
    broken = system.state()
    # Damaged after the checks that precede the first step (the pre-restore hook runs after them).
    backup = load_backup(system.root / "code_backups" / point["parts"]["code"])
    payload = backup.payload(next(entry for entry in backup.entries if entry.path == "tree/app.py"))
    damage = f"chmod 600 {payload} && echo \"print('damaged in the store')\" > {payload}"

    result = system.run("restore", point["id"], "--yes", PRE_RESTORE_HOOK=f"sh -c {shlex.quote(damage)}")
    assert result.returncode == 1, result.stdout
    assert "STOPPED: code restore failed" in result.stdout and "damaged" in result.stdout
    assert "not restored: code, database" in result.stdout
    now = system.state()
    assert now["config"] != broken["config"]  # the configuration step was done
    assert now["code"] == broken["code"] and now["db"] == broken["db"]  # nothing after it was touched

    undo = [line.strip() for line in result.stdout.split("to undo the steps already taken, in this order:")[1]
            .strip().splitlines()]
    assert len(undo) == 1 and "config_rollback.py" in undo[0]
    done = subprocess.run(undo[0], shell=True, env={**os.environ, **system.env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert system.state() == broken  # the undo puts back what the stopped rollback replaced


def test_only_restores_the_named_components(system: System):
    point = take_point(system)
    system.break_everything()
    broken = system.state()
    result = system.run("--json", "restore", "latest", "--only", "code", "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["restored"] == ["code"]
    now = system.state()
    assert now["code"] != broken["code"] and now["config"] == broken["config"] and now["db"] == broken["db"]
    assert system.run("restore", point["id"], "--only", "cache", "--yes").returncode == 2


def undo_lines(stdout: str, heading: str = "to undo the steps already taken, in this order:") -> list[str]:
    return [line.strip() for line in stdout.split(heading)[1].strip().splitlines()]


def undo_kinds(undo: list[str]) -> list[tuple[bool, bool, bool]]:
    return [("database_rollback" in u, "code_rollback" in u, "config_rollback" in u) for u in undo]


def test_hooks_run_before_and_after_every_step_and_every_undo_command_works(system: System):
    take_point(system)
    system.break_everything()
    broken = system.state()
    seen_before, seen_after = system.root / "seen-before.yml", system.root / "seen-after.yml"
    result = system.run("restore", "latest", "--yes",
                        PRE_RESTORE_HOOK=f"cp {system.config / 'app.yml'} {seen_before}",
                        POST_RESTORE_HOOK=f"cp {system.config / 'app.yml'} {seen_after}")
    assert result.returncode == 0, result.stderr + result.stdout
    # A successful restore's report ends with its undo commands too: psql for the database, newest first.
    assert undo_kinds(undo_lines(result.stdout, "to undo this restore, in this order:")) == [
        (False, False, False), (False, True, False), (False, False, True)]
    assert seen_before.read_text() == "server: [broken\n"  # PRE ran before the first step
    assert seen_after.read_text() == "server:\n  port: 8080  # public\n"  # POST ran after the steps
    restored = system.state()

    system.break_everything()
    broken = system.state()
    result = system.run("restore", "latest", "--yes", POST_RESTORE_HOOK="false")
    assert result.returncode == 1, result.stdout
    assert "POST_RESTORE_HOOK (false) failed" in result.stdout and "everything was restored" in result.stdout
    assert system.state() == restored
    undo = undo_lines(result.stdout)
    assert undo_kinds(undo) == [(False, False, False), (False, True, False), (False, False, True)]
    for command in undo:
        done = subprocess.run(command, shell=True, env={**os.environ, **system.env,
                                                         "PGPASSWORD": system.pg_db.env["DB_PASSWORD"]},
                              capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)
    assert system.state() == broken  # every step undone: the state the rollback replaced is back


def test_dry_run_shows_what_each_step_would_change_and_changes_nothing(system: System):
    point = take_point(system)
    system.break_everything()
    broken = system.state()
    result = system.run("restore", point["id"], "--dry-run")
    assert result.returncode == 0, result.stderr
    config, code, database = (result.stdout.split(f"{title} (")[1] for title in ("configuration", "code", "database"))
    assert "services/cache.json" in config and ".env.app" in config
    assert "re-create" not in code and "delete" in code and "new_module.py" in code and "change" in code
    assert "app.py" in code
    assert "would restore" in database and system.pg_db.name in database
    steps = json.loads(system.run("--json", "restore", point["id"], "--dry-run").stdout)["steps"]
    assert [(s["component"], s["exit_code"]) for s in steps] == [("config", 0), ("code", 0), ("db", 0)]
    assert system.state() == broken


def test_a_failing_pre_hook_stops_the_restore_before_anything_changes(system: System):
    take_point(system)
    system.break_everything()
    broken = system.state()
    result = system.run("restore", "latest", "--yes", PRE_RESTORE_HOOK="false")
    assert result.returncode == 1 and "PRE_RESTORE_HOOK (false) failed" in result.stderr
    assert system.state() == broken


def test_what_would_stop_part_way_is_refused_before_the_first_change(system: System):
    from backup_store.store import BackupStore

    point = take_point(system)
    system.break_everything()
    broken = system.state()
    assert system.run("restore", "latest", "--yes", "--health-url", "ftp://example.test/").returncode == 2
    with BackupStore(system.root / "points", "point").lock("a restore in progress"):
        assert system.run("restore", "latest", "--yes", LOCK_WAIT_SECONDS="0").returncode == 75
    subprocess.run(["rm", "-rf", str(system.root / "code_backups" / point["parts"]["code"])], check=True)
    result = system.run("restore", "latest", "--yes")
    assert result.returncode == 2 and "no longer in" in result.stderr
    assert system.state() == broken
    listing = json.loads(system.run("--json", "list").stdout)["points"]
    assert listing[0]["gone"] == ["code"]


def test_a_component_not_configured_is_skipped_and_said_so(system: System):
    result = system.run("backup", DEPLOYMENT_DIR="", REPO_PATH="")
    assert result.returncode == 0, result.stderr
    assert "code skipped: none of DEPLOYMENT_DIR, REPO_PATH is set" in result.stdout


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_verify_is_one_report_with_the_health_check(system: System, health_server: str):
    take_point(system)
    result = system.run("--json", "verify", "--health-url", f"{health_server}/ok", "--health-requests", "5")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert {"config", "code", "db", "health"} <= set(report) and report["health"]["ok"]

    result = system.run("verify", "--health-url", f"{health_server}/down", "--health-requests", "5")
    assert result.returncode == 3 and "error rate" in result.stdout
    (system.deploy / "app.py").write_text("hand edit\n")
    result = system.run("verify", "--health-url", f"{health_server}/ok", "--health-requests", "5")
    assert result.returncode == 3 and "changed app.py" in result.stdout


def test_drill_reports_rto_figures_and_fails_when_an_rto_is_missed(system: System):
    take_point(system)
    result = system.run("--json", "drill")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = json.loads(result.stdout)["steps"]
    assert [s["component"] for s in steps] == ["config", "code", "db"]
    assert all(s["rto_met"] and not s["problems"] for s in steps) and steps[2]["seconds"] > 0
    assert {s["rto_seconds"] for s in steps} == {300, 900, 1800}

    scratch = steps[2]["what"].split(" into ")[1].split(",")[0]
    assert "__drill_" in scratch

    metrics = system.root / "rollback.prom"
    result = system.run("drill", RTO_DATABASE_SECONDS="0.001", METRICS_FILE=str(metrics))
    assert result.returncode == 3, result.stdout
    assert "missed" in result.stdout
    with system.pg_db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE strpos(datname, %s) > 0", ("__drill_",))
        assert cur.fetchall() == []  # the scratch databases are gone
    # The drill is recorded as a drill; its scratch restore does not pass for a restore of production.
    recorded = metrics.read_text()
    assert 'operation="drill"' in recorded and 'operation="restore"' not in recorded


def test_a_point_pushed_off_host_is_restored_on_a_host_that_has_none_of_its_backups(system: System, remote):
    system.env.update(remote.env)
    before = system.state()
    result = system.run("--json", "backup", "--push", "--label", "before release 2")
    assert result.returncode == 0, result.stderr
    point = json.loads(result.stdout)["point"]
    for store in ("config_backups", "code_backups", "db_backups", "points"):
        shutil.rmtree(system.root / store)  # the host's disk is gone; the bucket is not
    system.break_everything()

    result = system.run("--json", "restore", point["id"], "--yes")
    assert result.returncode == 0, result.stderr + result.stdout
    assert system.state() == before
    assert json.loads(result.stdout)["restored"] == ["config", "code", "db"]


def test_a_restore_stopped_by_sigterm_still_reports_and_prints_its_undo(system: System):
    import signal
    import time

    from helpers import script_argv

    take_point(system)
    system.break_everything()
    broken = system.state()
    started = system.root / "hook started"
    env = {**os.environ, **system.env,
           "POST_RESTORE_HOOK": f"sh -c 'touch \"{started}\"; exec sleep 60'"}  # a start that hangs
    proc = subprocess.Popen(script_argv("rollback.py", "restore", "latest", "--yes"), env=env, cwd=system.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists():  # every step is done and the hook is running: stop it there
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)  # polling for the hook's file, bounded by the deadline
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "STOPPED" in stdout and "interrupted by SIGTERM" in stdout
    undo = undo_lines(stdout)
    assert len(undo) == 3  # database, code, configuration: every step it had taken
    for command in undo[1:]:  # the code and configuration undos (the database's needs psql's password)
        assert subprocess.run(command, shell=True, env={**os.environ, **system.env}).returncode == 0
    now = system.state()
    assert now["config"] == broken["config"] and now["code"] == broken["code"]


def test_an_in_place_deployment_is_restored_with_its_head_and_the_database(system: System):
    """REPO_PATH is what runs (no DEPLOYMENT_DIR): a deploy is a commit, and the restore puts HEAD back too."""
    system.env["DEPLOYMENT_DIR"] = ""

    def state() -> dict:
        files = {path: what for path, what in tree_snapshot(system.repo).items() if not path.startswith(".git")}
        return {**system.state(), "code": files, "head": git(system.repo, "rev-parse", "HEAD")}

    before = state()
    point = take_point(system)
    assert set(point["parts"]) == {"config", "code", "db"}
    system.break_everything()
    (system.repo / "app.py").write_text("print('v2')\n")
    git(system.repo, "commit", "-q", "-am", "deploy v2")
    stopped, started = system.root / "stopped", system.root / "started"

    result = system.run("--json", "restore", "latest", "--yes", PRE_RESTORE_HOOK=f"touch {stopped}",
                        POST_RESTORE_HOOK=f"touch {started}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["restored"] == ["config", "code", "db"] and report["failure"] is None
    assert state() == before  # files and HEAD (detached: main has moved on), configuration and database
    assert stopped.exists() and started.exists()  # the application was stopped and started again
    assert system.run("verify").returncode == 0


def test_a_restore_beside_a_drill_changes_nothing_until_it_has_every_lock(system: System):
    """A drill's scratch restore holds the database store's lock: the restore waits for it, then exits 75
    with nothing changed (it used to restore configuration and code and stop at the database with exit 1)."""
    from backup_store.store import BackupStore

    before = system.state()
    take_point(system)
    system.break_everything()
    broken = system.state()
    database_store = BackupStore(system.root / "db_backups", "db")
    with database_store.lock("database_rollback.py restore (a drill's scratch restore)"):
        result = system.run("restore", "latest", "--yes", LOCK_WAIT_SECONDS="0.5")
        assert result.returncode == 75, result.stdout + result.stderr
        assert "a drill's scratch restore" in result.stderr and "waited 0.5 s" in result.stderr
        assert system.state() == broken
        safety = [p for p in (system.root / "config_backups").iterdir() if not p.name.startswith(".")]
        assert len([p for p in safety if p.is_dir()]) == 1  # the point's own backup: no safety backup was taken

        # Within the wait, the restore goes ahead as soon as the lock is free, and holds every lock to the end.
        proc = subprocess.Popen(script_argv("rollback.py", "restore", "latest", "--yes"),
                                env={**os.environ, **system.env, "LOCK_WAIT_SECONDS": "120"}, cwd=system.root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiting = proc.stderr.readline()
        assert "waiting up to" in waiting and f"for the lock on {database_store.root}" in waiting
        assert system.state() == broken
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert system.state() == before


def test_a_drill_waits_for_a_restore_that_holds_the_database_store(system: System):
    from backup_store.store import BackupStore

    take_point(system)
    with BackupStore(system.root / "db_backups", "db").lock("rollback.py restore"):
        result = system.run("drill", LOCK_WAIT_SECONDS="0")
    assert result.returncode == 75, result.stdout + result.stderr
    assert "another run holds the lock on" in result.stderr and "rollback.py restore" in result.stderr
    with system.pg_db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE strpos(datname, %s) > 0", ("__drill_",))
        assert cur.fetchall() == []  # no scratch database was made
    assert system.run("drill").returncode == 0


def test_a_restore_stopped_while_a_step_runs_does_not_claim_that_step_was_not_restored(system: System):
    """The step's script may have finished its work when the stop came: the report says it cannot tell, and
    gives the verify that can (it used to say `not restored: configuration`, with no undo for it)."""
    import signal

    from helpers import ROOT, wait_for_child

    take_point(system)
    system.break_everything()
    proc = subprocess.Popen(script_argv("rollback.py", "restore", "latest", "--yes"),
                            env={**os.environ, **system.env}, cwd=system.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_child(proc, Path(sys.executable).name, with_arg=str(ROOT / "config_rollback.py"))
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, stdout
    assert "STOPPED: during the configuration step: interrupted by SIGTERM" in stdout
    assert "not restored: code, database" in stdout
    verify = stdout.split("the configuration step was cut off while its script ran")[1].split("`")[1]
    assert "config_rollback.py" in verify and "verify --against" in verify
    checked = subprocess.run(verify, shell=True, env={**os.environ, **system.env}, capture_output=True, text=True)
    assert checked.returncode in (0, 3), checked.stderr  # restored, or not: verify tells which


def test_a_step_whose_verify_finds_problems_stops_the_restore_and_shows_them(system: System):
    """The report said only "exit code 3"; it now says what the verify found."""
    migrations = system.root / "migrations"
    migrations.mkdir()
    (migrations / "001_add_notes.up.sql").write_text("ALTER TABLE customers ADD COLUMN notes text;\n")
    (migrations / "001_add_notes.down.sql").write_text("ALTER TABLE customers DROP COLUMN notes;\n")
    system.env["MIGRATIONS_DIR"] = str(migrations)
    migrated = run_script("database_rollback.py", "migrate", "--yes", env=system.env, cwd=system.root)
    assert migrated.returncode == 0, migrated.stderr
    take_point(system)
    # The applied migration's file is edited afterwards: the database, once restored, no longer matches it.
    (migrations / "001_add_notes.up.sql").write_text("ALTER TABLE customers ADD COLUMN notes varchar(80);\n")
    result = system.run("restore", "latest", "--yes")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "STOPPED: database verify after the restore found 1 problem: migration 001_add_notes" in result.stdout
    # No migration since the point: the database step has no down file to run, and keeps every row.
    assert ("database: schema already at 001_add_notes, nothing to roll back, every row kept, NOT verified"
            in result.stdout)
    assert "  problem: migration 001_add_notes" in result.stdout


def test_a_drill_step_that_fails_is_not_logged_as_verified(system: System):
    point = take_point(system)
    dump = system.root / "db_backups" / point["parts"]["db"] / "db.dump"
    os.chmod(dump, 0o600)
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    result = system.run("drill")
    assert result.returncode == 1, result.stdout + result.stderr
    database = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if "into " in line]
    assert database and not [line for line in database if "verified" in line], database
    assert "restore failed" in result.stdout and "damaged" in result.stdout
