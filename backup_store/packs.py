"""Pack files: many small contents of the shared payload in one file each, as restic and git keep theirs.

Creating 20,000 small files is most of what a first backup of a code tree costs (each create goes through
a folder and the journal); appending the same contents to a file a copying process costs a fraction of that.
So a copy run that starts copying processes (PACK_FROM contents or more) appends each content below
PACKED_BELOW to a pack of the process's own; larger ones, and smaller runs, stay loose files
(backup_store.objects). Nothing else changes: a backup names content by its sha256, wherever it lies.

packs/pack-<16 hex>.pack  PACK_MAGIC, then per content its sha256 (32 bytes), its size (8 bytes,
                          little-endian) and the content: a pack describes itself, so its index is
                          made by reading it, and can always be made again.
packs/pack-<16 hex>.idx   INDEX_MAGIC, the pack's length (8 bytes), then per content its sha256, offset
                          and size.
`packs/` is in the store's folder beside `objects/`, not in it: an earlier version of the toolkit sweeping
objects/ would take a pack for an object no backup names.
A run writes its packs under `.tmp-` names; once every copy is done, each pack gets its index, the pack is
renamed and then its index, so an index always has its whole pack beside it (loading checks the length),
and the syncfs before a manifest makes both durable before any backup names what they hold. A run that
fails removes its packs. Cleanup, under the store's lock, removes a pack once no backup names any content
in it, and rewrites one whose named contents take less than half of it with those only (checked against
their sha256 on the way; made durable before the old index goes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple

from backup_store.copier import PARALLEL_FROM
from common.errors import ToolkitError
from common.files import fsync_dir

PACKS = "packs"  # in the store's folder, beside the objects folder
PACK_FROM = PARALLEL_FROM  # contents stored by one run: as many as make the copier start processes
PACKED_BELOW = 1 << 20  # larger contents stay loose files: their create is a small part of their cost
PACK_MAGIC = b"RBPACK1\n"
INDEX_MAGIC = b"RBIDX1\n\0"
REPACK_BELOW = 0.5  # a pack whose named contents take less of it than this is rewritten with those only
_HEADER = struct.Struct("<32sQ")  # before each content in a pack: sha256, size
_INDEX_ENTRY = struct.Struct("<32sQQ")  # sha256, offset of the content, size
_LENGTH = struct.Struct("<Q")


class Content(NamedTuple):
    """Where one stored content lies: a whole file (a loose object; `span` None), or the span (offset, size)
    of a pack that holds it."""

    path: str
    span: tuple[int, int] | None = None


def packs_folder(objects: str) -> str:
    """The folder holding the packs that share the objects folder `objects`."""
    return os.path.join(os.path.dirname(objects), PACKS)


class PackIndex:
    """One pack's index as read: which contents the pack holds, each found without reading the pack."""

    def __init__(self, pack: str, data: bytes, head: int):
        self.pack = pack
        self._data, self._head = data, head
        hexed = data[head:].hex()  # one sha256 per entry, as 64 of each 96 hex digits: sliced, not unpacked
        step = 2 * _INDEX_ENTRY.size
        self.slots = {hexed[at:at + 64]: at // step for at in range(0, len(hexed), step)}

    def content(self, sha256: str) -> Content | None:
        """Where the pack holds this content, if it does."""
        return Content(self.pack, self.span(sha256)) if sha256 in self.slots else None

    def span(self, sha256: str) -> tuple[int, int]:
        """The offset and size of a content the pack holds."""
        at = self._head + self.slots[sha256] * _INDEX_ENTRY.size
        _sha, offset, size = _INDEX_ENTRY.unpack_from(self._data, at)
        return offset, size

    def named_share(self, named: Collection[str]) -> float:
        """The share of the pack's length that the contents `named` (some of those it holds) take."""
        length = _LENGTH.unpack_from(self._data, len(INDEX_MAGIC))[0]
        return sum(_HEADER.size + self.span(sha)[1] for sha in named) / max(length, 1)


# Each index is read once a process (one is never rewritten in place: a new pack gets a new name), and each
# packs folder listed once, again only when asked to (`fresh`): by the process that changed it, or by a reader
# without the store's lock that did not find a content where the listing said (see manifest.Backup.content).
_indexes: dict[str, PackIndex | None] = {}
_listed: dict[str, tuple[list[PackIndex], dict[str, PackIndex]]] = {}  # by folder: its indexes, each content's


def pack_indexes(objects: str, fresh: bool = False) -> list[PackIndex]:
    """The indexes of the packs that share the objects folder `objects` (none without packs).

    An index whose pack is missing or of another length than it records is left out: its contents are
    not there for any backup to name (a backup that already names them finds them missing in verify)."""
    return _listing(objects, fresh)[0]


def _listing(objects: str, fresh: bool) -> tuple[list[PackIndex], dict[str, PackIndex]]:
    folder = packs_folder(objects)
    if not fresh and folder in _listed:
        return _listed[folder]
    try:
        names = sorted(name for name in os.listdir(folder) if name.startswith("pack-") and name.endswith(".idx"))
    except FileNotFoundError:
        names = []
    found = []
    for name in names:
        path = f"{folder}/{name}"
        if path not in _indexes:
            _indexes[path] = _read_index(path)
        if (index := _indexes[path]) is not None:
            found.append(index)
    # Each content found by one lookup, however many packs: the first (by name) of those holding it.
    holder = {sha: index for index in reversed(found) for sha in index.slots}
    _listed[folder] = (found, holder)
    return found, holder


def packed_names(objects: str) -> set[str]:
    """The sha256 of every content the packs of `objects` hold, as listed now."""
    return set().union(*(index.slots for index in pack_indexes(objects, fresh=True)))


def find_packed(objects: str, sha256: str, fresh: bool = False) -> Content | None:
    """Where a pack of `objects` holds this content, if one does (as last listed, unless `fresh`)."""
    index = _listing(objects, fresh)[1].get(sha256)
    return index.content(sha256) if index is not None else None


def _read_index(path: str) -> PackIndex | None:
    pack = path[: -len(".idx")] + ".pack"
    try:
        with open(path, "rb") as index:
            data = index.read()
        pack_length = os.stat(pack).st_size
    except FileNotFoundError:
        return None
    head = len(INDEX_MAGIC) + _LENGTH.size
    if data[: len(INDEX_MAGIC)] != INDEX_MAGIC or (len(data) - head) % _INDEX_ENTRY.size:
        return None
    if _LENGTH.unpack_from(data, len(INDEX_MAGIC))[0] != pack_length:
        return None
    return PackIndex(pack, data, head)


def read_content(content: Content) -> bytes:
    """The bytes a content holds: its whole file, or its span of a pack (fewer if the pack ends before)."""
    fd = os.open(content.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if content.span is not None:
            return os.pread(fd, content.span[1], content.span[0])
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class PackWriter:
    """The `put` of a copy run's jobs (see copier.CopyJob): a small content is appended to a pack of the
    copying process's own (a forked worker opens its own at its first put), a large one stored loose.

    Content `stored_whole(sha256, size)` says the store has, or already put by this process, is not written again.
    The run's process calls seal() once every copy is done, or discard() when the run failed."""

    def __init__(self, objects: str, stored_whole: Callable[[str, int], bool],
                 store_loose: Callable[[str, str], tuple[int, str]]):
        self.objects = objects
        self.stored_whole = stored_whole  # objects.whole_in_store
        self.store_loose = store_loose  # objects.store_object: (src, objects) -> (size, sha256)
        self.folder = packs_folder(objects)
        self.run = os.urandom(6).hex()
        self._pid = 0
        self._fd = -1
        self._path = ""
        self._written: set[str] = set()

    def put(self, src: str, objects: str) -> tuple[int, str]:
        """Store the regular file `src` (never followed if a link); its size and sha256."""
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            data = os.read(fd, PACKED_BELOW)  # a short read of a regular file is its end
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, src) from None
        finally:
            os.close(fd)
        if len(data) == PACKED_BELOW:
            return self.store_loose(src, objects)
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self._written and not self.stored_whole(sha, len(data)):
            self._append(sha, data)
        return len(data), sha

    def _append(self, sha: str, data: bytes) -> None:
        if self._pid != os.getpid():  # first put in this process
            self._pid, self._written = os.getpid(), set()
            os.makedirs(self.folder, 0o700, exist_ok=True)
            self._path = f"{self.folder}/.tmp-{self.run}-{self._pid}.pack"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o400)
            self._write(PACK_MAGIC)
        self._write(_HEADER.pack(bytes.fromhex(sha), len(data)) + data)
        self._written.add(sha)

    def _write(self, data: bytes) -> None:
        _write_all(self._fd, data, self._path)

    def _run_packs(self) -> list[str]:
        if self._pid == os.getpid() and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        prefix = f".tmp-{self.run}-"
        return [f"{self.folder}/{name}" for name in sorted(names) if name.startswith(prefix)]

    def seal(self) -> None:
        """Give each pack this run wrote its index and its final name."""
        for path in self._run_packs():
            _finish(path)
        pack_indexes(self.objects, fresh=True)  # this process finds what it just stored

    def discard(self) -> None:
        """Remove the packs this run wrote (it failed: no backup will name their contents); what cannot be
        removed now is left to cleanup, which removes what no run finished. Never raises: the run's own error
        is the one to report."""
        with contextlib.suppress(OSError):
            for path in self._run_packs():
                os.unlink(path)


def _finish(temp: str, durable: bool = False) -> None:
    """Index the pack at `temp` by reading its headers, then rename it and its index into place; `durable`:
    each made durable before the next step (a backup's run leaves that to the syncfs before its manifest)."""
    entries = []
    fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        length = os.fstat(fd).st_size
        if os.pread(fd, len(PACK_MAGIC), 0) != PACK_MAGIC:
            raise ToolkitError(f"{temp} is not a pack: not sealed")
        offset = len(PACK_MAGIC)
        while offset < length:
            header = os.pread(fd, _HEADER.size, offset)
            if len(header) != _HEADER.size:
                raise ToolkitError(f"{temp} is cut short: not sealed")
            sha, size = _HEADER.unpack(header)
            offset += _HEADER.size
            entries.append(_INDEX_ENTRY.pack(sha, offset, size))
            offset += size
        if offset != length:
            raise ToolkitError(f"{temp} is cut short: not sealed")
    finally:
        os.close(fd)
    folder = os.path.dirname(temp)
    stem = f"{folder}/pack-{os.urandom(8).hex()}"
    index_temp = f"{folder}/.tmp-{os.urandom(6).hex()}.idx"
    with open(index_temp, "xb") as index:
        index.write(INDEX_MAGIC + _LENGTH.pack(length) + b"".join(entries))
        if durable:
            index.flush()
            os.fsync(index.fileno())
    os.chmod(index_temp, 0o400)
    os.rename(temp, f"{stem}.pack")
    os.rename(index_temp, f"{stem}.idx")
    if durable:
        fsync_dir(Path(folder))


