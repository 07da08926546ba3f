"""The benchmarks in their quick mode, run as whole processes on the suite's own servers: a benchmark that
no longer runs fails here, not months later when someone wants its figures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, script_argv
from pg_cluster import ThrowawayCluster
from s3_server import Bucket, LocalS3

sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402 - bench/ is not a package

NUMBER = r"\d+(?:\.\d+)?"
TIMEOUT_SECONDS = 300


@dataclass
class QuickRun:
    """One benchmark started with --quick, its output going to files."""

    proc: subprocess.Popen
    stdout: Path
    stderr: Path

    def finish(self) -> subprocess.CompletedProcess:
        """Wait for the run; its exit code and output."""
        self.proc.wait(TIMEOUT_SECONDS)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.stdout.read_text(),
                                           self.stderr.read_text())


def start_quick(benchmark: str, folder: Path, **settings: str) -> QuickRun:
    """bench/BENCHMARK --quick in `folder` (its temporary files too), in a process group of its own, with only
    `settings` among the BENCH_* variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BENCH_")}
    (folder / "tmp").mkdir(parents=True)
    stdout, stderr = folder / "stdout", folder / "stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / benchmark), "--quick"],
                                env={**env, "TMPDIR": str(folder / "tmp"), **settings}, cwd=folder,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    return QuickRun(proc, stdout, stderr)


def assert_figures(result: subprocess.CompletedProcess, *patterns: str) -> None:
    """Exit 0, and one printed line matching each pattern."""
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(harness.QUICK_BANNER), result.stdout
    for pattern in patterns:
        assert re.search(pattern, result.stdout, re.MULTILINE), f"no line matching {pattern!r} in:\n{result.stdout}"


@pytest.fixture(scope="module")
def bench_bucket(s3_server: LocalS3) -> Bucket:
    """The bucket the remote benchmark writes into."""
    return Bucket(s3_server)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory, pg_cluster: ThrowawayCluster, s3_server: LocalS3,
               bench_bucket: Bucket) -> Iterator[dict[str, QuickRun]]:
    """Every quick run, started together: on two cores they take about half as long as one after another."""
    work = tmp_path_factory.mktemp("bench")
    s3 = {"BENCH_S3_ENDPOINT_URL": s3_server.endpoint,
          **{key: value for key, value in bench_bucket.env.items() if key.startswith("AWS_")}}
    # What a shell may hold must not reach the commands a benchmark times: a .env in the folder it is started
    # from (this one stops the toolkit: not KEY=value) and settings that would push every backup somewhere.
    (work / "config").mkdir()
    (work / "config" / ".env").write_text("CONFIG_DIR /nowhere\n")
    shell = {"REMOTE_AUTO_PUSH": "1", "REMOTE_URL": "s3://not-for-benchmarks/x", "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    runs = {
        "config": start_quick("config_bench.py", work / "config", **shell),
        "code": start_quick("code_bench.py", work / "code"),
        "help": start_quick("help_bench.py", work / "help"),
        "db": start_quick("db_bench.py", work / "db", BENCH_DB_HOST=pg_cluster.host,
                          BENCH_DB_PORT=str(pg_cluster.port), BENCH_DB_USER=pg_cluster.user,
                          BENCH_DB_PASSWORD=pg_cluster.password),
        "remote": start_quick("remote_bench.py", work / "remote", BENCH_S3_BUCKET=bench_bucket.name, **s3),
        # A bucket of its own: the remote benchmark's test checks that it wrote under one prefix of its bucket.
        "retention": start_quick("retention_bench.py", work / "retention", BENCH_S3_BUCKET=Bucket(s3_server).name,
                                 **s3),
        "remote, no such bucket": start_quick("remote_bench.py", work / "failing", BENCH_S3_BUCKET="no-such-bucket",
                                              **s3),
    }
    yield runs
    for run in runs.values():  # a test that failed early left its run going, maybe with a child
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()


def test_config_benchmark_quick_mode_prints_every_ratio_whatever_the_shell_holds(quick_runs: dict[str, QuickRun]):
    result = quick_runs["config"].finish()
    against_cp = rf"\s+{NUMBER} ms\s+{NUMBER}x cp -a$"
    assert_figures(result, rf"^  --help{against_cp}", rf"^  update \(one YAML key, with its backup\){against_cp}",
                   rf"^  restore, all 50 files differ{against_cp}", rf"^  restore, one file differs{against_cp}",
                   rf"^  cp -a of the tree{against_cp}")


def test_help_benchmark_quick_mode_times_each_script_beside_the_bare_interpreter(quick_runs: dict[str, QuickRun]):
    result = quick_runs["help"].finish()
    assert_figures(result, rf"^  python -c pass\s+{NUMBER} ms$",
                   *(rf"^  {script} --help\s+{NUMBER} ms\s+target < 150 ms: (met|MISSED)$"
                     for script in ("config_rollback.py", "code_rollback.py", "database_rollback.py", "rollback.py")))


