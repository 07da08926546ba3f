"""A throwaway cluster whose WAL pgBackRest archives into a repository of its own: the pgbackrest engine's tests."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile

from pg_cluster import SERVER_OS_USER, ThrowawayCluster, memory_folder, runuser

STANZA = "main"


class ArchivingCluster:
    """A ThrowawayCluster with archive_mode on, its stanza created in a repository beside it."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="pgbackrest-", dir=memory_folder())
        self.config = os.path.join(self.base, "pgbackrest.conf")
        self.cluster = ThrowawayCluster(settings={
            "archive_mode": "on",
            "wal_level": "replica",
            "archive_command": f"'pgbackrest --config={self.config} --stanza={STANZA} archive-push %p'",
        })
        self._owner = pwd.getpwnam(SERVER_OS_USER) if os.geteuid() == 0 else None

    def start(self) -> ArchivingCluster:
        """Start the server, write pgBackRest's configuration and create the stanza."""
        self.cluster.start()
        try:
            for folder in ("repo", "log", "lock", "spool"):
                os.makedirs(os.path.join(self.base, folder), 0o750)
            with open(self.config, "w", encoding="utf-8") as conf:
                conf.write(f"[global]\nrepo1-path={self.base}/repo\nlog-path={self.base}/log\n"
                           f"lock-path={self.base}/lock\nspool-path={self.base}/spool\nlog-level-file=off\n"
                           "log-level-console=warn\nstart-fast=y\narchive-timeout=30\nrepo1-retention-full=9\n\n"
                           f"[{STANZA}]\npg1-path={self.cluster.data_dir}\npg1-port={self.cluster.port}\n"
                           f"pg1-socket-path={self.cluster.host}\n")
            if self._owner is not None:
                for path in [self.base, *(os.path.join(root, name) for root, dirs, files in os.walk(self.base)
                                          for name in dirs + files)]:
                    os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
            self.pgbackrest("stanza-create")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server and remove the cluster and the repository."""
        try:
            self.cluster.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def pgbackrest(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run pgBackRest on the stanza, as the server's OS user; a failure raises with its output."""
        argv = ["pgbackrest", f"--config={self.config}", f"--stanza={STANZA}", *args]
        if self._owner is not None:
            argv = [runuser(), "-u", SERVER_OS_USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, env=_without_pg_variables())
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def env(self, dbname: str) -> dict[str, str]:
        """The settings of the scripts for `dbname` on this cluster, with the pgbackrest engine."""
        return {**self.cluster.env(dbname), "DB_ENGINE": "pgbackrest", "PGBACKREST_STANZA": STANZA,
                "PGBACKREST_CONFIG": self.config, "PGDATA": self.cluster.data_dir, "PG_BINDIR": self.cluster.bindir}

    def break_archiving(self) -> None:
        """Point archive_command at a program that always fails, as a full or unmounted repository would."""
        conn = self.cluster.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("ALTER SYSTEM SET archive_command = '/bin/false'")
                cur.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()


def _without_pg_variables() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}
