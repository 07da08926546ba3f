"""The small parts under common.remote: one way to call S3, transfer counters, hashing streams, safe paths."""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from common.errors import ToolkitError, UsageError

SMALL_OBJECT = 8 * 1024 * 1024  # below this a file goes up or down in one request, above in parallel parts
PART_SIZE = 8 * 1024 * 1024
PARALLEL = 16  # requests in flight: small objects, or the parts of a large one
ATTEMPTS = 3  # tries of each request, S3_TIMEOUT_SECONDS each to connect and between bytes of the answer


class RemoteMissing(UsageError):
    """The backup is not on the remote (its manifest is not there)."""


class ObjectMissing(ToolkitError):
    """An object a manifest names is not there: the remote copy is damaged."""


class PushRefused(ToolkitError):
    """A backup that is not pushed, while other backups of the same run may be: its id names other content there."""


def s3_call(call: Callable, missing: type[ToolkitError] | None = None, what: str = "not found"):
    """Run one boto3 call; its errors become one line naming what failed, never the credentials.

    With `missing`, a 404 raises that class with `what` as its message.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

    try:
        return call()
    except (ConnectTimeoutError, ReadTimeoutError) as exc:
        raise ToolkitError(f"the object storage did not answer in time ({type(exc).__name__}, {ATTEMPTS} attempts "
                           "of S3_TIMEOUT_SECONDS each): check S3_ENDPOINT_URL and the network, or raise "
                           "S3_TIMEOUT_SECONDS") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if missing is not None and code in ("404", "NoSuchKey", "NotFound"):
            raise missing(what) from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            raise ToolkitError(f"the object storage refused the credentials or the access ({code}): check "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile") from None
        raise ToolkitError(f"object storage error {code}: {error.get('Message', '')}") from None
    except BotoCoreError as exc:
        raise ToolkitError(f"object storage unreachable or misconfigured: {type(exc).__name__}: {exc}") from None
    except Boto3Error as exc:  # a transfer's own failure (S3UploadFailedError), with the server's word in it
        raise ToolkitError(f"object storage transfer failed: {exc}") from None
    except OSError as exc:  # a local file read or written on the way
        raise ToolkitError(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # botocore's word for a malformed endpoint URL or region
        raise ToolkitError(f"object storage settings: {exc} (check S3_ENDPOINT_URL and the region)") from None


def transfer_config():
    """Parallel parts of PART_SIZE above SMALL_OBJECT: s3transfer keeps a bounded number of parts in memory."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=SMALL_OBJECT, multipart_chunksize=PART_SIZE,
                          max_concurrency=PARALLEL, use_threads=True)


@dataclass
class Transfer:
    """What a push or pull moved, updated from several threads as it goes (for progress and the report)."""

    objects: int = 0
    bytes: int = 0
    skipped: int = 0  # already there
    total_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, objects: int = 0, size: int = 0) -> None:
        """Count moved objects and bytes (`+=` on a shared attribute could lose updates between threads)."""
        with self._lock:
            self.objects += objects
            self.bytes += size

    def to_json(self) -> dict:
        """For --json."""
        return {"objects": self.objects, "bytes": self.bytes, "skipped": self.skipped}


def check_content(backup_id: str, path: str, expected: tuple[int, str], size: int, digest: str) -> None:
    """A local payload file about to be pushed must still be what its manifest says."""
    if (size, digest) != expected:
        raise ToolkitError(f"{backup_id}: {path} does not match its checksum in the local store (damaged): "
                           "not pushed; `verify` names the damage")


class HashingReader(io.RawIOBase):
    """Reads a file for an upload, hashing what it hands over and counting it for progress."""

    def __init__(self, raw: BinaryIO, done: Transfer):
        self.raw, self.done = raw, done
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        self.done.add(size=len(data))
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class HashingWriter:
    """Takes a download's bytes in order (it is not seekable, so parts arrive in order), hashing them.

    With `background`, the hashing runs on its own thread (hashlib lets it use the other core) while the
    bytes are written: on a large object it would otherwise add its whole time to the download's.
    """

    def __init__(self, out: BinaryIO | None, done: Transfer, background: bool = False):
        self.out, self.done = out, done
        self._digest = hashlib.sha256()
        self.size = 0
        self._queue: queue.Queue | None = queue.Queue(maxsize=64) if background else None  # bounded memory
        self._hasher = threading.Thread(target=self._hash_queued, daemon=True) if background else None
        if self._hasher is not None:
            self._hasher.start()

    def _hash_queued(self) -> None:
        while (data := self._queue.get()) is not None:
            self._digest.update(data)

    def write(self, data: bytes) -> int:
        if self._queue is not None:
            self._queue.put(bytes(data))
        else:
            self._digest.update(data)
        self.size += len(data)
        self.done.add(size=len(data))
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def close(self) -> None:
        """Finish the hashing; the file itself is the caller's."""
        if self._hasher is not None and self._hasher.is_alive():
            self._queue.put(None)
            self._hasher.join()

    @property
    def digest(self):
        """The sha256 of everything written (after close)."""
        self.close()
        return self._digest
