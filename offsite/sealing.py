"""Client-side sealing (AES-256-GCM) of the off-host copies, so whoever can read the bucket reads nothing.

The master key lives in REMOTE_ENCRYPTION_KEY_FILE: 32 random bytes as 64 hex characters, mode 0600.
HKDF-SHA256 derives two independent subkeys from it: one seals content, one names objects
(hex HMAC-SHA256 of the content's sha256), so an object name tells nothing about what it holds.

Sealed format, version 2:

    header   MAGIC (6 bytes "RBSEAL") | version (1 byte, 2) | key fingerprint (8 bytes) | stream id (16 random bytes)
    frames   AES-GCM ciphertext of up to FRAME (1 MiB) plaintext bytes, each followed by its 16-byte tag

The key fingerprint is the first 8 bytes of a third HKDF subkey: it names the key an object was sealed with
(so another key's object is told apart from a damaged one) and tells nothing about the key itself.
Every frame but the last holds exactly FRAME plaintext bytes; the last (final) frame holds fewer, possibly
none, so the empty plaintext is one empty final frame and a multiple of FRAME ends with an empty final frame.
Frame i is sealed under the nonce (first 12 bytes of the stream id) XOR i, which never repeats within an
object, while the random stream id keeps objects apart. Its associated data is header | i (8 bytes, big
endian) | final flag (1 byte), so a changed header, frames reordered, dropped or spliced from another
object, and a stream cut at a frame boundary all fail to authenticate. The sealed size of n plaintext bytes
is HEADER + n + (n // FRAME + 1) * TAG.

Version 1, written before the fingerprint, is the same without it (a HEADER_V1 of 23 bytes); it still opens.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, cast

from common.errors import SettingError, ToolkitError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SETTING = "REMOTE_ENCRYPTION_KEY_FILE"
MAGIC = b"RBSEAL"
VERSION = 2
STREAM_ID_SIZE = 16
FINGERPRINT_SIZE = 8
HEADER = len(MAGIC) + 1 + FINGERPRINT_SIZE + STREAM_ID_SIZE
HEADER_V1 = len(MAGIC) + 1 + STREAM_ID_SIZE  # version 1: no fingerprint
FRAME = 1024 * 1024
TAG = 16
SEALED_FRAME = FRAME + TAG
NONCE_SIZE = 12
_KEY_FILE_LIMIT = 4096  # far more than 64 hex characters and some whitespace
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_WRONG_KEY = f"cannot be opened with this {KEY_SETTING}: wrong key, or the object was changed"


class SealError(ToolkitError):
    """A sealed object that does not open: wrong key, or changed, damaged or truncated."""


class WrongKey(SealError):
    """A sealed object that names another key than this one (or, sealed before fingerprints, may be another's)."""


class Sealer:
    """Seals and opens objects, and names them, with the subkeys of one master key."""

    def __init__(self, master_key: bytes):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")

        def subkey(label: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(master_key)

        self._aead = AESGCM(subkey(b"rollback-toolkit sealing v1: encryption"))
        self._naming_key = subkey(b"rollback-toolkit sealing v1: object names")
        self._fingerprint = subkey(b"rollback-toolkit sealing v2: key fingerprint")[:FINGERPRINT_SIZE]

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint as 16 hex characters, as sealed objects carry it: safe to show."""
        return self._fingerprint.hex()

    @classmethod
    def from_key_file(cls, path: Path) -> Sealer:
        """A Sealer from the key file; any problem with the file is a SettingError naming the setting."""
        path = Path(path)
        make = (f"if copies were pushed with a key before, put that key file back: a new key cannot read what "
                f"the old one wrote; only for copies not yet pushed, make one with: (umask 077 && openssl rand "
                f"-hex 32 > {path}) and keep a copy off this host")
        try:
            # O_NONBLOCK so that a FIFO put in the key's place cannot hang the run.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SettingError(f"{KEY_SETTING} {path}: no such file; {make}") from None
        except OSError as exc:
            raise SettingError(f"{KEY_SETTING} {path}: cannot open it: {exc.strerror}") from None
        try:
            st = os.fstat(fd)  # the file actually opened, not whatever the path names a moment later
            if not stat.S_ISREG(st.st_mode):
                raise SettingError(f"{KEY_SETTING} {path} is not a regular file; {make}")
            if st.st_mode & 0o077:
                raise SettingError(f"{KEY_SETTING} {path} is open to group or others "
                                   f"(mode {stat.S_IMODE(st.st_mode):04o}): run chmod 600 {path}")
            content = os.read(fd, _KEY_FILE_LIMIT + 1)
        except OSError as exc:
            raise SettingError(f"{KEY_SETTING} {path}: cannot read it: {exc.strerror}") from None
        finally:
            os.close(fd)
        # Never echo the content: it may be the key, or something close to it.
        text = content.decode("ascii", errors="replace").strip()
        if len(content) > _KEY_FILE_LIMIT or not _HEX64.fullmatch(text):
            # No advice to overwrite it: it may be the right key in another form, needed for older copies.
            raise SettingError(f"{KEY_SETTING} {path} must hold 32 random bytes as 64 hex characters, "
                               "as made by: openssl rand -hex 32")
        return cls(bytes.fromhex(text))

    def name_for(self, sha256_hex: str) -> str:
        """The object name for content with this sha256: hex HMAC-SHA256 under the naming key."""
        if not _HEX64.fullmatch(sha256_hex):
            raise ValueError("name_for expects a sha256 as 64 hex characters")
        return hmac.new(self._naming_key, sha256_hex.lower().encode("ascii"), hashlib.sha256).hexdigest()

    @staticmethod
    def sealed_size(plain_size: int) -> int:
        """The exact size of the sealed form of `plain_size` plaintext bytes."""
        if plain_size < 0:
            raise ValueError("a size cannot be negative")
        return HEADER + plain_size + (plain_size // FRAME + 1) * TAG

    @staticmethod
    def sealed_sizes(plain_size: int) -> tuple[int, int]:
        """The sizes a sealed object of `plain_size` plaintext bytes can have: this version's, then version 1's."""
        size = Sealer.sealed_size(plain_size)
        return size, size - FINGERPRINT_SIZE

    def seal_bytes(self, data: bytes) -> bytes:
        """The sealed form of a small object held in memory (a manifest)."""
        return self.sealing_reader(io.BytesIO(data)).read()

    def open_bytes(self, blob: bytes) -> bytes:
        """The plaintext of a small sealed object; SealError if it does not open."""
        out = io.BytesIO()
        with self.opening_writer(out) as writer:
            writer.write(blob)
        return out.getvalue()

    def sealing_reader(self, raw: BinaryIO) -> BinaryIO:
        """A read-only stream of the sealed form of what `raw` holds, made one frame at a time."""
        return cast(BinaryIO, _SealingReader(self._aead, self._fingerprint, raw))

    def opening_writer(self, out: BinaryIO) -> OpeningWriter:
        """A sink for a sealed stream in any pieces that writes its plaintext to `out`; see OpeningWriter."""
        return OpeningWriter(self._aead, self._fingerprint, out)


def sealed_fingerprint(blob: bytes) -> str | None:
    """The key fingerprint a sealed object names (hex), read without any key; None for version 1 or no seal."""
    if blob.startswith(MAGIC) and len(blob) >= HEADER and blob[len(MAGIC)] == VERSION:
        return blob[len(MAGIC) + 1:][:FINGERPRINT_SIZE].hex()
    return None


def _nonce(header: bytes, index: int) -> bytes:
    base = int.from_bytes(header[-STREAM_ID_SIZE:][:NONCE_SIZE], "big")  # the stream id ends every header
    return (base ^ index).to_bytes(NONCE_SIZE, "big")


def _associated_data(header: bytes, index: int, final: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


class _SealingReader(io.RawIOBase):
    """Reads plaintext from `raw` and hands out the sealed stream; holds at most one sealed frame."""

    def __init__(self, aead: AESGCM, fingerprint: bytes, raw: BinaryIO):
        self._aead, self._raw = aead, raw
        self._header = MAGIC + bytes([VERSION]) + fingerprint + os.urandom(STREAM_ID_SIZE)
        self._pending = memoryview(self._header)  # sealed bytes made but not handed out yet
        self._index = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        # Fill the whole buffer unless the stream ends: multipart uploads take a short read for the end.
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if not self._pending:
                self._pending = memoryview(b"")  # let the used frame go before making the next one
                if self._done:
                    break
                self._pending = memoryview(self._next_frame())
            take = min(len(target) - filled, len(self._pending))
            target[filled:filled + take] = self._pending[:take]
            self._pending = self._pending[take:]
            filled += take
        return filled

    def _next_frame(self) -> bytes:
        plain = self._raw.read(FRAME) or b""
        if 0 < len(plain) < FRAME:  # a short read is not the end until read() returns nothing
            plain = bytearray(plain)
            while len(plain) < FRAME and (more := self._raw.read(FRAME - len(plain))):
                plain += more
        final = len(plain) < FRAME
        sealed = self._aead.encrypt(_nonce(self._header, self._index), plain,
                                    _associated_data(self._header, self._index, final))
        self._index += 1
        self._done = final
        return sealed


class OpeningWriter:
    """Takes a sealed stream in pieces of any size and writes its plaintext to `out`, frame by frame.

    close() (or leaving the `with` block) checks that the final frame came. Plaintext reaches `out` before
    the whole stream is checked, so the caller keeps it aside until close() succeeds. `out` is not closed.
    """

    def __init__(self, aead: AESGCM, fingerprint: bytes, out: BinaryIO):
        self._aead, self._fingerprint, self._out = aead, fingerprint, out
        self._buffer = bytearray()
        self._header: bytes | None = None
        self._index = 0
        self._closed = False
        self._error: Exception | None = None  # after a failure the output is incomplete: refuse to go on

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        """Take the next piece of the sealed stream; SealError as soon as a frame does not authenticate."""
        if self._closed and self._error is None:
            raise ValueError("write to a closed opening writer")
        self._guarded(self._take, data)
        return len(data)

    def close(self) -> None:
        """Open the final frame; SealError if the stream was cut short or does not authenticate."""
        if self._closed and self._error is None:
            return
        self._closed = True
        self._guarded(self._finish)

    def _guarded(self, step: Callable[..., None], *args: bytes) -> None:
        # After any failure the plaintext written so far is incomplete: every later call fails the same way.
        if self._error is not None:
            raise self._error
        try:
            step(*args)
        except Exception as exc:
            self._error = exc
            raise

    def _take(self, data: bytes) -> None:
        self._buffer += data
        if self._header is None:
            if len(self._buffer) <= len(MAGIC):
                return
            size = self._header_size(bytes(self._buffer[:len(MAGIC) + 1]))
            if len(self._buffer) < size:
                return
            self._header = self._check_fingerprint(bytes(self._buffer[:size]))
            del self._buffer[:size]
        # A whole sealed frame's worth is never the final frame (that one is shorter): open it now.
        if len(self._buffer) >= SEALED_FRAME:
            start = 0
            with memoryview(self._buffer) as view:
                while len(view) - start >= SEALED_FRAME:
                    self._open_frame(view[start:start + SEALED_FRAME], final=False)
                    start += SEALED_FRAME
            del self._buffer[:start]  # once per write, so a large piece is not moved frame after frame

    def _finish(self) -> None:
        if self._header is None or len(self._buffer) < TAG:
            raise SealError("sealed object is truncated: it ends before its final frame")
        self._open_frame(memoryview(self._buffer), final=True)
        self._buffer = bytearray()

    def __enter__(self) -> OpeningWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # the block's own error is the one to report

    @staticmethod
    def _header_size(start: bytes) -> int:
        if not start.startswith(MAGIC):
            raise SealError("not a sealed object: its header is missing or damaged")
        version = start[len(MAGIC)]
        if version not in (1, VERSION):
            raise SealError(f"sealed object has format version {version}, which this toolkit cannot "
                            "open: it was damaged, or sealed by a newer toolkit")
        return HEADER if version == VERSION else HEADER_V1

    def _check_fingerprint(self, header: bytes) -> bytes:
        theirs = header[len(MAGIC) + 1:][:FINGERPRINT_SIZE] if len(header) == HEADER else None
        if theirs is not None and theirs != self._fingerprint:
            raise WrongKey(f"encrypted with another key (key fingerprint {theirs.hex()}; this {KEY_SETTING} has "
                           f"{self._fingerprint.hex()}): set {KEY_SETTING} to the key it was pushed with")
        return header

    def _open_frame(self, sealed: memoryview, final: bool) -> None:
        from cryptography.exceptions import InvalidTag

        assert self._header is not None
        try:
            plain = self._aead.decrypt(_nonce(self._header, self._index), sealed,
                                       _associated_data(self._header, self._index, final))
        except InvalidTag:
            # The fingerprint names the key (version 2): a frame that fails is the object itself. Without it,
            # the first frame failing most likely means another key.
            if self._index == 0 and len(self._header) == HEADER_V1:
                raise WrongKey(f"sealed object {_WRONG_KEY}") from None
            raise SealError(f"sealed object was changed, damaged or cut short: frame {self._index} does not open"
                            ) from None
        self._out.write(plain)
        self._index += 1