def sweep_packs(objects: str, referenced: set[str]) -> int:
    """Remove each pack none of whose contents is in `referenced`, rewrite each that is mostly unnamed with only
    the named ones (REPACK_BELOW), and remove what runs left unfinished; how many contents went.

    Only for the holder of the store's lock, with every backup of the store read. A pack replaced by its
    rewrite loses its index at once and its file at the next sweep: a reader without the lock that listed
    the packs before still reads it meanwhile."""
    folder = packs_folder(objects)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return 0
    removed = 0
    indexed = {name[: -len(".idx")] for name in names if name.startswith("pack-") and name.endswith(".idx")}
    for name in names:
        path = f"{folder}/{name}"
        if name.startswith(".tmp-") or (name.endswith(".pack") and name[: -len(".pack")] not in indexed):
            os.unlink(path)  # unsealed by a stopped run, or rewritten by the last sweep: no index names it
    for stem in sorted(indexed):
        index = _read_index(f"{folder}/{stem}.idx")
        if index is None:
            continue  # not trusted, so nothing can name it as stored: left for an operator to look at
        named = [sha for sha in index.slots if sha in referenced]
        if not named:
            os.unlink(f"{folder}/{stem}.idx")  # the index first: a pack without one holds nothing known
            os.unlink(f"{folder}/{stem}.pack")
        elif index.named_share(named) < REPACK_BELOW and _rewrite(index, named):
            os.unlink(f"{folder}/{stem}.idx")
        else:
            continue
        removed += len(index.slots) - len(named)
    pack_indexes(objects, fresh=True)
    return removed


def _rewrite(index: PackIndex, named: list[str]) -> bool:
    """Write the `named` contents of a pack into a new one, each checked against its sha256 on the way, made
    durable with its index; whether it was (a damaged content leaves the pack as it is, for verify to name)."""
    folder = os.path.dirname(index.pack)
    temp = f"{folder}/.tmp-{os.urandom(6).hex()}.pack"
    source = os.open(index.pack, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            _write_all(out, PACK_MAGIC, temp)
            for sha in named:
                offset, size = index.span(sha)
                data = os.pread(source, size, offset)
                if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                    raise _Damaged
                _write_all(out, _HEADER.pack(bytes.fromhex(sha), size) + data, temp)
            os.fsync(out)
        finally:
            os.close(out)
    except _Damaged:
        os.unlink(temp)
        return False
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(source)
    _finish(temp, durable=True)
    return True


class _Damaged(Exception):
    """A content of a pack being rewritten does not match its sha256."""


def _write_all(fd: int, data: bytes, path: str) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None

