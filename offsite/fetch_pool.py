"""Many small objects read at once, for a remote scan that finds most of its manifests new.

boto3 spends about 2-3 ms of CPU on each GET (its request and answer pipeline), under the interpreter
lock, so threads alone top out near 400 objects a second: a host's first cleanup of a remote holding
10,000 backups spent over 30 s on its manifests. From FROM_OBJECTS keys on, they are read by plain HTTP
GETs of URLs the client presigns (a third of that CPU), shared out among worker processes (one a core, up
to MAX_PROCESSES, started fresh, so no lock of this process is copied into them), each with PARALLEL
threads. This path only ever speeds things up: a worker stops at its first failure, and whatever was not
read (everything, when a proxy is in the way, which the plain GETs do not use) the caller reads
with boto3, with its own retries, errors and checks. Every byte brought back is checked by the caller as
if it had read it itself (opened, parsed, its id matched). Workers die with the process that started them.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from itertools import repeat

from backup_store.copier import worker_count
from common.proc import die_with
from offsite.remote_io import PARALLEL

FROM_OBJECTS = 1000  # fewer: starting processes (each imports boto3) costs more than it saves
MAX_PROCESSES = 4
BATCH = 100  # keys a worker takes at a time, so a slow worker takes fewer
URL_SECONDS = 900  # how long a presigned URL holds: far longer than a batch takes
_client = None  # a worker's own client and HTTP pool, made on its first batch
_http = None


def read_objects(make_client: Callable[[], object], bucket: str, keys: list[str]
                 ) -> dict[str, tuple[str | None, bytes]]:
    """Each key's (ETag, bytes) that could be read the fast way; {} for fewer than FROM_OBJECTS keys.
    `make_client` gives a boto3 client, and is picklable (a top-level function, or a partial of one)."""
    if len(keys) < FROM_OBJECTS:
        return {}
    processes = min(worker_count(), MAX_PROCESSES)
    if processes < 2:
        return _read_batch(make_client, bucket, keys)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    batches = [keys[start:start + BATCH] for start in range(0, len(keys), BATCH)]
    found: dict[str, tuple[str | None, bytes]] = {}
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        for read in pool.map(_read_batch, repeat(make_client), repeat(bucket), batches):
            found.update(read)
    finally:  # a stop waits only for the batches being read (a fraction of a second), not for the rest
        pool.shutdown(wait=True, cancel_futures=True)
    return found


def _start_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the parent's to handle
    die_with(parent)


def _read_batch(make_client: Callable[[], object], bucket: str, keys: list[str]
                ) -> dict[str, tuple[str | None, bytes]]:
    """In a worker: the keys it could read, each with its ETag and bytes, until the first failure."""
    global _client, _http
    if _client is None:
        import urllib3
        from botocore.httpsession import get_cert_path

        _client = make_client()
        # The certificates botocore trusts: AWS_CA_BUNDLE when set, else its own default bundle.
        _http = urllib3.PoolManager(maxsize=PARALLEL, retries=False, timeout=_client.meta.config.read_timeout,
                                    ca_certs=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))
    from concurrent.futures import ThreadPoolExecutor

    failed = threading.Event()
    if not _plain_gets_possible(_client):
        return {}

    def read(key: str) -> tuple[str, str | None, bytes] | None:
        if failed.is_set():
            return None
        try:
            url = _client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=URL_SECONDS)
            response = _http.request("GET", url)
        except Exception:  # noqa: BLE001 - the caller reads it again and says what is wrong in its own words
            failed.set()
            return None
        if response.status != 200:
            if response.status != 404:  # gone since the listing (a cleanup) says nothing of the others
                failed.set()
            return None
        return key, response.headers.get("ETag"), response.data

    with ThreadPoolExecutor(PARALLEL) as threads:
        return {item[0]: item[1:] for item in threads.map(read, keys) if item is not None}


def _plain_gets_possible(client) -> bool:
    """Whether plain GETs reach the endpoint as the client does: not through a proxy."""
    from botocore.utils import get_environ_proxies

    return not (get_environ_proxies(client.meta.endpoint_url) or client.meta.config.proxies)
