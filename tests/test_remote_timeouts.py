"""Object storage that does not answer, and uploads in progress: bounded waits, and nothing cut off."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from remote_sites import ConfigSite
from s3_server import Bucket


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never says a word: an endpoint that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # the listening socket was closed: the test is over
                return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join()
        for conn in self.held:
            conn.close()


def test_an_endpoint_that_never_answers_fails_the_push_in_bounded_time_with_one_line(tmp_path: Path,
                                                                                     remote: Bucket):
    silent = SilentServer()
    try:
        site = ConfigSite(tmp_path, remote, S3_ENDPOINT_URL=silent.endpoint, S3_TIMEOUT_SECONDS="1")
        site.backup()
        started = time.monotonic()
        result = site.run("push")
        elapsed = time.monotonic() - started
        assert silent.held  # it did connect: the wait was for an answer
    finally:
        silent.close()
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "did not answer" in result.stderr
    assert "S3_TIMEOUT_SECONDS" in result.stderr
    assert elapsed < 30  # three attempts of a second, and their back-off; without a timeout it took minutes
    result = site.run("push", S3_TIMEOUT_SECONDS="0")
    assert result.returncode == 2 and "S3_TIMEOUT_SECONDS" in result.stderr


def test_a_cleanup_with_no_grace_never_aborts_an_upload_in_progress(tmp_path: Path, remote: Bucket):
    site = ConfigSite(tmp_path, remote, REMOTE_AUTO_PUSH="1", REMOTE_CLEANUP_GRACE_SECONDS="0")
    site.backup()
    client = remote.client()
    key = "backups/blobs/ab/" + "ab" * 32  # a large file a push is sending in parts right now
    upload = client.create_multipart_upload(Bucket=remote.name, Key=key)["UploadId"]
    part = client.upload_part(Bucket=remote.name, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))

    result = site.run("cleanup", "0", "--remote")
    assert result.returncode == 0, result.stderr
    uploads = client.list_multipart_uploads(Bucket=remote.name, Prefix="backups/blobs/").get("Uploads", [])
    assert [item["UploadId"] for item in uploads] == [upload]
    client.complete_multipart_upload(Bucket=remote.name, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    assert remote.objects()[key] == 5 << 20