def test_code_benchmark_quick_mode_sets_each_step_beside_rsync_restic_and_borg(quick_runs: dict[str, QuickRun]):
    result = quick_runs["code"].finish()
    peers = rf"\[rsync {NUMBER} s  restic {NUMBER} s  borg {NUMBER} s\]$"
    ratio = rf"{NUMBER} s\s+{NUMBER}x fastest peer \((rsync|restic|borg)\)"
    assert_figures(result, rf"^  first backup\s+{ratio}\s+goal <= 1.0: (met|MISSED)\s+{peers}",
                   rf"^  unchanged backup\s+{ratio}\s+goal <= 0.5: (met|MISSED)\s+{peers}",
                   rf"^  restore\s+{ratio}\s+goal <= 1.0: (met|MISSED)\s+{peers}",
                   rf"^  kept switch\s+{NUMBER} s\s+{NUMBER}x fastest peer's restore\s+goal <= 0.1: (met|MISSED)$",
                   rf"^  round: first ours {NUMBER} rsync {NUMBER} restic {NUMBER} borg {NUMBER} \| second ",
                   rf"^  two backups on disk\s+{NUMBER}x the tree\s+goal <= 1.1: (met|MISSED)$")


def test_db_benchmark_quick_mode_runs_on_the_suites_server(quick_runs: dict[str, QuickRun],
                                                           pg_cluster: ThrowawayCluster):
    result = quick_runs["db"].finish()
    assert_figures(result, rf"^  backup\s+{NUMBER} s\s+pg_dump -Fc\s+{NUMBER} s\s+ratio {NUMBER}",
                   rf"^  restore\s+{NUMBER} s\s+pg_restore\s+{NUMBER} s\s+ratio {NUMBER}",
                   rf"^  outage\s+{NUMBER} ms longest gap",
                   rf"^  changes\s+{NUMBER} s\s+EXCEPT in psql\s+{NUMBER} s\s+ratio {NUMBER}\s+\(target <= 1\.50; "
                   rf"1000 rows differ",  # at scale 1: 800 updated, 100 deleted, 100 inserted
                   rf"^  changes\s+peak memory {NUMBER} MiB \(target < 200 MiB\); with --sql {NUMBER} s, {NUMBER} MiB")
    # The server is shared: the benchmark's databases, EXCEPT's and those its restore kept, are gone.
    conn = pg_cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench%'")
            assert cur.fetchall() == []
    finally:
        conn.close()


def test_remote_benchmark_quick_mode_runs_on_the_suites_server(quick_runs: dict[str, QuickRun],
                                                               bench_bucket: Bucket):
    result = quick_runs["remote"].finish()
    assert_figures(result, rf"^  push of a 2 MB dump\s+{NUMBER} s\s+boto3 upload_file\s+{NUMBER} s\s+{NUMBER}x",
                   rf"^  pull of it\s+{NUMBER} s\s+boto3 download_file\s+{NUMBER} s\s+{NUMBER}x",
                   rf"^  push of an unchanged 100-file code backup\s+{NUMBER} s .* {NUMBER} KiB sent")
    written = {key.split("/")[0] for key in bench_bucket.objects()}
    assert len(written) == 1 and written.pop().startswith("bench-")  # all under one prefix of its own


def test_retention_benchmark_quick_mode_cleans_up_locally_and_on_the_suites_server(quick_runs: dict[str, QuickRun]):
    # 200 backups an hour apart: `cleanup 8 --keep 5` removes the 8 older than 8 days, here and on the remote
    # (the first remote cleanup); the next night's, `cleanup 7`, the 24 hours before those.
    assert_figures(quick_runs["retention"].finish(), rf"^  nightly +{NUMBER} s \(8 removed\) +find +{NUMBER} s",
                   rf"^  calendar +{NUMBER} s \(\d+ removed\)", rf"^  remote +{NUMBER} s \(24 removed\) +boto3",
                   rf"^  remote_first +{NUMBER} s \(8 removed\) +boto3")


def test_a_failed_step_stops_the_benchmark_before_any_figure(quick_runs: dict[str, QuickRun]):
    result = quick_runs["remote, no such bucket"].finish()
    assert result.returncode == 1
    assert "benchmark step failed" in result.stderr
    assert result.stdout == ""


def test_a_failing_command_of_ours_is_never_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # no .env here
    env = harness.command_env({"CONFIG_DIR": str(tmp_path), "CONFIG_BACKUP_DIR": str(tmp_path / "store")})
    argv = script_argv("config_rollback.py", "restore", "no-such-backup", "--yes")
    with pytest.raises(SystemExit) as stopped:
        harness.timed(argv, env)
    assert re.match(r"benchmark step failed \(exit 2\): .*config_rollback\.py restore no-such-backup --yes: .+",
                    str(stopped.value.code))
