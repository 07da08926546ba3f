"""A local copy of the remote's small manifests, by object key and ETag, so a scan of 10,000 remote backups
reads only the manifests that are new or changed since the last one.

Reading a manifest costs a request (3-4 ms of boto3 per GET here): a cleanup of a remote with 10,000 backups
spent over 30 s on them, every night, for manifests that never change once written. The listing that a scan
makes anyway gives each object's ETag, which changes whenever its bytes do; a manifest whose key and ETag
match the copy here is read from the copy. The copy holds the manifest as it was opened (unsealed, still
compressed), in the store's own private folder beside the backups, where the plain manifests already are.
A copy that cannot be read is started afresh: it is only ever a shortcut.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

from common.files import atomic_write

CACHE_FILE = ".remote-manifests.json"  # in the component's store folder
LARGEST = 64 << 10  # bytes of a compressed manifest kept here: a code backup's 20,000 entries are read each time


class ManifestCache:
    """The manifests read from one remote, by key: (ETag, compressed manifest)."""

    def __init__(self, path: Path | None, opened_with: str):
        self.path, self.opened_with = path, opened_with
        self._lock = threading.Lock()  # a scan reads manifests on several threads
        self._entries: dict[str, tuple[str, bytes]] = {}
        self._changed = False
        if path is not None:
            try:
                document = json.loads(path.read_bytes())
                if document.get("opened_with") == opened_with:  # else started afresh: another key, or none
                    self._entries = {key: (etag, base64.b64decode(packed))
                                     for key, (etag, packed) in document["manifests"].items()}
            except (OSError, ValueError, TypeError, AttributeError, KeyError):
                self._entries = {}

    def get(self, key: str, etag: str | None) -> bytes | None:
        """The manifest kept for `key` when its ETag is `etag`; None otherwise."""
        with self._lock:
            kept = self._entries.get(key)
        return kept[1] if kept is not None and etag and kept[0] == _bare(etag) else None

    def put(self, key: str, etag: str | None, packed: bytes) -> None:
        """Keep a manifest just read (small ones only)."""
        if self.path is None or not etag or len(packed) > LARGEST:
            return
        with self._lock:
            self._entries[key] = (_bare(etag), packed)
            self._changed = True

    def forget(self, keys: list[str]) -> None:
        """Drop the manifests a cleanup removed from the remote."""
        with self._lock:
            for key in keys:
                if self._entries.pop(key, None) is not None:
                    self._changed = True

    def save(self) -> None:
        """Write the copy, if anything changed and its folder exists (best effort: it is only a shortcut)."""
        if self.path is None or not self._changed or not self.path.parent.is_dir():
            return
        with self._lock:
            document = {"opened_with": self.opened_with, "manifests": {
                key: [etag, base64.b64encode(packed).decode()] for key, (etag, packed) in self._entries.items()}}
        try:
            atomic_write(self.path, json.dumps(document).encode(), durable=False)
        except OSError:
            return
        self._changed = False


def _bare(etag: str) -> str:
    """An ETag without the quotes that a GET's header has and a listing (as parsed here) may not."""
    return etag.strip('"')
