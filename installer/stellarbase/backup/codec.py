"""How repository objects are encoded: zstd, then optionally AES-256-GCM in framed chunks.

Encrypted layout (STREAM construction): a 12-byte header (`SBAE`, version 2, a random
7-byte nonce prefix), then chunks of `<u32 big-endian length><ciphertext + 16-byte tag>`.
Each chunk's nonce is prefix ‖ counter (u32) ‖ last-flag (1 byte). The associated data
is the header and the object's binding (its repository key and backup id, see `auth`),
so reordering, splicing between objects, truncation and moving an object to another name
all fail the tag or the final-chunk check. The AES key is a subkey derived from
`backup.encryption_key`.

With a key configured, only this codec is accepted: a plain `zstd` object could have
been written by anyone with write access to the store. Version 1 objects (the key used
as it is, the header alone as associated data) are recognised and refused by name.
Without a key, the zstd frame's own checksum and end marker catch a damaged or
truncated object.
"""

from __future__ import annotations

import base64
import io
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stellarbase.backup import auth
from stellarbase.config import BackupConfig
from stellarbase.errors import ExitCode, StellarError

ZSTD = "zstd"
ZSTD_AES = "zstd+aes256gcm"
CODECS = (ZSTD, ZSTD_AES)

_MAGIC = b"SBAE\x02"
_MAGIC_V1 = b"SBAE\x01"
_PREFIX_LEN = 7
_HEADER_LEN = len(_MAGIC) + _PREFIX_LEN
_TAG_LEN = 16
_CHUNK = 1024 * 1024  # plaintext bytes per encrypted chunk
_LEN = struct.Struct(">I")
_READ = 256 * 1024
_FEED = 64 * 1024  # compressed bytes per decompression call


class CodecError(StellarError):
    """Stored bytes that do not decode: tampered, truncated, or the wrong key."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(
            message,
            hint=hint
            or "check backup.encryption_key; a damaged object must be restored from another backup",
            code=ExitCode.BACKUP,
        )


def codec_name(key: bytes | None) -> str:
    return ZSTD if key is None else ZSTD_AES


def encryption_key(backup: BackupConfig) -> bytes | None:
    """The configured AES-256 key (the config already checked it is base64 of 32 bytes)."""
    if backup.encryption_key is None:
        return None
    return base64.b64decode(backup.encryption_key.get_secret_value(), validate=True)


HEADER_LEN = _HEADER_LEN


def _associated(header: bytes, name: str, backup_id: str) -> bytes:
    if not name:
        raise ValueError("an encrypted object is bound to its repository key")
    return header + auth.binding(name, backup_id)


def encode(
    data: bytes, level: int, key: bytes | None, *, name: str = "", backup_id: str = ""
) -> bytes:
    """`data` encoded; with `key`, sealed to `name` (its repository key) and `backup_id`."""
    encoder = StreamEncoder(level, key, size=len(data), name=name, backup_id=backup_id)
    return encoder.write(data) + encoder.finish()


def decode(
    data: bytes, codec: str, key: bytes | None, *, name: str = "", backup_id: str = ""
) -> bytes:
    with decoding_reader(io.BytesIO(data), codec, key, name=name, backup_id=backup_id) as reader:
        return reader.read()


class _Sealer:
    """Cuts a byte stream into encrypted chunks; the last one is flagged on finish()."""

    def __init__(self, key: bytes, name: str, backup_id: str) -> None:
        self._aead = AESGCM(auth.object_key(key))
        prefix = os.urandom(_PREFIX_LEN)
        self.header = _MAGIC + prefix
        self._associated = _associated(self.header, name, backup_id)
        self._prefix = prefix
        self._counter = 0
        self._pending = bytearray()
        self._started = False

    def _seal(self, plain: bytes, last: bool) -> bytes:
        nonce = self._prefix + struct.pack(">IB", self._counter, 1 if last else 0)
        self._counter += 1
        sealed = self._aead.encrypt(nonce, plain, self._associated)
        return _LEN.pack(len(sealed)) + sealed

    def _opening(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self.header

    def write(self, data: bytes) -> bytes:
        self._pending += data
        out = [self._opening()]
        # Keep at least one byte back so finish() always has a chunk to flag as last.
        while len(self._pending) > _CHUNK:
            out.append(self._seal(bytes(self._pending[:_CHUNK]), last=False))
            del self._pending[:_CHUNK]
        return b"".join(out)

    def finish(self) -> bytes:
        out = self._opening() + self._seal(bytes(self._pending), last=True)
        self._pending.clear()
        return out


class StreamEncoder:
    """Incremental encoder: feed write() and send what it returns; finish() ends the object."""

    def __init__(
        self,
        level: int,
        key: bytes | None,
        size: int = -1,
        threads: int = 0,
        *,
        name: str = "",
        backup_id: str = "",
    ) -> None:
        # threads > 0 (or -1: one per CPU) compresses in zstd's own worker threads, for
        # long streams such as a base backup; the output is one ordinary zstd frame.
        compressor = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=size >= 0, threads=threads
        )
        self._zstd = compressor.compressobj(size=size)
        self._sealer = _Sealer(key, name, backup_id) if key is not None else None

    @property
    def header(self) -> bytes:
        """The sealed object's first bytes (its random nonce prefix): b"" without a key."""
        return self._sealer.header if self._sealer is not None else b""

    def write(self, data: bytes) -> bytes:
        packed = self._zstd.compress(data)
        return self._sealer.write(packed) if self._sealer else packed

    def finish(self) -> bytes:
        packed = self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        if self._sealer is None:
            return packed
        return self._sealer.write(packed) + self._sealer.finish()


