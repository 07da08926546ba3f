"""Shared payload: each file's content stored once in the store's `objects/` folder, named by its sha256.

`objects/<first two hex digits>/<sha256>`, read-only (0400), like git's loose objects. A backup of the
shared format names its files' content by sha256 only, so backups with the same files share one copy and
an unchanged backup writes nothing but its manifest. Objects are written by the run holding the store's
lock and removed only by `sweep_unreferenced`, under the lock, when no readable backup names them. One
removed otherwise (by hand, a damaged disk) is found missing by the next backup (`stored_names`), which
stores it again from the live file instead of naming it.
A new object is written under its final name and made durable with the backup that first names it: one
cut short by a crash has the wrong size, and is written again (loose, or into a pack) by the next backup
that needs it.
A large copy run appends its small contents to pack files in `packs/` instead (backup_store.packs);
wherever a content lies, `locate` finds it and `stored_names` lists it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Iterable

from backup_store.packs import Content, find_packed, packed_names, sweep_packs

OBJECTS = "objects"  # in the store's folder, beside the backups
OBJECT_MODE = 0o400
_IN_MEMORY = 8 << 20  # files up to this size are hashed before they are written: one read, no rename
_CHUNK = 1 << 20
_FANOUT = [f"{n:02x}" for n in range(256)]


def object_path(objects: str, sha256: str) -> str:
    """Where the content with this sha256 is kept."""
    return f"{objects}/{sha256[:2]}/{sha256}"


def prepare_objects(objects: str) -> None:
    """Make the objects folder and its 256 sub-folders, where missing (a new store, or one of an earlier version)."""
    if os.path.isdir(f"{objects}/ff"):  # made last
        return
    os.makedirs(objects, 0o700, exist_ok=True)
    for name in _FANOUT:
        os.makedirs(f"{objects}/{name}", 0o700, exist_ok=True)


def locate(objects: str, sha256: str, fresh: bool = False) -> Content:
    """Where the content with this sha256 lies: in a pack, else its loose object's file (which may be missing).
    The packs are those last listed, unless `fresh` (see backup_store.packs)."""
    packed = find_packed(objects, sha256, fresh)
    return packed if packed is not None else Content(object_path(objects, sha256))


def whole_in_store(objects: str, present: Collection[str]) -> Callable[[str, int], bool]:
    """A test of whether content of a given sha256 and size is stored whole: in a pack (its index vouches for
    it), or loose with that size (one cut short by a crash is written again). `present`: stored_names, whose
    listing of the packs the test looks in."""

    def whole(sha256: str, size: int) -> bool:
        if find_packed(objects, sha256) is not None:
            return True
        if sha256 not in present:
            return False
        try:
            return os.lstat(object_path(objects, sha256)).st_size == size
        except OSError:
            return False

    return whole


def stored_names(objects: str) -> set[str]:
    """The names (sha256) of the contents in the folder, from the listings of its 256 sub-folders and the packs'
    indexes: no object is opened or stat'ed. A sub-folder that is missing (removed by hand) is made again, empty."""
    names = packed_names(objects)
    for name in _FANOUT:
        folder = f"{objects}/{name}"
        try:
            names.update(os.listdir(folder))
        except FileNotFoundError:
            os.mkdir(folder, 0o700)
    return names


def store_object(src: str, objects: str) -> tuple[int, str]:
    """Put the regular file `src` (never followed if a link) into the objects folder; its size and sha256.

    Content already stored with the right size is not written again. An OSError names the file it is about.
    """
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        chunks: list[bytes] = []
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size > _IN_MEMORY:
                return _store_large(fd, objects)
            chunks.append(chunk)
            if len(chunk) < _CHUNK:  # a short read of a regular file is its end
                break
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, src) from None
    finally:
        os.close(fd)
    sha = digest.hexdigest()
    _write_new(object_path(objects, sha), b"".join(chunks), size)
    return size, sha


def _write_new(path: str, data: bytes, size: int) -> None:
    """Write an object under its name unless it is there whole; one of another size (cut short) is replaced."""
    try:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OBJECT_MODE)
    except FileExistsError:
        if os.lstat(path).st_size == size:
            return
        temp = f"{path}.tmp-{os.urandom(4).hex()}"
        _write_new(temp, data, size)
        os.replace(temp, path)
        return
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
    except OSError as exc:
        os.unlink(path)
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(out)


def _store_large(fd: int, objects: str) -> tuple[int, str]:
    """A large file: copied to a temporary name while hashed (from its start again), then renamed to its sha256."""
    temp = f"{objects}/.tmp-{os.urandom(6).hex()}"
    digest = hashlib.sha256()
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OBJECT_MODE)
    try:
        try:
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
        finally:
            os.close(out)
        path = object_path(objects, digest.hexdigest())
        try:
            same = os.lstat(path).st_size == size
        except FileNotFoundError:
            same = False
        if same:
            os.unlink(temp)
        else:
            os.replace(temp, path)
    except OSError as exc:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise OSError(exc.errno, exc.strerror, temp) from None
    return size, digest.hexdigest()


def share_file(stored: str, objects: str, sha256: str, size: int) -> bool:
    """Make a file already in the store (a backup of the folder format's payload) an object by a hard link.

    True when the object is there with that size afterwards; False when it could not be linked."""
    path = object_path(objects, sha256)
    try:
        if os.lstat(path).st_size == size:
            return True
    except FileNotFoundError:
        pass
    try:
        os.link(stored, path, follow_symlinks=False)
    except OSError:  # gone, too many links, protected hard links: the caller stores it from the source
        return False
    return True


def sweep_unreferenced(objects: str, referenced: Iterable[str]) -> int:
    """Remove every object, temporary file and pack none of whose contents is in `referenced`; how many went.

    Only for the holder of the store's lock, and only with every backup of the store read: a backup whose
    manifest could not be read may name any object."""
    keep = set(referenced)
    if not os.path.isdir(objects):
        return sweep_packs(objects, keep)
    removed = 0
    with os.scandir(objects) as top:
        items = list(top)
    folders = [item.path for item in items if item.is_dir(follow_symlinks=False)]
    for path in [item.path for item in items if item.name.startswith(".tmp-")]:
        os.unlink(path)
        removed += 1
    for folder in folders:
        with os.scandir(folder) as listing:
            doomed = [item.path for item in listing if item.name not in keep]
        for path in doomed:
            os.unlink(path)
            removed += 1
    return removed + sweep_packs(objects, keep)
