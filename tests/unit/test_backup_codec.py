"""The object codec: what goes in comes out, and damage, the wrong key, a plaintext object
under a key or an object moved to another name never passes.

Also the base backup's tar parts: cut between files, each a tar of its own, extracted
together into the same files, and damage named.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import os
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from stellarbase.backup import codec, extract, parts, tarstream
from stellarbase.backup.catalog import Manifest, Part
from stellarbase.backup.filerepo import FileRepository
from stellarbase.config import BackupConfig
from stellarbase.errors import StellarError

KEY = os.urandom(32)
BIG = os.urandom(1_500_000) + b"wal" * 1_000_000  # crosses several encrypted chunks
NAME = "wal/000000010000000000000003"
OTHER = "wal/000000010000000000000004"


def encode(data: bytes, key: bytes | None, name: str = NAME, backup_id: str = "") -> bytes:
    return codec.encode(data, 3, key, name=name, backup_id=backup_id)


def decode(
    stored: bytes, key: bytes | None, name: str = NAME, backup_id: str = "", *, as_: str = ""
) -> bytes:
    return codec.decode(stored, as_ or codec.codec_name(key), key, name=name, backup_id=backup_id)


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
@pytest.mark.parametrize("data", [b"", b"x", BIG], ids=["empty", "one-byte", "big"])
def test_round_trip(key: bytes | None, data: bytes) -> None:
    assert decode(encode(data, key), key) == data


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
def test_stream_encoder_matches_streaming_reader(key: bytes | None) -> None:
    encoder = codec.StreamEncoder(3, key, name=NAME)
    pieces = [encoder.write(BIG[i : i + 65536]) for i in range(0, len(BIG), 65536)]
    stored = b"".join(pieces) + encoder.finish()
    assert stored.startswith(encoder.header)
    with codec.decoding_reader(io.BytesIO(stored), codec.codec_name(key), key, name=NAME) as reader:
        out = b"".join(iter(lambda: reader.read(100_000), b""))
    assert out == BIG


def test_compresses() -> None:
    assert len(encode(b"\0" * 16 * 1024 * 1024, KEY)) < 64 * 1024


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
@pytest.mark.parametrize("cut", [1, 17, 1_000_000])
def test_truncation_is_detected(key: bytes | None, cut: int) -> None:
    stored = encode(BIG, key)
    with pytest.raises(codec.CodecError):
        decode(stored[:-cut], key)


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
def test_trailing_bytes_are_detected(key: bytes | None) -> None:
    stored = encode(b"segment", key)
    with pytest.raises(codec.CodecError, match="after"):
        decode(stored + b"\0", key)


def test_tampered_ciphertext_is_detected() -> None:
    stored = bytearray(encode(BIG, KEY))
    stored[len(stored) // 2] ^= 0x01
    with pytest.raises(codec.CodecError, match=r"wrong backup\.encryption_key, or the object"):
        decode(bytes(stored), KEY)


def test_wrong_key_and_missing_key() -> None:
    stored = encode(b"secret", KEY)
    with pytest.raises(codec.CodecError, match="decryption failed"):
        decode(stored, os.urandom(32))
    with pytest.raises(codec.CodecError, match=r"no backup\.encryption_key"):
        decode(stored, None, as_=codec.ZSTD_AES)


def test_with_a_key_a_plaintext_object_is_refused() -> None:
    """Anyone with write access to the bucket can write zstd: with a key it never passes."""
    planted = encode(b"forged WAL", None)
    with pytest.raises(codec.CodecError, match=r"stored as 'zstd', not encrypted"):
        decode(planted, KEY, as_=codec.ZSTD)
    # Nor by claiming to be encrypted: the bytes are not a sealed object.
    with pytest.raises(codec.CodecError, match="not an encrypted object"):
        decode(planted, KEY, as_=codec.ZSTD_AES)


@pytest.mark.parametrize(
    ("sealed_to", "read_as"),
    [
        ((NAME, ""), (OTHER, "")),
        (("backups/a/base.0001.tar.zst", "a"), ("backups/a/base.0001.tar.zst", "b")),
    ],
    ids=["another-name", "another-backup"],
)
def test_an_object_moved_to_another_name_or_backup_fails(
    sealed_to: tuple[str, str], read_as: tuple[str, str]
) -> None:
    stored = encode(BIG, KEY, *sealed_to)
    assert decode(stored, KEY, *sealed_to) == BIG
    with pytest.raises(codec.CodecError, match="moved here from another name"):
        decode(stored, KEY, *read_as)


def test_an_object_of_the_previous_format_is_named_as_such() -> None:
    """Version 1 sealed with the key itself and only the header as associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    prefix = os.urandom(7)
    header = b"SBAE\x01" + prefix
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(b"old segment")
    sealed = AESGCM(KEY).encrypt(prefix + struct.pack(">IB", 0, 1), packed, header)
    old = header + struct.pack(">I", len(sealed)) + sealed
    with pytest.raises(codec.CodecError, match="older format") as exc:
        decode(old, KEY)
    assert "backup now" in exc.value.hint


