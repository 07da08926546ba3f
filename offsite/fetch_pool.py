"""Many small objects read at once, for a remote scan that finds most of its manifests new.

boto3 spends about 2-3 ms of CPU on each GET (its request and answer pipeline), under the interpreter
lock, so threads alone top out near 400 objects a second: a host's first cleanup of a remote holding
10,000 backups spent over 30 s on its manifests. From FROM_OBJECTS keys on, they are read by plain HTTP
GETs of URLs presigned with the caller's credentials (a third of that CPU), shared out in batches among
worker processes (one a core, up to MAX_PROCESSES, started fresh, so no lock of this process is copied
into them), each with PARALLEL threads. This path only ever saves time: a batch stops at its first
failure, a pool that breaks gives what it had read, an object whose bytes do not match its ETag (an MD5)
is left out, and whatever was not read the caller reads with boto3, with its own retries, errors and
checks. Workers die with the process that started them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from itertools import repeat

from backup_store.copier import worker_count
from common.errors import Interrupted
from common.proc import die_with
from offsite.remote_io import PARALLEL

FROM_OBJECTS = 1000  # fewer: starting processes (each imports boto3) costs more than it saves
MAX_PROCESSES = 4
BATCH = 100  # keys a worker takes at a time, so a slow worker takes fewer
URL_SECONDS = 900  # how long a presigned URL holds: far longer than a batch takes
_reader: _Reader | None = None  # a worker's own client and HTTP pool, made for its first batch


@dataclass(frozen=True)
class Signing:
    """What a worker needs to presign GETs as the caller would: no credential lookup of its own (a profile's
    MFA prompt, a credential_process) happens in a worker."""

    endpoint: str | None
    region: str | None
    access_key: str
    secret_key: str
    token: str | None
    timeout: float

    @classmethod
    def of(cls, client, session) -> Signing | None:
        """The client's endpoint and its session's credentials, frozen; None when plain GETs would not go as
        its requests do (through a proxy), or there are no credentials."""
        from botocore.utils import get_environ_proxies

        config = client.meta.config
        credentials = session.get_credentials()
        if credentials is None or config.proxies or get_environ_proxies(client.meta.endpoint_url):
            return None
        frozen = credentials.get_frozen_credentials()
        return cls(client.meta.endpoint_url, client.meta.region_name, frozen.access_key, frozen.secret_key,
                   frozen.token, config.read_timeout)


def read_objects(signing: Signing | None, bucket: str, keys: list[str]) -> dict[str, tuple[str | None, bytes]]:
    """Each key's (ETag, bytes) that the workers could read; {} for fewer than FROM_OBJECTS keys, or
    without `signing`."""
    if signing is None or len(keys) < FROM_OBJECTS:
        return {}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    batches = [keys[start:start + BATCH] for start in range(0, len(keys), BATCH)]
    found: dict[str, tuple[str | None, bytes]] = {}
    pool = None
    try:
        pool = ProcessPoolExecutor(min(worker_count(), MAX_PROCESSES), mp_context=multiprocessing.get_context(
            "spawn"), initializer=_start_worker, initargs=(os.getpid(),))
        for read in pool.map(_read_batch, repeat(signing), repeat(bucket), batches):
            found.update(read)
    except Interrupted:
        raise
    except Exception:  # noqa: BLE001 - a worker killed, no processes to be had: the caller reads the rest
        pass
    finally:  # a stop waits only for the batches being read (a fraction of a second), not for the rest
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return found


def _start_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the parent's to handle
    die_with(parent)


class _Reader:
    """A worker's client (for presigning only) and HTTP connection pool."""

    def __init__(self, signing: Signing):
        import boto3
        import urllib3
        from botocore.config import Config
        from botocore.httpsession import get_cert_path

        self.client = boto3.Session(
            aws_access_key_id=signing.access_key, aws_secret_access_key=signing.secret_key,
            aws_session_token=signing.token, region_name=signing.region,
        ).client("s3", endpoint_url=signing.endpoint, config=Config(
            signature_version="s3v4", s3={"addressing_style": "path"} if signing.endpoint else None))
        # The certificates botocore trusts: AWS_CA_BUNDLE when set, else its own bundle.
        self.http = urllib3.PoolManager(maxsize=PARALLEL, retries=False, timeout=signing.timeout,
                                        ca_certs=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))

    def get(self, bucket: str, key: str) -> tuple[int, str | None, bytes]:
        """The answer's status, ETag and body, as sent (no content decoding)."""
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=URL_SECONDS)
        response = self.http.request("GET", url, decode_content=False)
        return response.status, response.headers.get("ETag"), response.data


def _read_batch(signing: Signing, bucket: str, keys: list[str]) -> dict[str, tuple[str | None, bytes]]:
    """In a worker: the keys of the batch it could read, each with its ETag and bytes, until a failure."""
    global _reader
    try:
        if _reader is None:
            _reader = _Reader(signing)
    except Exception:  # noqa: BLE001 - the caller reads the batch itself
        return {}
    from concurrent.futures import ThreadPoolExecutor

    failed = threading.Event()

    def read(key: str) -> tuple[str, str | None, bytes] | None:
        if failed.is_set():
            return None
        try:
            status, etag, body = _reader.get(bucket, key)
        except Exception:  # noqa: BLE001 - the caller reads it again and says what is wrong in its own words
            failed.set()
            return None
        if status != 200 or not _matches(etag, body):
            if status != 404:  # gone since the listing (a cleanup) says nothing of the others
                failed.set()
            return None
        return key, etag, body

    with ThreadPoolExecutor(PARALLEL) as threads:
        return {item[0]: item[1:] for item in threads.map(read, keys) if item is not None}


def _matches(etag: str | None, body: bytes) -> bool:
    """False when the ETag is an MD5 (a single-part upload's, unencrypted) that the body does not have."""
    bare = (etag or "").strip('"')
    if len(bare) != 32 or any(c not in "0123456789abcdef" for c in bare):
        return True  # a multipart or encrypted object's ETag says nothing of its bytes: the caller's checks do
    return hashlib.md5(body, usedforsecurity=False).hexdigest() == bare
