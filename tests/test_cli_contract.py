"""What every script promises at its edges: settings read strictly, one-line errors, a pipe closed early."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, run_script, script_argv

from common.settings import KNOWN_SETTINGS


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "app.yml").write_text("port: 8080\n")
    return tmp_path


def config(site: Path, *args: str, limits: dict[int, int] | None = None, **env: str) -> subprocess.CompletedProcess:
    return run_script("config_rollback.py", *args, cwd=site, limits=limits, timeout=60,
                      env={"CONFIG_DIR": str(site / "config"), "CONFIG_BACKUP_DIR": str(site / "store"),
                           "ENV_FILE": str(site / "app.env"), **env})


def test_a_malformed_line_in_the_settings_file_stops_the_run(site: Path):
    (site / "settings.env").write_text("DB_NAME=app\nDB_PASSWORD hunter2\n")
    result = config(site, "--env-file", str(site / "settings.env"), "backup")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config_rollback.py: error: settings file {site / 'settings.env'}, line 2: not KEY=value "
        "(e.g. DB_PORT=5432); fix or remove the line"]
    assert "hunter2" not in result.stderr + result.stdout
    assert not [p for p in (site / "store").glob("*") if p.name != "audit.log"]  # no backup; the refusal is audited
    audit = [json.loads(line) for line in (site / "store" / "audit.log").read_text().splitlines()]
    assert audit[-1]["exit_code"] == 2 and "hunter2" not in json.dumps(audit)


def test_a_near_miss_of_a_setting_is_warned_about(site: Path):
    (site / ".env").write_text("CONFG_DIR=elsewhere\nDB_PASWORD=x\nAPI_URL=https://example.test\n")
    result = config(site, "list")
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2
    assert "CONFG_DIR is not a setting of the toolkit: did you mean CONFIG_DIR?" in warnings[0]
    assert "did you mean DB_PASSWORD?" in warnings[1] and "API_URL" not in result.stderr


def test_every_setting_is_in_readme_and_known():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| (.*?) \|", table, re.M)) - {"variable", "---"}
    documented = {name for cell in documented for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}
    assert documented == KNOWN_SETTINGS
    read = set()
    for path in ROOT.glob("**/*.py"):
        if "tests" in path.parts or any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue  # the tests, and virtual environments (.venv, .venv-system ...)
        read |= set(re.findall(r"settings\.(?:text|path|integer|number|raw)\(\s*\"([A-Z][A-Z0-9_]+)\"",
                               path.read_text()))
        read |= set(re.findall(r"\(\"([A-Z][A-Z0-9_]+_(?:DIR|SECONDS|FILE))\", ", path.read_text()))
    assert read <= KNOWN_SETTINGS, read - KNOWN_SETTINGS


def test_a_bucket_name_is_refused_for_its_real_reason(site: Path):
    result = config(site, "list", "--remote", REMOTE_URL="s3://bk/app1")
    assert result.returncode == 2
    assert "the bucket name 'bk' has 2 characters; S3 bucket names have 3 to 63" in result.stderr


def test_a_reader_that_has_gone_is_not_an_error(site: Path):
    assert config(site, "backup").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `list | head` once head has exited: every write finds no reader
    env = {**os.environ, "CONFIG_DIR": str(site / "config"), "CONFIG_BACKUP_DIR": str(site / "store")}
    done = subprocess.run(script_argv("config_rollback.py", "list"), cwd=site, env=env, stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert done.returncode == 0 and done.stderr == ""


def test_cleanup_dry_run_names_the_leftovers_the_real_run_removes(site: Path):
    assert config(site, "backup").returncode == 0
    leftover = site / "store" / ".staging-20260101T000000.000Z-config"
    leftover.mkdir()
    cut_off = site / "store" / ".deployed.json.tmp-0123abcd"  # an atomic write that a kill cut off
    cut_off.write_text("{")
    names = sorted([cut_off.name, leftover.name])
    result = config(site, "--json", "--dry-run", "cleanup", "30")
    assert json.loads(result.stdout)["would_remove_leftovers"] == names and leftover.is_dir() and cut_off.is_file()
    assert "would remove unfinished .staging-" in config(site, "--dry-run", "cleanup", "30").stdout
    result = config(site, "--json", "cleanup", "30")
    assert json.loads(result.stdout)["leftovers_removed"] == names
    assert not leftover.exists() and not cut_off.exists()
    assert "would remove" not in config(site, "--dry-run", "cleanup", "30").stdout


def test_backups_inside_the_config_folder_are_refused_at_start(site: Path):
    for command in (["backup"], ["list"], ["verify"]):
        result = config(site, *command, CONFIG_BACKUP_DIR=str(site / "config" / "backups"))
        assert result.returncode == 2 and "is inside CONFIG_DIR" in result.stderr
    assert not (site / "config" / "backups").exists()


def test_a_settings_file_that_expands_without_bound_is_refused_at_once(site: Path):
    lines = ["A=xxxxxxxxxx"] + [f"V{i}=${{{'A' if i == 0 else f'V{i - 1}'}}}${{{'A' if i == 0 else f'V{i - 1}'}}}"
                                for i in range(40)]  # V39 would be 10 * 2**40 bytes
    (site / "settings.env").write_text("\n".join(lines) + "\n")
    # Under 1 GiB of address space: without the bound, the run would die of it instead of exiting 2.
    result = config(site, "--env-file", str(site / "settings.env"), "list", limits={resource.RLIMIT_AS: 1 << 30})
    assert result.returncode == 2 and "pass 1 MiB: refused" in result.stderr
    (site / "settings.env").write_text("A=x\nB=${A}/y\nC=${MISSING:-z}\n")
    assert config(site, "--env-file", str(site / "settings.env"), "list").returncode == 0


def test_a_label_with_line_breaks_and_terminal_escapes_lists_as_one_escaped_row(site: Path):
    label = "release 2\nFAKE-ID  2020-01-01\rover\x1b[2J\x1b[31mred\u202eevil"
    shown = "release 2\\nFAKE-ID  2020-01-01\\rover\\x1b[2J\\x1b[31mred\\u202eevil"
    env = {"CONFIG_DIR": str(site / "config"), "CONFIG_BACKUP_DIR": str(site / "store"),
           "ENV_FILE": str(site / "app.env"), "POINTS_DIR": str(site / "points")}
    assert config(site, "backup", "--label", label).returncode == 0
    assert run_script("rollback.py", "backup", "--label", label, env=env, cwd=site).returncode == 0
    for script in ("config_rollback.py", "rollback.py"):
        result = run_script(script, "list", env=env, cwd=site)
        assert result.returncode == 0, result.stderr
        rows = result.stdout.splitlines()
        assert len(rows) == (3 if script == "config_rollback.py" else 2), rows  # the header and a row a backup
        assert all(shown in row for row in rows[1:]) and "\x1b" not in result.stdout and "\r" not in result.stdout
        listed = json.loads(run_script(script, "--json", "list", env=env, cwd=site).stdout)
        found = listed["backups"] if script == "config_rollback.py" else listed["points"]
        assert found[0]["label"].startswith(label)  # --json keeps the label as it is


def test_a_password_in_a_health_url_is_masked_in_the_audit_log_and_the_errors(site: Path):
    env = {"CONFIG_DIR": str(site / "config"), "CONFIG_BACKUP_DIR": str(site / "store"),
           "POINTS_DIR": str(site / "points")}
    result = run_script("rollback.py", "verify", "--no-system-check", "--health-requests", "1",
                        "--health-url", "http://ops:hunter2@127.0.0.1:1/health", env=env, cwd=site)
    assert result.returncode == 3, result.stderr
    result = run_script("rollback.py", "verify", env={**env, "HEALTHCHECK_URL": "ftp://ops:hunter2@127.0.0.1/"},
                        cwd=site)
    assert result.returncode == 2 and "ftp://ops:********@127.0.0.1/" in result.stderr
    audit = (site / "points" / "audit.log").read_text()
    assert "hunter2" not in audit + result.stderr + result.stdout
    assert [json.loads(line)["arguments"]["health_url"] for line in audit.splitlines()] == [
        "http://ops:********@127.0.0.1:1/health", None]


def test_relative_paths_in_an_env_file_are_relative_to_its_folder(site: Path):
    """Run from another folder, `list` said "no backups" (exit 0) and stores appeared wherever it ran."""
    (site / "settings.env").write_text("CONFIG_DIR=./config\nCONFIG_BACKUP_DIR=store\nENV_FILE=./app.env\n"
                                       "PRE_RESTORE_HOOK=hooks/stop-app --now\n")
    (site / "hooks").mkdir()
    (site / "hooks" / "stop-app").write_text("#!/bin/sh\ntouch \"$(dirname \"$0\")/stopped\"\n")
    (site / "hooks" / "stop-app").chmod(0o755)
    elsewhere = site / "elsewhere"
    elsewhere.mkdir()
    settings = str(Path("..") / "settings.env")  # relative itself, to the working folder
    for cwd in (site, elsewhere):
        result = run_script("config_rollback.py", "--env-file", settings if cwd == elsewhere else "settings.env",
                            "backup", env={}, cwd=cwd)
        assert result.returncode == 0, result.stderr
    listed = run_script("config_rollback.py", "--json", "--env-file", settings, "list", env={}, cwd=elsewhere)
    assert len(json.loads(listed.stdout)["backups"]) == 2
    # A default is the file's folder's too; a relative path from the environment is the working folder's.
    result = run_script("rollback.py", "--env-file", settings, "backup", env={}, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert (site / "restore_points").is_dir() and list(elsewhere.iterdir()) == []
    result = run_script("rollback.py", "--env-file", settings, "restore", "latest", "--yes", "--no-system-check",
                        env={}, cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "hooks" / "stopped").exists()  # the hook's program, relative to the settings file too
    result = run_script("config_rollback.py", "--env-file", settings, "backup", env={"CONFIG_BACKUP_DIR": "here"},
                        cwd=elsewhere)
    assert result.returncode == 0 and [p.name for p in elsewhere.iterdir()] == ["here"]
