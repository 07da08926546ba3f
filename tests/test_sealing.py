"""Sealing of off-host copies: round trips, exact sizes, tampering, keys and memory, on real files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import traceback
import tracemalloc
from pathlib import Path

import pytest

from common.errors import SettingError
from offsite.sealing import (
    FRAME,
    HEADER,
    KEY_SETTING,
    MAGIC,
    SEALED_FRAME,
    TAG,
    Sealer,
    SealError,
    WrongKey,
    sealed_fingerprint,
)

ROOT = Path(__file__).resolve().parent.parent


def make_key_file(folder: Path, name: str = "remote.key", content: str | None = None, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(os.urandom(32).hex() + "\n" if content is None else content)
    path.chmod(mode)
    return path


@pytest.fixture
def sealer(tmp_path: Path) -> Sealer:
    return Sealer.from_key_file(make_key_file(tmp_path))


def seal_file(sealer: Sealer, plain: Path, sealed: Path, read_size: int) -> None:
    with plain.open("rb") as raw, sealed.open("wb") as out:
        reader = sealer.sealing_reader(raw)
        assert reader.readable() and not reader.seekable()
        while piece := reader.read(read_size):
            assert read_size < 0 or len(piece) <= read_size
            out.write(piece)


def open_file(sealer: Sealer, sealed: Path, opened: Path, write_size: int) -> None:
    data = sealed.read_bytes()
    with opened.open("wb") as out, sealer.opening_writer(out) as writer:
        step = write_size or len(data)  # a sealed stream is never empty: it has a header and a tag at least
        for start in range(0, len(data), step):
            writer.write(data[start:start + step])


def sealed_frames(sealer: Sealer, size: int) -> tuple[bytes, list[bytes]]:
    """Seal `size` random bytes and split the result into its header and its frames."""
    blob = sealer.seal_bytes(os.urandom(size))
    body = blob[HEADER:]
    return blob[:HEADER], [body[i:i + SEALED_FRAME] for i in range(0, len(body), SEALED_FRAME)]


def expect_seal_error(sealer: Sealer, blob: bytes) -> SealError:
    with pytest.raises(SealError) as caught:
        sealer.open_bytes(blob)
    assert "\n" not in str(caught.value)
    return caught.value


SIZES = [0, 1, FRAME, FRAME + 1, 3 * FRAME + FRAME // 2]


@pytest.mark.parametrize("size", SIZES, ids=["empty", "one-byte", "one-frame", "frame-plus-one", "3.5-frames"])
@pytest.mark.parametrize(("read_size", "write_size"), [(7, 65537), (65537, 7), (-1, 0)],
                         ids=["read7-write65537", "read65537-write7", "whole"])
def test_stream_round_trip(sealer: Sealer, tmp_path: Path, size: int, read_size: int, write_size: int) -> None:
    plain, sealed, opened = tmp_path / "plain", tmp_path / "sealed", tmp_path / "opened"
    plain.write_bytes(os.urandom(size))
    seal_file(sealer, plain, sealed, read_size)
    assert sealed.stat().st_size == sealer.sealed_size(size)
    open_file(sealer, sealed, opened, write_size)
    assert opened.read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, FRAME - 1, FRAME, FRAME + 1, 2 * FRAME, 2 * FRAME + 5])
def test_bytes_round_trip_and_exact_size(sealer: Sealer, size: int) -> None:
    data = os.urandom(size)
    blob = sealer.seal_bytes(data)
    assert len(blob) == sealer.sealed_size(size) == Sealer.sealed_size(size)
    assert sealer.open_bytes(blob) == data


def test_same_plaintext_seals_differently_each_time(sealer: Sealer) -> None:
    data = b'{"component": "db", "files": []}'
    first, second = sealer.seal_bytes(data), sealer.seal_bytes(data)
    assert first != second
    assert sealer.open_bytes(first) == sealer.open_bytes(second) == data


FLIPS = {
    "magic": 0,
    "version": len(MAGIC),
    "fingerprint": len(MAGIC) + 1,
    "stream-id-start": len(MAGIC) + 9,
    "stream-id-end": HEADER - 1,
    "first-frame": HEADER + 5,
    "first-tag": HEADER + SEALED_FRAME - 1,
    "middle": HEADER + SEALED_FRAME + FRAME // 2,
    "final-tag": -1,
}


@pytest.mark.parametrize("position", FLIPS.values(), ids=FLIPS.keys())
def test_a_flipped_bit_anywhere_fails(sealer: Sealer, position: int) -> None:
    blob = bytearray(sealer.seal_bytes(os.urandom(2 * FRAME + 100)))
    blob[position] ^= 0x10
    expect_seal_error(sealer, bytes(blob))


@pytest.mark.parametrize("frames_kept", [0, 1, 2])
def test_truncation_at_a_frame_boundary_fails_on_close(sealer: Sealer, tmp_path: Path, frames_kept: int) -> None:
    header, frames = sealed_frames(sealer, 2 * FRAME + 100)
    out_path = tmp_path / "opened"
    with out_path.open("wb") as out:
        writer = sealer.opening_writer(out)
        writer.write(header + b"".join(frames[:frames_kept]))  # every frame written so far opens
        with pytest.raises(SealError, match="truncated"):
            writer.close()
        with pytest.raises(SealError):  # and it stays failed
            writer.close()


@pytest.mark.parametrize("blob_size", [0, 5, HEADER])
def test_a_stub_too_short_to_hold_a_frame_fails(sealer: Sealer, blob_size: int) -> None:
    blob = sealer.seal_bytes(b"manifest")[:blob_size]
    assert "truncated" in str(expect_seal_error(sealer, blob))


def test_truncation_inside_the_final_frame_fails(sealer: Sealer) -> None:
    expect_seal_error(sealer, sealer.seal_bytes(os.urandom(FRAME + 100))[:-1])


def test_swapped_frames_fail(sealer: Sealer) -> None:
    header, frames = sealed_frames(sealer, 2 * FRAME + 100)
    expect_seal_error(sealer, header + frames[1] + frames[0] + frames[2])


def test_a_failed_writer_stays_failed(sealer: Sealer, tmp_path: Path) -> None:
    header, frames = sealed_frames(sealer, 2 * FRAME + 100)
    with (tmp_path / "opened").open("wb") as out:
        writer = sealer.opening_writer(out)
        with pytest.raises(SealError):
            writer.write(header + frames[1])
        for call in (lambda: writer.write(frames[0]), writer.close, writer.close):
            with pytest.raises(SealError):
                call()


def test_duplicated_frame_fails(sealer: Sealer) -> None:
    header, frames = sealed_frames(sealer, 2 * FRAME + 100)
    expect_seal_error(sealer, header + frames[0] + frames[0] + frames[1] + frames[2])


def test_frame_spliced_from_another_object_fails(sealer: Sealer) -> None:
    header, frames = sealed_frames(sealer, 2 * FRAME + 100)
    _, others = sealed_frames(sealer, 2 * FRAME + 100)
    message = str(expect_seal_error(sealer, header + frames[0] + others[1] + frames[2]))
    assert "frame 1" in message


def test_data_after_the_final_frame_fails(sealer: Sealer) -> None:
    blob = sealer.seal_bytes(os.urandom(FRAME + 100))
    expect_seal_error(sealer, blob + b"\0" * TAG)
    expect_seal_error(sealer, blob + blob)


def test_a_different_key_fails_naming_both_keys_fingerprints(sealer: Sealer, tmp_path: Path) -> None:
    other = Sealer.from_key_file(make_key_file(tmp_path, "other.key"))
    blob = sealer.seal_bytes(b"secret manifest")
    error = expect_seal_error(other, blob)
    assert isinstance(error, WrongKey) and KEY_SETTING in str(error)
    assert "encrypted with another key" in str(error)
    assert sealer.fingerprint in str(error) and other.fingerprint in str(error)
    assert sealed_fingerprint(blob) == sealer.fingerprint != other.fingerprint  # readable without a key
    assert len(sealer.fingerprint) == 16


def seal_in_format_1(master_key: bytes, plain: bytes) -> bytes:
    """What the toolkit wrote before key fingerprints: the format the module's docstring describes as version 1."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"rollback-toolkit sealing v1: encryption").derive(master_key)
    header = MAGIC + b"\x01" + os.urandom(16)
    frames = [plain[i:i + FRAME] for i in range(0, len(plain), FRAME)]
    if not frames or len(frames[-1]) == FRAME:
        frames.append(b"")
    base = int.from_bytes(header[len(MAGIC) + 1:][:12], "big")
    sealed = header
    for index, frame in enumerate(frames):
        final = b"\x01" if index == len(frames) - 1 else b"\x00"
        sealed += AESGCM(key).encrypt((base ^ index).to_bytes(12, "big"), frame,
                                      header + index.to_bytes(8, "big") + final)
    return sealed


