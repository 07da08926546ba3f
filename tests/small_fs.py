"""Small real filesystems for the full-disk tests: a tmpfs of a given size, mounted for the test (needs root,
which the suite has when it runs the server as postgres), and a way to fill one up."""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_OS_USER = "postgres"
_CHUNK = 1024 * 1024


@contextmanager
def small_filesystem(size: int, owner: str = SERVER_OS_USER) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted on a new folder, its root owned by `owner`; unmounted afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("the full-disk tests mount a small tmpfs, which takes root: run the suite as root")
    account = pwd.getpwnam(owner)
    mountpoint = Path(tempfile.mkdtemp(prefix="small-fs-"))
    options = f"size={size},mode=0755,uid={account.pw_uid},gid={account.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], check=True,
                   capture_output=True)
    try:
        yield mountpoint
    finally:
        # Lazily: a server that died on this filesystem may still be letting go of its files.
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True, capture_output=True)
        mountpoint.rmdir()


def free_bytes(path: Path) -> int:
    """What an ordinary user (the server) may still write on the filesystem of `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Write a file into folder `path` until its filesystem has at most `leave` bytes free; the file."""
    filler = path / "filler"
    with open(filler, "wb") as out:
        while free_bytes(path) > leave:
            try:
                out.write(b"\0" * min(_CHUNK, max(free_bytes(path) - leave, 4096)))
                out.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler
