"""config_rollback.py end to end: real files, the script run as a real process."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml as pyyaml
from helpers import run_script, script_argv, tree_snapshot

from backup_store.store import BackupStore

APP_YML = """\
# Application settings.
# Every line here is documented; edits must keep these comments.

server:
  host: 0.0.0.0   # all interfaces
  port: 8080      # the public port
  workers: 4

database:
  url: "postgres://app@db/app"
  pool: {min: 2, max: 10}

features: [search, export]
"""

ENV = """\
# secrets for the app
DB_PASSWORD='s3cret value'
export API_URL="https://api.example.test/v1"  # upstream

DEBUG=false
"""


class Workspace:
    """A live configuration (folder and .env) and its backup store, in a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "config"
        self.env_file = root / ".env"
        self.store = root / "config_backups"
        self.env = {
            "CONFIG_DIR": str(self.config),
            "CONFIG_BACKUP_DIR": str(self.store),
            "ENV_FILE": str(self.env_file),
        }

    def run(self, *args: str, umask: int | None = None, **options) -> subprocess.CompletedProcess:
        """The script run in this workspace; `options` go to run_script (stdin, limits, timeout)."""
        return run_script("config_rollback.py", *args, env=self.env, cwd=self.root, umask=umask, **options)

    def backup_ids(self) -> list[str]:
        listing = self.run("--json", "list")
        assert listing.returncode == 0, listing.stderr
        return [b["id"] for b in json.loads(listing.stdout)["backups"]]

    def live(self) -> tuple[dict, bytes]:
        return tree_snapshot(self.config), self.env_file.read_bytes()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path)
    (ws.config / "sub").mkdir(parents=True)
    (ws.config / "app.yml").write_text(APP_YML)
    (ws.config / "db.json").write_text('{\n  "host": "db",\n  "port": 5432\n}\n')
    (ws.config / "sub" / "feature.yaml").write_text("enabled: true\n")
    (ws.config / "hook.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(ws.config / "hook.sh", 0o755)
    os.symlink("sub/feature.yaml", ws.config / "current.yaml")
    ws.env_file.write_text(ENV)
    os.chmod(ws.env_file, 0o600)
    return ws


def test_backup_then_restore_gives_back_exactly_the_backed_up_state(ws: Workspace):
    before = ws.live()
    result = ws.run("backup", "--label", "before-deploy")
    assert result.returncode == 0, result.stderr

    (ws.config / "app.yml").write_text("broken: [\n")
    os.chmod(ws.config / "hook.sh", 0o644)
    (ws.config / "sub" / "feature.yaml").unlink()
    (ws.config / "extra.yml").write_text("x: 1\n")
    (ws.config / "newdir").mkdir()
    os.unlink(ws.config / "current.yaml")
    os.symlink("app.yml", ws.config / "current.yaml")
    ws.env_file.write_text("DB_PASSWORD=other\n")

    result = ws.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert ws.live() == before
    assert (ws.config / "current.yaml").is_symlink()


def test_restore_takes_a_backup_first_so_it_can_be_undone(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("deployed: true\n")
    deployed = ws.live()

    result = ws.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    safety = json.loads(result.stdout)["safety_backup"]
    assert safety in ws.backup_ids()

    assert ws.run("restore", safety, "--yes").returncode == 0
    assert ws.live() == deployed


def test_restore_without_terminal_or_yes_changes_nothing(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("deployed: true\n")
    before = ws.live()
    result = ws.run("restore", "latest")
    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert ws.live() == before
    assert len(ws.backup_ids()) == 1


def test_restore_dry_run_lists_changes_and_changes_nothing(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "app.yml").write_text("deployed: true\n")
    before = ws.live()
    result = ws.run("restore", "latest", "--dry-run")
    assert result.returncode == 0
    assert f"  change     {ws.config}/app.yml" in result.stdout
    assert ws.live() == before


def test_restore_reports_what_it_does_and_verify_how_the_live_tree_differs(ws: Workspace):
    assert ws.run("backup").returncode == 0
    (ws.config / "sub" / "feature.yaml").unlink()
    (ws.config / ".flake8").write_text("[flake8]\n")
    (ws.config / "app.yml").write_text("deployed: true\n")
    ws.env_file.unlink()
    drift = ws.run("verify").stdout.splitlines()
    assert drift[-4:] == [f"  added    {ws.config}/.flake8", f"  removed  {ws.config}/sub/feature.yaml",
                          f"  changed  {ws.config}/app.yml", f"  removed  {ws.env_file}"]

    plan = ws.run("restore", "latest", "--dry-run")
    assert plan.stdout.splitlines() == [
        f"restoring {ws.backup_ids()[0]} would:", f"  re-create  {ws.config}/sub/feature.yaml",
        f"  delete     {ws.config}/.flake8", f"  change     {ws.config}/app.yml", f"  re-create  {ws.env_file}"]
    result = ws.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changes"] == {"re_created": ["sub/feature.yaml"], "deleted": [".flake8"],
                                                    "changed": ["app.yml"], "env_file": "re-created"}
    safety = json.loads(result.stdout)["safety_backup"]
    result = ws.run("restore", safety, "--yes")  # the undo: back to the deployed state
    assert result.stdout.splitlines()[:5] == [
        f"restored {safety}: 4 paths changed", f"  re-created {ws.config}/.flake8",
        f"  deleted    {ws.config}/sub/feature.yaml", f"  changed    {ws.config}/app.yml",
        f"  deleted    {ws.env_file}"]


def test_restore_accepts_folder_and_file_inside_it(ws: Workspace):
    assert ws.run("backup").returncode == 0
    backup_id = ws.backup_ids()[0]
    for ref in (str(ws.store / backup_id), str(ws.store / backup_id / "manifest.json"), backup_id):
        (ws.config / "app.yml").write_text(f"changed for {ref}\n")
        assert ws.run("restore", ref, "--yes", "--no-backup").returncode == 0
        assert (ws.config / "app.yml").read_text() == APP_YML
    assert ws.backup_ids() == [backup_id]


def test_unknown_backup_is_exit_2(ws: Workspace):
    result = ws.run("restore", "20200101T000000.000Z-config", "--yes")
    assert result.returncode == 2
    assert "list" in result.stderr


def test_damaged_backup_is_refused_by_restore_and_reported_by_verify(ws: Workspace):
    assert ws.run("backup").returncode == 0
    backup_id = ws.backup_ids()[0]
    payload = ws.store / backup_id / "config" / "app.yml"
    data = bytearray(payload.read_bytes())
    data[10] ^= 0x01
    payload.write_bytes(bytes(data))
    (ws.config / "app.yml").write_text("deployed: true\n")
    before = ws.live()

    result = ws.run("restore", "latest", "--yes")
    assert result.returncode == 1
    assert "damaged" in result.stderr and "app.yml" in result.stderr
    assert ws.live() == before
    assert ws.backup_ids() == [backup_id]

    result = ws.run("verify")
    assert result.returncode == 3
    assert "config/app.yml: checksum mismatch" in result.stdout


def test_update_yaml_changes_exactly_one_line_and_keeps_mode(ws: Workspace):
    target = ws.config / "app.yml"
    os.chmod(target, 0o640)
    result = ws.run("update", "app.yml", '{"server": {"port": 9090}}')
    assert result.returncode == 0, result.stderr
    old, new = APP_YML.splitlines(), target.read_text().splitlines()
    assert len(old) == len(new)
    changed = [(a, b) for a, b in zip(old, new, strict=False) if a != b]
    assert changed == [("  port: 8080      # the public port", "  port: 9090      # the public port")]
    assert target.stat().st_mode & 0o777 == 0o640
    assert "+  port: 9090" in result.stdout
    assert len(ws.backup_ids()) == 1  # the backup taken first


def test_update_writes_yaml_that_yaml_1_1_readers_read_as_the_json_meant(ws: Workspace):
    patch = {"server": {"tls": "on", "ratio": 1e300, "no": "yes", "at": "12:30"}, "features": ["off", "y"]}
    result = ws.run("update", "app.yml", json.dumps(patch))
    assert result.returncode == 0, result.stderr
    data = pyyaml.safe_load((ws.config / "app.yml").read_text())  # PyYAML reads YAML 1.1
    assert data["server"] == {"host": "0.0.0.0", "port": 8080, "workers": 4, **patch["server"]}
    assert data["features"] == ["off", "y"]


def test_update_null_deletes_a_key(ws: Workspace):
    result = ws.run("update", "app.yml", '{"server": {"workers": null}}')
    assert result.returncode == 0, result.stderr
    text = (ws.config / "app.yml").read_text()
    assert "workers" not in text
    assert text == APP_YML.replace("  workers: 4\n", "")


def test_update_env_keeps_comments_and_quotes_and_masks_secrets(ws: Workspace):
    result = ws.run("update", str(ws.env_file), '{"DEBUG": "true", "DB_PASSWORD": "n3w pass"}')
    assert result.returncode == 0, result.stderr
    lines = ws.env_file.read_text().splitlines()
    assert lines[0] == "# secrets for the app"
    assert lines[2] == 'export API_URL="https://api.example.test/v1"  # upstream'
    assert lines[3] == ""
    assert "DEBUG=true" in lines
    assert "n3w pass" not in result.stdout and "s3cret" not in result.stdout
    from dotenv import dotenv_values

    assert dotenv_values(ws.env_file)["DB_PASSWORD"] == "n3w pass"
    assert ws.env_file.stat().st_mode & 0o777 == 0o600
    audit = (ws.store / "audit.log").read_text()
    assert "n3w pass" not in audit and "<redacted>" in audit


@pytest.mark.parametrize("source", ["stdin", "file"])
def test_update_reads_the_patch_from_stdin_or_a_file_and_never_records_it(ws: Workspace, source: str):
    patch = json.dumps({"DB_PASSWORD": "r0tated secret"})
    (ws.root / "rotated.json").write_text("\ufeff" + patch)  # as some editors save it
    args = ["-"] if source == "stdin" else ["--patch-file", str(ws.root / "rotated.json")]
    result = ws.run("update", str(ws.env_file), *args, stdin=patch)
    assert result.returncode == 0, result.stderr
    from dotenv import dotenv_values

    assert dotenv_values(ws.env_file)["DB_PASSWORD"] == "r0tated secret"
    assert "r0tated" not in result.stdout + result.stderr
    audit = (ws.store / "audit.log").read_text()
    assert "r0tated" not in audit and json.loads(audit)["arguments"]["patch"] == "<redacted>"


@pytest.mark.parametrize(("args", "message"), [
    ([], "give the patch once"),
    (['{"A": 1}', "--patch-file", "p.json"], "give the patch once"),
    (["--patch-file", "missing.json"], "cannot read the patch file missing.json: No such file or directory"),
    (["--patch-file", "latin1.json"], "the patch in latin1.json is not UTF-8 text"),
    (["--patch-file", "/dev/zero"], "the patch in /dev/zero is larger than 16 MiB"),
])
def test_update_needs_exactly_one_readable_patch(ws: Workspace, args: list[str], message: str):
    (ws.root / "p.json").write_text('{"A": 1}')
    (ws.root / "latin1.json").write_bytes(b'{"A": "caf\xe9"}')
    before = ws.live()
    result = ws.run("update", "app.yml", *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and f"config_rollback.py: error: {message}" in result.stderr
    assert ws.live() == before and ws.backup_ids() == []


def test_update_dry_run_shows_diff_and_changes_nothing(ws: Workspace):
    before = ws.live()
    result = ws.run("update", "db.json", '{"port": 6432}', "--dry-run")
    assert result.returncode == 0
    assert '+  "port": 6432' in result.stdout
    assert ws.live() == before
    assert ws.backup_ids() == []


@pytest.mark.parametrize(
    "name",
    ["../.env.example", "/etc/hostname", "sub/../../outside.yml", "escape.yml"],
)
def test_update_refuses_paths_outside_config_dir(ws: Workspace, name: str):
    (ws.root / "outside.yml").write_text("a: 1\n")
    (ws.root / ".env.example").write_text("A=1\n")
    os.symlink(ws.root / "outside.yml", ws.config / "escape.yml")
    before = ws.live(), (ws.root / "outside.yml").read_bytes()
    result = ws.run("update", name, '{"a": 2}')
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (ws.live(), (ws.root / "outside.yml").read_bytes()) == before
    assert ws.backup_ids() == []


@pytest.mark.parametrize(
    ("name", "patch", "message"),
    [
        ("app.yml", "{not json", "JSON"),
        ("app.yml", "[1, 2]", "object"),
        ("list.yml", '{"a": 1}', "mapping"),
        ("notes.txt", '{"a": 1}', "unknown file type"),
        ("missing.yml", '{"a": 1}', "no such file"),
        ("app.yml/", '{"a": 1}', "app.yml/ names a folder"),
        ("sub/feature.yaml/.", '{"a": 1}', "names a folder"),
        ("{env_file}/", '{"A": 1}', ".env/ names a folder"),
    ],
)
def test_update_bad_input_is_exit_2_with_nothing_changed(ws: Workspace, name: str, patch: str, message: str):
    (ws.config / "list.yml").write_text("- a\n- b\n")
    (ws.config / "notes.txt").write_text("hello\n")
    before = ws.live()
    result = ws.run("update", name.format(env_file=ws.env_file), patch)
    assert result.returncode == 2, result.stderr
    assert message.lower() in result.stderr.lower()
    assert ws.live() == before
    assert ws.backup_ids() == []


def test_alias_bomb_is_refused_at_once_and_frees_the_lock(ws: Workspace):
    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (ws.config / "bomb.yml").write_text("\n".join(levels) + "\nport: 1\n")
    before = ws.live()
    started = time.monotonic()
    # With 1 GiB of memory at most, a run that expanded the aliases would fail, not take the machine's.
    result = ws.run("update", "bomb.yml", '{"port": 2}', limits={resource.RLIMIT_AS: 1 << 30}, timeout=30)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 10
    assert result.stderr.strip().splitlines() == [
        "config_rollback.py: error: the YAML file is refused: line 6 column 10: aliases expand the document by "
        "more than 100,000 values (an alias bomb?)"]
    assert ws.live() == before and ws.backup_ids() == []
    assert ws.run("backup").returncode == 0  # the lock was let go

    result = ws.run("verify", limits={resource.RLIMIT_AS: 1 << 30}, timeout=30)
    assert result.returncode == 3
    assert "bomb.yml:6:10: aliases expand the document by more than 100,000 values" in result.stdout


@pytest.mark.parametrize(("file", "patch", "message"), [
    ("app.yml", '{"a": ' + "[" * 900 + "]" * 900 + "}", "the patch is refused: nested deeper than 100 levels"),
    ("app.yml", '{"a": 1e999}', "the patch is refused: 1e999 is beyond the range of a number"),
    ("app.yml", '{"a": NaN}', "the patch is not valid JSON: NaN is not a JSON value"),
    ("deep.json", '{"a": 1}', "the JSON file is refused: line 1 column 106: nested deeper than 100 levels"),
])
def test_update_refuses_what_it_cannot_hold_with_exit_2(ws: Workspace, file: str, patch: str, message: str):
    (ws.config / "deep.json").write_text('{"a": ' + "[" * 900 + "]" * 900 + "}\n")
    before = ws.live()
    result = ws.run("update", file, patch)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert ws.live() == before and ws.backup_ids() == []


def test_verify_names_broken_file_with_line_and_column(ws: Workspace):
    (ws.config / "broken.json").write_text('{\n  "a": 1,\n  "b": \n}\n')
    result = ws.run("verify")
    assert result.returncode == 3
    assert "broken.json:4:1" in result.stdout


def test_verify_checks_env_file_privacy_and_example_keys(ws: Workspace):
    (ws.root / ".env.example").write_text("DB_PASSWORD=\nAPI_URL=\nSENTRY_DSN=\n")
    os.chmod(ws.env_file, 0o644)
    result = ws.run("--json", "verify")
    assert result.returncode == 3
    problems = json.loads(result.stdout)["problems"]
    assert any("readable by group or others" in p for p in problems)
    assert any("SENTRY_DSN" in p and "API_URL" not in p for p in problems)


def test_verify_reports_drift_and_fails_only_with_against(ws: Workspace):
    assert ws.run("backup").returncode == 0
    result = ws.run("verify")
    assert result.returncode == 0, result.stdout
    (ws.config / "app.yml").write_text("a: 1\n")
    (ws.config / "sub" / "feature.yaml").unlink()
    (ws.config / "added.yml").write_text("b: 2\n")

    result = ws.run("--json", "verify")
    assert result.returncode == 0
    drift = json.loads(result.stdout)["drift"]
    assert drift["changed"] == ["app.yml"]
    assert drift["removed"] == ["sub/feature.yaml"]
    assert drift["added"] == ["added.yml"]

    result = ws.run("verify", "--against", "latest")
    assert result.returncode == 3
    assert "app.yml" in result.stdout and "sub/feature.yaml" in result.stdout and "added.yml" in result.stdout


def test_second_run_while_lock_is_held_exits_75(ws: Workspace):
    store = BackupStore(ws.store, "config")
    with store.lock("a test holding the lock"):
        result = ws.run("backup")
    assert result.returncode == 75
    assert "a test holding the lock" in result.stderr
    assert ws.backup_ids() == []
    assert ws.run("backup").returncode == 0


def test_sigkill_mid_backup_leaves_no_backup_in_list(ws: Workspace):
    with open(ws.config / "big.bin", "wb") as big:
        for _ in range(256):
            big.write(os.urandom(1024 * 1024))
    proc = subprocess.Popen(script_argv("config_rollback.py", "backup"), cwd=ws.root,
                            env={**os.environ, **ws.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (ws.store.is_dir() and any(p.name.startswith(".staging-") for p in ws.store.iterdir())):
        assert proc.poll() is None, "the backup ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert ws.backup_ids() == []

    # The leftover is swept by cleanup, and the next backup is whole.
    result = ws.run("cleanup", "30")
    assert result.returncode == 0
    assert not [p for p in ws.store.iterdir() if p.name.startswith(".staging-")]
    assert ws.run("backup").returncode == 0
    assert ws.run("verify").returncode == 0


def test_backups_are_private_under_umask_022(ws: Workspace):
    assert ws.run("backup", umask=0o022).returncode == 0
    for dirpath, _dirnames, filenames in os.walk(ws.store):
        assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                assert path.stat().st_mode & 0o777 == 0o600, path


def test_cleanup_keeps_newest_and_never_the_only_backup(ws: Workspace):
    for _ in range(4):
        assert ws.run("backup").returncode == 0
    ids = ws.backup_ids()

    result = ws.run("--json", "cleanup", "0", "--keep", "2", "--dry-run")
    assert result.returncode == 0
    assert json.loads(result.stdout)["would_remove"] == ids[2:]
    assert ws.backup_ids() == ids

    assert ws.run("cleanup", "30", "--keep", "1").returncode == 0
    assert ws.backup_ids() == ids  # none older than 30 days

    assert ws.run("cleanup", "0", "--keep", "2").returncode == 0
    assert ws.backup_ids() == ids[:2]

    assert ws.run("cleanup", "0", "--keep", "0").returncode == 2
    assert ws.run("cleanup", "0", "--keep", "1").returncode == 0
    assert ws.backup_ids() == ids[:1]


def test_list_shows_newest_first_with_label(ws: Workspace):
    assert ws.run("backup", "--label", "one").returncode == 0
    assert ws.run("backup", "--label", "two").returncode == 0
    result = ws.run("list")
    assert result.returncode == 0
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["ID", "TIME", "(UTC)", "FILES"]
    assert rows[1].endswith("two") and rows[2].endswith("one")


@pytest.mark.parametrize(
    "args",
    [["backup"], ["list"], ["verify"], ["cleanup", "30"], ["update", "app.yml", '{"a": 1}'],
     ["restore", "latest", "--yes"], ["restore", "nonexistent", "--yes"]],
)
def test_json_output_is_one_document(ws: Workspace, args: list[str]):
    assert ws.run("backup").returncode == 0
    result = ws.run("--json", *args)
    document = json.loads(result.stdout)
    assert document["ok"] is (result.returncode == 0)
    assert document["command"] == args[0]


def test_missing_setting_file_and_config_dir_are_one_line_errors(ws: Workspace):
    result = ws.run("--env-file", str(ws.root / "nope.env"), "list")
    assert result.returncode == 2
    message = f"config_rollback.py: error: --env-file {ws.root / 'nope.env'}: no such file"
    assert result.stderr.strip().splitlines() == [message]

    ws.env["CONFIG_DIR"] = str(ws.root / "missing")
    result = ws.run("backup")
    assert result.returncode == 2
    assert "CONFIG_DIR" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_settings_come_from_env_file_when_not_in_environment(ws: Workspace):
    settings = ws.root / "toolkit.env"
    settings.write_text(f"CONFIG_DIR={ws.config}\nCONFIG_BACKUP_DIR={ws.root / 'other_store'}\n")
    env = dict(ws.env)
    del ws.env["CONFIG_BACKUP_DIR"]
    result = ws.run("--env-file", str(settings), "backup")
    assert result.returncode == 0, result.stderr
    assert len(list((ws.root / "other_store").glob("*Z-config-*"))) == 1
    ws.env = env  # the environment wins over the file
    assert ws.run("--env-file", str(settings), "backup").returncode == 0
    assert len(ws.backup_ids()) == 1


def test_audit_log_records_each_run(ws: Workspace):
    assert ws.run("backup", "--label", "x").returncode == 0
    assert ws.run("restore", "nonexistent", "--yes").returncode == 2
    records = [json.loads(line) for line in (ws.store / "audit.log").read_text().splitlines()]
    assert [r["command"] for r in records] == ["backup", "restore"]
    assert records[0]["result"] == "ok" and records[0]["backup_ids"] == ws.backup_ids()
    assert records[1]["exit_code"] == 2 and "nonexistent" in records[1]["result"]
    assert (ws.store / "audit.log").stat().st_mode & 0o777 == 0o600


def test_restore_puts_a_file_back_where_a_folder_now_stands(ws: Workspace):
    before = ws.live()
    assert ws.run("backup").returncode == 0
    (ws.config / "db.json").unlink()
    (ws.config / "db.json").mkdir()
    (ws.config / "db.json" / "inner.yml").write_text("x: 1\n")
    result = ws.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert ws.live() == before


FILE_SIZE_LIMIT = {resource.RLIMIT_FSIZE: 32 * 1024}  # a file written past 32 KiB fails, like on a full disk


def temporary_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp-" in path.name or path.name.startswith(".staging")]


@pytest.mark.parametrize("too_big", ["config/big.json", ".env"])
def test_restore_that_cannot_write_a_file_changes_nothing_and_leaves_nothing_behind(ws: Workspace, too_big: str):
    (ws.config / "big.json").write_text("{}\n")
    (ws.root / too_big).write_text("BLOB=" + "x" * 64 * 1024 + "\n")  # past the limit
    (ws.config / "newdir" / "inner").mkdir(parents=True)
    (ws.config / "newdir" / "inner" / "a.yml").write_text("a: 1\n")
    assert ws.run("backup").returncode == 0
    (ws.config / "big.json").unlink()
    shutil.rmtree(ws.config / "newdir")
    shutil.rmtree(ws.config / "sub")
    (ws.config / "sub").write_text("a file where the backup has a folder\n")
    (ws.config / "app.yml").write_text("deployed: true\n")
    ws.env_file.write_text("DB_PASSWORD=deployed\n")
    before = ws.live()

    result = ws.run("restore", "latest", "--yes", limits=FILE_SIZE_LIMIT)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"config_rollback.py: error: could not write {ws.root / too_big}: File too large; nothing was changed"]
    assert ws.live() == before
    assert temporary_files(ws.root) == []
    assert ws.run("restore", "latest", "--yes").returncode == 0  # with room to write, the same restore works


def test_update_that_cannot_write_the_file_names_it_and_leaves_nothing_behind(ws: Workspace):
    before = ws.live()
    patch = json.dumps({"notes": "x" * 40 * 1024})
    result = ws.run("update", "app.yml", "-", stdin=patch, limits=FILE_SIZE_LIMIT)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"config_rollback.py: error: could not write {ws.config}/app.yml: File too large; the file was left as it was"]
    assert ws.live() == before
    assert temporary_files(ws.root) == []


def test_restore_after_config_dir_was_deleted(ws: Workspace):
    before = ws.live()
    assert ws.run("backup").returncode == 0
    import shutil

    shutil.rmtree(ws.config)
    ws.env_file.write_text("DB_PASSWORD=changed\n")
    result = ws.run("--json", "restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert ws.live() == before
    safety = json.loads(result.stdout)["safety_backup"]
    assert (ws.store / safety / "env_file").read_text() == "DB_PASSWORD=changed\n"


def test_latest_is_the_restore_point_not_the_safety_backup(ws: Workspace):
    before = ws.live()
    assert ws.run("backup", "--label", "restore point").returncode == 0
    (ws.config / "app.yml").write_text("deployed: true\n")
    assert ws.run("restore", "latest", "--yes").returncode == 0
    assert ws.run("restore", "latest", "--yes").returncode == 0  # a retried restore stays where it was
    assert ws.live() == before
    assert "(safety) before restore of" in ws.run("list").stdout


def test_audit_log_setting_moves_the_log(ws: Workspace):
    ws.env["AUDIT_LOG"] = str(ws.root / "logs" / "rollback.log")
    assert ws.run("list").returncode == 0
    records = (ws.root / "logs" / "rollback.log").read_text().splitlines()
    assert [json.loads(line)["command"] for line in records] == ["list"]
    assert (ws.root / "logs" / "rollback.log").stat().st_mode & 0o777 == 0o600
    assert not (ws.store / "audit.log").exists()


def test_a_config_dir_that_is_a_symlink_stays_one_and_keeps_its_files(tmp_path: Path):
    real = tmp_path / "real-config"
    (real / "sub").mkdir(parents=True)
    (real / "app.yml").write_text(APP_YML)
    (real / "sub" / "feature.yaml").write_text("enabled: true\n")
    os.chmod(real, 0o750)
    ws = Workspace(tmp_path)
    os.symlink(real, ws.config)
    ws.env_file.write_text(ENV)
    assert ws.run("backup").returncode == 0
    before = tree_snapshot(real)

    result = ws.run("--json", "restore", "latest", "--yes")  # nothing differs: nothing may change
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["restored"] is False
    (real / "app.yml").write_text("broken: [\n")
    (real / "sub" / "feature.yaml").unlink()
    result = ws.run("restore", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert ws.config.is_symlink() and os.readlink(ws.config) == str(real)
    assert tree_snapshot(real) == before and (real.stat().st_mode & 0o7777) == 0o750