def test_sealing_needs_a_name() -> None:
    with pytest.raises(ValueError, match="bound to its repository key"):
        codec.encode(b"x", 3, KEY)


def test_encrypted_objects_do_not_repeat() -> None:
    # A fresh nonce prefix per object: equal plaintexts never give equal ciphertexts.
    assert encode(b"same", KEY) != encode(b"same", KEY)


def test_unknown_codec() -> None:
    with pytest.raises(codec.CodecError, match="unknown codec"):
        codec.decode(b"", "gzip", None)


def test_key_from_config() -> None:
    assert codec.encryption_key(BackupConfig()) is None
    configured = BackupConfig(encryption_key=base64.b64encode(KEY).decode())  # type: ignore[arg-type]
    assert codec.encryption_key(configured) == KEY


# --------------------------------------------------------------------------- tar parts


def make_tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """A ustar stream as pg_basebackup writes it; None content makes a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o600
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


MEMBERS: list[tuple[str, bytes | None]] = [
    ("backup_label", b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"),
    ("base", None),
    ("base/1", None),
    *[(f"base/1/{n}", os.urandom(n * 1000) + b"\0" * 70_000) for n in range(1, 40)],
    ("global", None),
    ("global/pg_control", os.urandom(8192)),
    ("global/empty", b""),
    ("base/1/big", os.urandom(300_000)),
    ("backup_manifest", b'{"WAL-Ranges": []}'),
]
TAR = make_tar(MEMBERS)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def store(tmp_path: Path, key: bytes | None, part_bytes: int) -> tuple[FileRepository, Manifest]:
    repo = FileRepository(tmp_path / "repo")
    stored = parts.store_parts(
        repo,
        "backups/b/",
        pieces(TAR, 4096 + 512),  # pieces that do not line up with tar blocks
        {"codec": codec.codec_name(key)},
        level=3,
        key=key,
        backup_id="b",
        part_bytes=part_bytes,
        wanted=("backup_label", "backup_manifest"),
    )
    manifest = Manifest.from_json(
        {
            "format": 3,
            "id": "b",
            "system_identifier": "1",
            "pg_version": 150000,
            "wal_segment_size": 16 << 20,
            "timeline": 1,
            "start_lsn": "0/2000028",
            "stop_lsn": "0/2000100",
            "start_wal": "000000010000000000000002",
            "stop_wal": "000000010000000000000002",
            "start_time": "2026-01-01T00:00:00Z",
            "stop_time": "2026-01-01T00:00:01Z",
            "raw_bytes": sum(p.raw_bytes for p in stored.parts),
            "stored_bytes": sum(p.stored_bytes for p in stored.parts),
            "codec": codec.codec_name(key),
            "parts": [dataclasses.asdict(p) for p in stored.parts],
        }
    )
    assert stored.files["backup_label"] == dict(MEMBERS)["backup_label"]
    assert stored.files["backup_manifest"] == dict(MEMBERS)["backup_manifest"]
    return repo, manifest


@pytest.mark.parametrize("key", [None, KEY], ids=["zstd", "zstd+aes"])
def test_parts_are_whole_tars_that_together_hold_the_stream(
    tmp_path: Path, key: bytes | None
) -> None:
    repo, manifest = store(tmp_path, key, part_bytes=200_000)
    assert len(manifest.parts) >= 4
    seen: list[str] = []
    for part in manifest.parts:
        raw = decode(repo.get(part.key), key, part.key, "b")
        assert len(raw) == part.raw_bytes
        assert repo.get(part.key).startswith(bytes.fromhex(part.header))
        assert hashlib.sha256(raw).hexdigest() == part.sha256
        assert repo.head(part.key).size == part.stored_bytes  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # each one a tar of its own
            for info in tar:
                member = tar.extractfile(info)
                assert (member.read() if member else None) == dict(MEMBERS)[info.name]
                seen.append(info.name)
    assert seen == [name for name, _ in MEMBERS]

    target = tmp_path / "data"
    target.mkdir()
    extracted = extract.extract_backup(repo, key, manifest, target, workers=3)
    assert extracted == manifest.raw_bytes
    for name, content in MEMBERS:
        path = target / name
        if content is None:
            assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o700
        else:
            assert path.read_bytes() == content
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert path.stat().st_mtime == 1_700_000_000


def test_a_damaged_part_fails_extraction_and_names_the_part(tmp_path: Path) -> None:
    repo, manifest = store(tmp_path, None, part_bytes=200_000)
    victim = manifest.parts[2]
    raw = decode(repo.get(victim.key), None)
    altered = raw.replace(b"\0" * 1000, b"\1" * 1000, 1)  # file bytes, headers intact
    assert altered != raw
    repo.put(victim.key, encode(altered, None), {"codec": codec.ZSTD})
    target = tmp_path / "data"
    target.mkdir()
    with pytest.raises(StellarError, match=f"{victim.key} does not match its manifest"):
        extract.extract_backup(repo, None, manifest, target)


def test_a_failed_stream_leaves_no_part(tmp_path: Path) -> None:
    repo = FileRepository(tmp_path / "repo")

    def failing() -> Iterator[bytes]:
        yield from pieces(TAR[: len(TAR) // 2], 4096)
        raise RuntimeError("pg_basebackup died")

    with pytest.raises(RuntimeError, match="died"):
        parts.store_parts(repo, "backups/b/", failing(), {}, level=3, key=None, part_bytes=50_000)
    assert list(repo.list("backups/")) == []

    def refuse(files: dict[str, bytes]) -> None:
        raise ValueError("no backup_label")

    with pytest.raises(ValueError, match="no backup_label"):
        parts.store_parts(
            repo, "backups/c/", [TAR], {}, level=3, key=None, part_bytes=50_000, check=refuse
        )
    assert list(repo.list("backups/")) == []


def test_old_single_object_manifest_reads_as_one_part() -> None:
    doc = {
        "format": 1,
        "id": "20260101T000000Z",
        "system_identifier": "1",
        "pg_version": 150000,
        "wal_segment_size": 16 << 20,
        "timeline": 1,
        "start_lsn": "0/2000028",
        "stop_lsn": "0/2000100",
        "start_wal": "000000010000000000000002",
        "stop_wal": "000000010000000000000002",
        "start_time": "2026-01-01T00:00:00Z",
        "stop_time": "2026-01-01T00:00:01Z",
        "raw_bytes": 1000,
        "stored_bytes": 100,
        "sha256": "a" * 64,
        "codec": "zstd",
        "objects": ["backups/20260101T000000Z/base.tar.zst"],
    }
    manifest = Manifest.from_json(doc)
    assert manifest.parts == (Part("backups/20260101T000000Z/base.tar.zst", "a" * 64, 1000, 100),)
    assert manifest.objects == ("backups/20260101T000000Z/base.tar.zst",)
    with pytest.raises(ValueError, match="format"):
        Manifest.from_json({**doc, "format": 4})


def extract_stream(target: Path, data: bytes) -> None:
    target.mkdir(exist_ok=True)
    extractor = tarstream.TarExtractor(target, sync=False)
    try:
        for piece in pieces(data, 700):
            extractor.feed(piece)
        extractor.finish()
    finally:
        extractor.close()


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "base/../../escape"])
def test_extraction_refuses_paths_outside_the_target(tmp_path: Path, name: str) -> None:
    target = tmp_path / "data"
    with pytest.raises(tarstream.TarError, match="outside the data directory"):
        extract_stream(target, make_tar([(name, b"x")]))
    assert not (tmp_path / "escape").exists()


def test_extraction_refuses_links_truncation_and_damaged_headers(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        link = tarfile.TarInfo("pg_tblspc/16400")
        link.type, link.linkname = tarfile.SYMTYPE, "/srv/elsewhere"
        tar.addfile(link)
    with pytest.raises(tarstream.TarError, match="not a regular file or directory"):
        extract_stream(tmp_path / "a", out.getvalue())

    with pytest.raises(tarstream.TarError, match="truncated"):
        extract_stream(tmp_path / "b", TAR[: len(TAR) // 2])
    without_end = TAR[: TAR.index(tarstream.END_OF_ARCHIVE, len(TAR) - 10240)]
    with pytest.raises(tarstream.TarError, match="truncated"):
        extract_stream(tmp_path / "c", without_end)

    damaged = bytearray(TAR)
    damaged[0] ^= 0x01  # the first header's name: its checksum no longer matches
    with pytest.raises(tarstream.TarError, match="checksum"):
        extract_stream(tmp_path / "d", bytes(damaged))
