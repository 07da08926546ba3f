"""Run metrics and recovery time objectives: the scripts run as real processes on real folders."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ROOT, run_script
from prometheus_client.parser import text_string_to_metric_families

from backup_store.store import BackupStore
from commands.metrics import record_run
from commands.rto import RtoReport, rto_for
from common.errors import SettingError
from common.settings import Settings


class Workspace:
    """A small live configuration, its backup store and a metrics file, in a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "config"
        self.env_file = root / ".env"
        self.metrics = root / "textfile" / "rollback.prom"
        self.env = {
            "CONFIG_DIR": str(self.config),
            "CONFIG_BACKUP_DIR": str(root / "config_backups"),
            "ENV_FILE": str(self.env_file),
        }

    def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess:
        return run_script("config_rollback.py", *args, env={**self.env, **settings}, cwd=self.root)

    def run_recorded(self, *args: str, **settings: str) -> subprocess.CompletedProcess:
        return self.run(*args, METRICS_FILE=str(self.metrics), **settings)

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample in the metrics file: (name, sorted labels) -> value."""
        found = {}
        for family in text_string_to_metric_families(self.metrics.read_text()):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    def value(self, name: str, operation: str | None = None) -> float | None:
        labels = {"component": "config"} | ({"operation": operation} if operation else {})
        return self.samples().get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path)


def make_workspace(root: Path) -> Workspace:
    ws = Workspace(root)
    ws.config.mkdir(parents=True)
    ws.metrics.parent.mkdir()
    (ws.config / "app.yml").write_text("server:\n  port: 8080\n")
    (ws.config / "db.json").write_text('{"host": "db"}\n')
    ws.env_file.write_text("DEBUG=false\n")
    os.chmod(ws.env_file, 0o600)
    return ws


def test_restore_records_success_duration_and_store_state(ws: Workspace):
    assert ws.run_recorded("backup").returncode == 0
    (ws.config / "app.yml").write_text("server:\n  port: 9090\n  deployed: true\n")

    before = time.time()
    result = ws.run_recorded("restore", "latest", "--yes")
    after = time.time()
    assert result.returncode == 0, result.stderr

    newest = json.loads(ws.run("--json", "list").stdout)["backups"][0]
    assert newest["safety"]  # the state the restore replaced
    assert before <= ws.value("rollback_last_success_timestamp_seconds", "restore") <= after
    assert ws.value("rollback_last_run_timestamp_seconds", "restore") == ws.value(
        "rollback_last_success_timestamp_seconds", "restore")
    assert ws.value("rollback_last_run_ok", "restore") == 1
    assert 0 < ws.value("rollback_duration_seconds", "restore") <= after - before
    assert ws.value("rollback_backup_count") == 2  # the backup and the restore's safety backup
    assert ws.value("rollback_newest_backup_bytes") == newest["size"] > 0
    assert ws.value("rollback_rto_seconds") == 300
    assert ws.value("rollback_verify_ok", "restore") is None


def test_verify_records_drift_as_not_ok_and_keeps_the_last_success(ws: Workspace):
    assert ws.run("backup").returncode == 0
    assert ws.run_recorded("verify", "--against", "latest").returncode == 0
    assert ws.value("rollback_verify_ok", "verify") == 1
    clean_at = ws.value("rollback_last_success_timestamp_seconds", "verify")

    (ws.config / "app.yml").write_text("server:\n  port: 9090\n")
    assert ws.run_recorded("verify", "--against", "latest").returncode == 3
    assert ws.value("rollback_verify_ok", "verify") == 0
    assert ws.value("rollback_last_run_ok", "verify") == 0
    assert ws.value("rollback_last_success_timestamp_seconds", "verify") == clean_at
    assert ws.value("rollback_last_run_timestamp_seconds", "verify") > clean_at


def test_samples_of_other_operations_and_components_survive_a_later_run(ws: Workspace):
    record_run(ws.metrics, "db", "backup", True, 12.5, backup_count=4, newest_backup_bytes=1000)
    assert ws.run_recorded("backup").returncode == 0
    earlier = ws.samples()

    assert ws.run_recorded("verify").returncode == 0
    later = ws.samples()
    kept = {key: value for key, value in later.items() if ("operation", "verify") not in key[1]}
    assert kept == earlier
    assert later[("rollback_duration_seconds", (("component", "db"), ("operation", "backup")))] == 12.5
    assert later[("rollback_backup_count", (("component", "db"),))] == 4
    assert ("rollback_last_run_ok", (("component", "config"), ("operation", "verify"))) in later


def test_concurrent_runs_keep_each_others_samples(tmp_path: Path):
    metrics = tmp_path / "rollback.prom"
    code = "import sys; from commands.metrics import record_run; record_run(*sys.argv[1:4], True, 1.0)"
    runs = [(component, operation) for component in ("config", "code", "db")
            for operation in ("backup", "restore", "verify")]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(metrics), *run], cwd=ROOT) for run in runs]
    assert [proc.wait(timeout=60) for proc in procs] == [0] * len(runs)

    families = {family.name: family for family in text_string_to_metric_families(metrics.read_text())}
    recorded = {(s.labels["component"], s.labels["operation"]) for s in families["rollback_last_run_ok"].samples}
    assert recorded == set(runs)


def test_metrics_file_option_works_after_and_before_the_subcommand(ws: Workspace):
    assert ws.run("backup", "--metrics-file", str(ws.metrics)).returncode == 0
    assert ws.value("rollback_last_run_ok", "backup") == 1
    assert ws.run("--metrics-file", str(ws.metrics), "verify").returncode == 0
    assert ws.value("rollback_last_run_ok", "verify") == 1


def test_dry_runs_and_listings_are_not_recorded_and_a_write_failure_is_only_a_warning(ws: Workspace):
    assert ws.run_recorded("list").returncode == 0
    assert ws.run_recorded("backup", "--dry-run").returncode == 0
    assert not ws.metrics.exists()

    result = ws.run("backup", METRICS_FILE=str(ws.root / "missing" / "rollback.prom"))
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "metrics file" in line]
    assert len(warnings) == 1 and "warning" in warnings[0]


def test_a_metrics_lock_someone_keeps_costs_a_warning_not_a_hang(ws: Workspace, tmp_path: Path):
    """A reader of the metrics (any user: the lock file is 0644) holding a shared flock must not keep a backup,
    or a point restore and its steps, from finishing: they used to wait forever once their work was done.

    Each recorded run waits the 5 s that --metrics-file's help promises, so the backup (of another config folder
    recording into the same file) runs beside the point restore, whose three recorded runs (its restore and
    verify steps, then rollback.py itself) wait one after the other."""
    other = make_workspace(tmp_path / "other")
    other.metrics = ws.metrics
    lock = Path(f"{ws.metrics}.lock")
    lock.touch(mode=0o644)
    held = os.open(lock, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_SH)
    try:
        with ThreadPoolExecutor(1) as beside:
            started = time.monotonic()
            backup = beside.submit(lambda: (other.run_recorded("backup"), time.monotonic() - started))
            point = run_script("rollback.py", "backup", env=ws.env, cwd=ws.root)  # not recorded: no METRICS_FILE
            assert point.returncode == 0, point.stderr
            (ws.config / "app.yml").write_text("server:\n  port: 9090\n")
            result = run_script("rollback.py", "restore", "latest", "--yes", "--no-system-check",
                                env={**ws.env, "METRICS_FILE": str(ws.metrics)}, cwd=ws.root, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "restored: configuration" in result.stdout and "to undo this restore" in result.stdout
            assert "not recorded in the metrics file" in result.stderr and "stayed locked" in result.stderr
            assert (ws.config / "app.yml").read_text() == "server:\n  port: 8080\n"

            result, took = backup.result()
        assert result.returncode == 0, result.stderr
        assert took < 30
        assert "not recorded in the metrics file" in result.stderr and "stayed locked" in result.stderr
        assert len(BackupStore(other.root / "config_backups", "config").backups()) == 1
    finally:
        os.close(held)
    assert not ws.metrics.exists()
    assert ws.run_recorded("verify").returncode == 0
    assert ws.value("rollback_last_run_ok", "verify") == 1


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_the_metrics_file_and_its_lock_are_0644_whatever_the_umask(ws: Workspace, umask: int):
    result = run_script("config_rollback.py", "backup", env={**ws.env, "METRICS_FILE": str(ws.metrics)},
                        cwd=ws.root, umask=umask)
    assert result.returncode == 0, result.stderr
    for path in (ws.metrics, Path(f"{ws.metrics}.lock")):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_restore_json_reports_its_rto(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("server:\n  port: 9090\n")
    result = ws.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    rto = json.loads(result.stdout)["rto"]
    assert rto["component"] == "config" and rto["operation"] == "restore"
    assert rto["objective"] == 300 and rto["met"] is True
    assert 0 < rto["seconds"] < 300


def test_a_missed_rto_is_a_warning_not_a_failure(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("server:\n  port: 9090\n")
    result = ws.run("--json", "--quiet", "restore", "latest", "--yes", RTO_CONFIG_SECONDS="0")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True
    assert document["rto"]["objective"] == 0 and document["rto"]["met"] is False
    assert "warning: restore took" in result.stderr and "OVER its 0 s RTO (config)" in result.stderr


def test_a_malformed_rto_setting_stops_the_restore_before_anything_changes(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("server:\n  port: 9090\n")
    result = ws.run("restore", "latest", "--yes", RTO_CONFIG_SECONDS="abc")
    assert result.returncode == 2
    assert "RTO_CONFIG_SECONDS" in result.stderr
    assert "9090" in (ws.config / "app.yml").read_text()
    assert len(json.loads(ws.run("--json", "list").stdout)["backups"]) == 1


def test_rto_settings_and_report_lines():
    assert rto_for(Settings({}, {}, None), "code") == 900
    assert rto_for(Settings({"RTO_DATABASE_SECONDS": " 90.5 "}, {}, None), "db") == 90.5
    for bad in ("abc", "-1", "nan"):
        with pytest.raises(SettingError, match="RTO_CONFIG_SECONDS"):
            rto_for(Settings({"RTO_CONFIG_SECONDS": bad}, {}, None), "config")
    assert RtoReport("config", "restore", 2.44, 300).line() == "restore took 2.4 s of its 300 s RTO (config)"
    assert RtoReport("config", "restore", 412, 300).line() == "restore took 412.0 s: OVER its 300 s RTO (config)"