@pytest.mark.parametrize("size", [0, 100, FRAME, FRAME + 100])
def test_an_object_sealed_before_fingerprints_still_opens(tmp_path: Path, size: int) -> None:
    master = os.urandom(32)
    key_file = make_key_file(tmp_path, content=master.hex())
    sealer = Sealer.from_key_file(key_file)
    plain = os.urandom(size)
    old = seal_in_format_1(master, plain)
    assert len(old) == Sealer.sealed_sizes(size)[1] and Sealer.sealed_sizes(size)[0] == Sealer.sealed_size(size)
    assert sealer.open_bytes(old) == plain and sealed_fingerprint(old) is None
    other = Sealer.from_key_file(make_key_file(tmp_path, "other.key"))
    error = expect_seal_error(other, old)
    assert isinstance(error, WrongKey) and "wrong key" in str(error)  # no fingerprint: the likely cause


def test_an_error_inside_the_with_block_is_not_masked(sealer: Sealer, tmp_path: Path) -> None:
    # The writer leaves its block first, with the KeyError in flight: it must not replace it by "truncated".
    with (tmp_path / "out").open("wb") as out, pytest.raises(KeyError), sealer.opening_writer(out) as writer:
        writer.write(sealer.seal_bytes(b"x")[:HEADER])
        raise KeyError("the download failed")


