"""A backup under construction: its payload is copied in (many files on every core), then the store seals it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path

from backup_store.copier import CopyJob, copy_all
from backup_store.manifest import Backup, Entry, named_sha256s, verified_entries_json
from backup_store.objects import OBJECTS, prepare_objects, store_object, stored_names, whole_in_store
from backup_store.packs import PACK_FROM, PackWriter
from common.errors import ToolkitError, UsageError
from common.files import PRIVATE_DIR, PRIVATE_FILE, file_mode, flushing_meanwhile, sha256_file


class Staging:
    """A backup under construction: payload goes in, then `BackupStore.new_backup` seals it."""

    def __init__(self, path: Path, backup_id: str):
        self.path = path
        self.backup_id = backup_id
        self.entries: list[Entry] = []
        self.source: dict = {}
        self.extra: dict = {}
        self.skipped: list[str] = []  # sockets, fifos and devices are not configuration or code
        self.unsynced = False  # whether files were copied in without fsync (flushed once when sealing)
        self.backup: Backup | None = None  # the sealed backup, once new_backup has renamed it into place
        self._copies: list[CopyJob] = []  # queued while add_tree walks, made on every core once it has walked
        # Shared payload (see backup_store.objects): files go to the store's objects folder, none in this one.
        self.objects: str | None = None
        # Set when the entries are those of an earlier manifest, unchanged: its JSON text is written as it is.
        self.entries_json: bytes | None = None
        self.reused_counts = (0, 0)  # files and bytes of the entries reused
        self.fingerprint: str | None = None  # of the tree's stat, for the next snapshot (see deployed_code.snapshot)

    def share_payload(self) -> str:
        """Put the files' content of this backup in the store's objects folder (made if missing); its path."""
        self.objects = str(self.path.parent / OBJECTS)
        prepare_objects(self.objects)
        return self.objects

    def reuse_entries(self, entries_json: bytes, files: int, size: int) -> None:
        """Seal this backup with an earlier manifest's entries, as their JSON text (holding `files` files of
        `size` bytes in all): nothing is encoded again, and they are read back only when used."""
        self.entries, self.entries_json = [], entries_json
        self.reused_counts = (files, size)

    def reuse_backup(self, source: Backup, stored: set[str]) -> bool:
        """Seal this backup with `source`'s entries as they are when reusable_entries allows; whether it will."""
        entries_json = reusable_entries(source, self.objects, stored)
        if entries_json is None:
            return False
        self.reuse_entries(entries_json, source.extra["files"], source.extra["size"])
        return True

    def add_tree(
        self,
        src: Path,
        dest: str,
        exclude: Callable[[str], bool] | None = None,
        regular: Callable[[str, str, os.stat_result], Entry] | None = None,
    ) -> None:
        """Copy the folder `src` to `dest` in the payload; symlinks are kept as links, never followed.

        `regular`, when given, puts each regular file into the payload itself (given the file's path,
        its path in the payload and its lstat) and returns its entry, instead of the plain copy; it may
        leave the copy to `copy_later`.
        """
        self._add_dir(str(src), dest, "", exclude, regular)
        self.copy_queued()

    def copy_later(self, src: str, dest: str, entry: Entry, mode: int = PRIVATE_FILE,
                   copied: Callable[[int], None] | None = None) -> None:
        """Queue the copy of the regular file `src` to `dest` in the payload, made before add_tree returns.

        `entry` gets the size and sha256 of what was copied; `copied(size)`, when given, is called then.
        """

        def done(size: int, digest: str) -> None:
            entry.size, entry.sha256 = size, digest
            if copied is not None:
                copied(size)

        if self.objects is not None:
            self._copies.append(CopyJob(src, self.objects, mode, None, done, put=store_object))
        else:
            self._copies.append(CopyJob(src, os.path.join(self.path, dest), mode, None, done))

    def add_file(self, src: Path, dest: str) -> None:
        """Copy one regular file (or symlink) to `dest` in the payload."""
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            self._add_symlink(src, dest, st)
        elif stat.S_ISREG(st.st_mode):
            self._add_regular(str(src), dest, st)
            self.copy_queued()
        else:
            raise UsageError(f"{src} is not a regular file")

    def adopt(self, rel: str) -> None:
        """Record a file or folder a tool wrote straight into the staging folder and made durable itself.

        pg_dump fsyncs its own output (unless --no-sync), so adopted files need no flush from us.
        """
        path = self.path / rel
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, PRIVATE_DIR)
            self.entries.append(Entry(rel, "dir", mode=PRIVATE_DIR))
            for name in sorted(os.listdir(path)):
                self.adopt(f"{rel}/{name}")
        elif stat.S_ISREG(st.st_mode):
            os.chmod(path, PRIVATE_FILE)
            self.entries.append(Entry(rel, "file", mode=PRIVATE_FILE, size=st.st_size, sha256=sha256_file(path)))
        else:
            raise ToolkitError(f"{path} is neither a file nor a folder: not adopted into the backup")

    def _add_dir(
        self,
        src: str,
        dest: str,
        rel: str,
        exclude: Callable[[str], bool] | None,
        regular: Callable[[str, str, os.stat_result], Entry] | None = None,
    ) -> None:
        # Plain strings, not Path objects: this runs once per file of a 20,000-file tree.
        if self.objects is None:  # a shared payload has its folders in the manifest only
            os.mkdir(os.path.join(self.path, dest), PRIVATE_DIR)
        st = os.lstat(src) if rel else os.stat(src)  # the tree's root: the folder a symlink to it leads to
        self.entries.append(Entry(dest, "dir", mode=file_mode(st), uid=st.st_uid, gid=st.st_gid))
        with os.scandir(src) as listing:
            items = sorted(listing, key=lambda item: item.name)
        for item in items:
            item_rel = f"{rel}/{item.name}" if rel else item.name
            if exclude is not None and exclude(item_rel):
                continue
            item_dest = f"{dest}/{item.name}"
            st = item.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self._add_symlink(item.path, item_dest, st)
            elif stat.S_ISDIR(st.st_mode):
                self._add_dir(item.path, item_dest, item_rel, exclude, regular)
            elif stat.S_ISREG(st.st_mode) and regular is not None:
                self.entries.append(regular(item.path, item_dest, st))
            elif stat.S_ISREG(st.st_mode):
                self._add_regular(item.path, item_dest, st)
            else:
                self.skipped.append(item.path)

    def _add_regular(self, src: str, dest: str, st: os.stat_result) -> None:
        entry = Entry(dest, "file", mode=file_mode(st), size=st.st_size, uid=st.st_uid, gid=st.st_gid)
        self.entries.append(entry)
        self.copy_later(src, dest, entry)

    def copy_queued(self, stored: Collection[str] | None = None) -> None:
        """Make the queued copies, on every core when there are many. Shared content of a large run goes into
        packs (backup_store.packs), none already in `stored` (the names objects/ lists; read when not given)."""
        copies, self._copies = self._copies, []
        if not copies:
            return
        self.unsynced = True
        packing = None
        if self.objects is not None and len(copies) >= PACK_FROM:
            present = stored_names(self.objects) if stored is None else stored
            packing = PackWriter(self.objects, whole_in_store(self.objects, present), store_object)
            for job in copies:
                job.put = packing.put
        with flushing_meanwhile(self.path):  # the payload reaches the disk as it is copied, not all at the seal
            try:
                copy_all(copies)
                if packing is not None:
                    packing.seal()
            except BaseException:
                if packing is not None:
                    packing.discard()
                raise

    def _add_symlink(self, src: str | Path, dest: str, st: os.stat_result) -> None:
        target = os.readlink(src)
        if self.objects is None:
            os.symlink(target, os.path.join(self.path, dest))
        self.entries.append(Entry(dest, "symlink", target=target, uid=st.st_uid, gid=st.st_gid))


def reusable_entries(source: Backup, objects: str | None, stored: set[str]) -> bytes | None:
    """`source`'s entries as their JSON text, for a new backup to be sealed with as they are: when `source` shares
    the `objects` folder, its entries are undamaged (their sha256 is its header's), and every content they
    name is in `stored` (the names objects/ lists); else None."""
    files, size = source.extra.get("files"), source.extra.get("size")
    if source.objects is None or str(source.objects) != objects or type(files) is not int or type(size) is not int:
        return None
    entries_json = verified_entries_json(source)
    if entries_json is None:
        return None  # damaged, or written by hand: read whole (and checked) instead
    named = named_sha256s(entries_json)
    if len(named) != files or not stored.issuperset(named):
        return None  # content gone from objects/: each file is looked at, and what is gone stored again
    return entries_json