class _Opener:
    """Reads sealed chunks from `raw` and returns their plaintext, in order."""

    def __init__(self, raw: BinaryIO, key: bytes, name: str, backup_id: str) -> None:
        self._raw = raw
        self._name = name
        self._backup_id = backup_id
        self._aead = AESGCM(auth.object_key(key))
        self._header = b""
        self._associated = b""
        self._counter = 0
        self._done = False

    def _read_exact(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = self._raw.read(n - len(buf))
            if not piece:
                raise CodecError(f"encrypted object truncated (in {what})")
            buf += piece
        return bytes(buf)

    def next_chunk(self) -> bytes | None:
        """The next chunk's plaintext, or None after the final chunk (checked for trailers)."""
        if self._done:
            return None
        if not self._header:
            header = self._read_exact(_HEADER_LEN, "header")
            if header.startswith(_MAGIC_V1):
                raise CodecError(auth.LEGACY_WHY, auth.NEW_BACKUP_HINT)
            if not header.startswith(_MAGIC):
                raise CodecError("not an encrypted object of a known format")
            self._header = header
            self._associated = _associated(header, self._name, self._backup_id)
        (length,) = _LEN.unpack(self._read_exact(_LEN.size, "chunk length"))
        if not _TAG_LEN <= length <= _CHUNK + _TAG_LEN:
            raise CodecError(f"encrypted object damaged: chunk length {length}")
        sealed = self._read_exact(length, "chunk")
        prefix = self._header[len(_MAGIC) :]
        for last in (False, True):
            nonce = prefix + struct.pack(">IB", self._counter, 1 if last else 0)
            try:
                plain = self._aead.decrypt(nonce, sealed, self._associated)
            except InvalidTag:
                continue
            self._counter += 1
            if last:
                self._done = True
                if self._raw.read(1):
                    raise CodecError("encrypted object has bytes after its final chunk")
            return plain
        raise CodecError(
            "decryption failed: wrong backup.encryption_key, or the object was altered "
            "or moved here from another name"
        )


def decoded_chunks(
    raw: BinaryIO, codec: str, key: bytes | None, *, name: str = "", backup_id: str = ""
) -> Iterator[bytes]:
    """The original bytes of a stored object, in pieces as they are decoded.

    With `key`, the object must be sealed to `name` and `backup_id` in the current format.
    Damage raises CodecError, at the latest when the end is reached. `raw` is not closed.
    """
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if codec == ZSTD_AES and key is None:
        raise CodecError("object is encrypted but no backup.encryption_key is configured")
    if key is not None and codec != ZSTD_AES:
        raise CodecError(
            f"stored as {codec!r}, not encrypted, but backup.encryption_key is set: refused, "
            "as anyone with write access to the store could have written it",
            auth.NEW_BACKUP_HINT,
        )
    opener = _Opener(raw, key, name, backup_id) if key is not None else None
    zstd = zstandard.ZstdDecompressor().decompressobj()
    while True:
        packed = opener.next_chunk() if opener is not None else raw.read(_READ) or None
        if packed is None:
            if not zstd.eof:
                raise CodecError("compressed object truncated: zstd frame not complete")
            return
        # Small inputs keep each decoded piece small: a base backup compresses 20-fold.
        for start in range(0, len(packed), _FEED):
            if zstd.eof:
                raise CodecError("compressed object has bytes after its zstd frame")
            try:
                out = zstd.decompress(packed[start : start + _FEED])
            except zstandard.ZstdError as exc:
                raise CodecError(f"compressed object damaged: {exc}") from None
            if zstd.eof and zstd.unused_data:
                raise CodecError("compressed object has bytes after its zstd frame")
            if out:
                yield out


class _DecodingRaw(io.RawIOBase):
    def __init__(
        self, raw: BinaryIO, codec: str, key: bytes | None, name: str, backup_id: str
    ) -> None:
        self._raw = raw
        self._chunks = decoded_chunks(raw, codec, key, name=name, backup_id=backup_id)
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # RawIOBase's buffer type is broader
        if self._pos >= len(self._out):
            self._out, self._pos = next(self._chunks, b""), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def decoding_reader(
    raw: BinaryIO, codec: str, key: bytes | None, *, name: str = "", backup_id: str = ""
) -> BinaryIO:
    """A streaming reader of the original bytes; closing it closes `raw`.

    Damage raises CodecError from read(), at the latest when the end is reached.
    """
    return io.BufferedReader(_DecodingRaw(raw, codec, key, name, backup_id), buffer_size=_READ)