def test_name_for_hides_the_content_hash(sealer: Sealer, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"payload").hexdigest()
    other = Sealer.from_key_file(make_key_file(tmp_path, "other.key"))
    name = sealer.name_for(digest)
    assert name == sealer.name_for(digest) == sealer.name_for(digest.upper())
    assert len(name) == 64 and int(name, 16) >= 0
    assert name != digest
    assert name != other.name_for(digest)
    assert name != sealer.name_for(hashlib.sha256(b"other payload").hexdigest())


def test_no_plaintext_line_appears_in_the_sealed_text(sealer: Sealer, tmp_path: Path) -> None:
    plain = tmp_path / "dump.sql"
    lines = [f"INSERT INTO customers VALUES ({n}, 'customer-{n}@example.com');" for n in range(20_000)]
    plain.write_text("\n".join(lines) + "\n")
    sealed = tmp_path / "dump.sql.sealed"
    seal_file(sealer, plain, sealed, 65537)
    blob = sealed.read_bytes()
    assert len(blob) > FRAME  # several frames
    assert not [line for line in lines[::97] if line.encode() in blob]
    for word in (b"INSERT", b"customers", b"example.com"):  # in every line, so no line shows through
        assert word not in blob


def test_a_key_file_with_whitespace_and_upper_case_is_accepted(tmp_path: Path) -> None:
    key = os.urandom(32).hex()
    lower = Sealer.from_key_file(make_key_file(tmp_path, "lower.key", key))
    upper = Sealer.from_key_file(make_key_file(tmp_path, "upper.key", f"  \n{key.upper()}\r\n\n"))
    assert lower.name_for("a" * 64) == upper.name_for("a" * 64)
    assert upper.open_bytes(lower.seal_bytes(b"same key")) == b"same key"


KEY = os.urandom(32).hex()
BAD_KEY_FILES = {
    "too-short": (KEY[:62], 0o600, "64 hex"),
    "too-long": (KEY + "ab", 0o600, "64 hex"),
    "not-hex": ("zz" + KEY[2:], 0o600, "64 hex"),
    "spaced-hex": (" ".join(KEY[i:i + 2] for i in range(0, 64, 2)), 0o600, "64 hex"),
    "base64": ("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq8M=", 0o600, "64 hex"),
    "empty": ("", 0o600, "64 hex"),
    "huge": (KEY + " " * 10_000, 0o600, "64 hex"),
    "mode-0644": (KEY, 0o644, "chmod 600"),
    "mode-0640": (KEY, 0o640, "chmod 600"),
    "mode-0602": (KEY, 0o602, "chmod 600"),
}


@pytest.mark.parametrize(("content", "mode", "expected"), BAD_KEY_FILES.values(), ids=BAD_KEY_FILES.keys())
def test_a_bad_key_file_is_a_setting_error(tmp_path: Path, content: str, mode: int, expected: str) -> None:
    path = make_key_file(tmp_path, content=content, mode=mode)
    with pytest.raises(SettingError) as caught:
        Sealer.from_key_file(path)
    message = str(caught.value)
    assert KEY_SETTING in message and expected in message and "\n" not in message
    shown = "".join(traceback.format_exception(caught.value))  # what --verbose would print
    for secret in (KEY[:16], KEY[-16:], KEY[:16].upper(), KEY[2:4] + " " + KEY[4:6], "q83vEjRW"):
        assert secret not in shown


def test_a_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(SettingError) as caught:
        Sealer.from_key_file(tmp_path / "absent.key")
    assert KEY_SETTING in str(caught.value) and "openssl rand -hex 32" in str(caught.value)
    assert "put that key file back: a new key cannot read what the old one wrote" in str(caught.value)


def test_a_folder_or_fifo_as_key_file_is_a_setting_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.key", 0o600)
    (tmp_path / "folder.key").mkdir(mode=0o700)
    for name in ("fifo.key", "folder.key"):
        with pytest.raises(SettingError, match=KEY_SETTING):
            Sealer.from_key_file(tmp_path / name)


def test_streaming_fifty_megabytes_uses_bounded_memory(sealer: Sealer, tmp_path: Path) -> None:
    plain, opened = tmp_path / "plain", tmp_path / "opened"
    size = 50 * 1024 * 1024 + 12345
    with plain.open("wb") as out:
        for _ in range(50):
            out.write(os.urandom(1024 * 1024))
        out.write(os.urandom(12345))
    sealed_length = 0
    tracemalloc.start()
    try:
        with plain.open("rb") as raw, opened.open("wb") as out, sealer.opening_writer(out) as writer:
            reader = sealer.sealing_reader(raw)
            while piece := reader.read(1024 * 1024):
                sealed_length += len(piece)
                writer.write(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert sealed_length == sealer.sealed_size(size)
    assert hashlib.sha256(opened.read_bytes()).digest() == hashlib.sha256(plain.read_bytes()).digest()


def test_importing_the_module_does_not_load_cryptography() -> None:
    check = "import sys, offsite.sealing; sys.exit('cryptography' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0
