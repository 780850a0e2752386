"""The object codec: what goes in comes out, and damage or the wrong key never passes."""

from __future__ import annotations

import base64
import io
import os

import pytest

from stellarbase.backup import codec
from stellarbase.config import BackupConfig

KEY = os.urandom(32)
BIG = os.urandom(1_500_000) + b"wal" * 1_000_000  # crosses several encrypted chunks


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
@pytest.mark.parametrize("data", [b"", b"x", BIG], ids=["empty", "one-byte", "big"])
def test_round_trip(key: bytes | None, data: bytes) -> None:
    name = codec.codec_name(key)
    assert codec.decode(codec.encode(data, 3, key), name, key) == data


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
def test_stream_encoder_matches_streaming_reader(key: bytes | None) -> None:
    encoder = codec.StreamEncoder(3, key)
    pieces = [encoder.write(BIG[i : i + 65536]) for i in range(0, len(BIG), 65536)]
    stored = b"".join(pieces) + encoder.finish()
    with codec.decoding_reader(io.BytesIO(stored), codec.codec_name(key), key) as reader:
        out = b"".join(iter(lambda: reader.read(100_000), b""))
    assert out == BIG


def test_compresses() -> None:
    assert len(codec.encode(b"\0" * 16 * 1024 * 1024, 3, KEY)) < 64 * 1024


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
@pytest.mark.parametrize("cut", [1, 17, 1_000_000])
def test_truncation_is_detected(key: bytes | None, cut: int) -> None:
    stored = codec.encode(BIG, 3, key)
    with pytest.raises(codec.CodecError):
        codec.decode(stored[:-cut], codec.codec_name(key), key)


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
def test_trailing_bytes_are_detected(key: bytes | None) -> None:
    stored = codec.encode(b"segment", 3, key)
    with pytest.raises(codec.CodecError, match="after"):
        codec.decode(stored + b"\0", codec.codec_name(key), key)


def test_tampered_ciphertext_is_detected() -> None:
    stored = bytearray(codec.encode(BIG, 3, KEY))
    stored[len(stored) // 2] ^= 0x01
    with pytest.raises(codec.CodecError, match=r"wrong backup\.encryption_key, or the object"):
        codec.decode(bytes(stored), codec.ZSTD_AES, KEY)


def test_wrong_key_and_missing_key() -> None:
    stored = codec.encode(b"secret", 3, KEY)
    with pytest.raises(codec.CodecError, match="decryption failed"):
        codec.decode(stored, codec.ZSTD_AES, os.urandom(32))
    with pytest.raises(codec.CodecError, match=r"no backup\.encryption_key"):
        codec.decode(stored, codec.ZSTD_AES, None)


def test_encrypted_objects_do_not_repeat() -> None:
    # A fresh nonce prefix per object: equal plaintexts never give equal ciphertexts.
    assert codec.encode(b"same", 3, KEY) != codec.encode(b"same", 3, KEY)


def test_unknown_codec() -> None:
    with pytest.raises(codec.CodecError, match="unknown codec"):
        codec.decode(b"", "gzip", None)


def test_key_from_config() -> None:
    assert codec.encryption_key(BackupConfig()) is None
    configured = BackupConfig(encryption_key=base64.b64encode(KEY).decode())  # type: ignore[arg-type]
    assert codec.encryption_key(configured) == KEY
