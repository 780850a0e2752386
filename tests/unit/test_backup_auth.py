"""With a key, WAL metadata and manifests carry MACs bound to their names: an edit, a move
or a plaintext stand-in is refused by name before anything is restored."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from stellarbase.backup import auth, catalog, codec, verify
from stellarbase.backup.filerepo import FileRepository
from tests.unit.test_backup_codec import KEY, store

WAL = "wal/000000010000000000000003"


def test_metadata_mac_binds_every_field_and_the_name() -> None:
    meta = auth.seal_meta(KEY, WAL, {"sha256": "a" * 64, "mtime": "1700000000.0"})
    auth.check_meta(KEY, WAL, meta)
    with pytest.raises(auth.AuthError, match="does not match its MAC") as edited:
        auth.check_meta(KEY, WAL, {**meta, "mtime": "1800000000.0"})
    assert edited.value.message.startswith(WAL)
    with pytest.raises(auth.AuthError, match="does not match its MAC"):
        auth.check_meta(KEY, "wal/000000010000000000000004", meta)
    with pytest.raises(auth.AuthError, match="does not match its MAC"):
        auth.check_meta(os.urandom(32), WAL, meta)
    with pytest.raises(auth.LegacyFormat, match="older format"):
        auth.check_meta(KEY, WAL, {k: v for k, v in meta.items() if k != auth.MAC})


def signed_backup(tmp_path: Path) -> tuple[FileRepository, dict[str, Any]]:
    repo, manifest = store(tmp_path, KEY, part_bytes=200_000)
    doc: dict[str, Any] = {
        "format": catalog.MANIFEST_FORMAT,
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
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "codec": codec.ZSTD_AES,
        "parts": [dataclasses.asdict(p) for p in manifest.parts],
    }
    return repo, doc


def put_manifest(repo: FileRepository, doc: dict[str, Any]) -> None:
    repo.put("backups/b/manifest.json", json.dumps(doc).encode(), {})


def test_an_edited_or_legacy_manifest_is_never_used(tmp_path: Path) -> None:
    repo, doc = signed_backup(tmp_path)
    name = "backups/b/manifest.json"
    put_manifest(repo, auth.sign_manifest(KEY, name, doc))
    assert [b.id for b in catalog.load_catalog(repo, KEY).backups] == ["b"]

    put_manifest(repo, {**auth.sign_manifest(KEY, name, doc), "stop_lsn": "0/9000000"})
    with pytest.raises(auth.AuthError, match=name):  # restore loads it so: refused
        catalog.load_catalog(repo, KEY)
    edited = catalog.load_catalog(repo, KEY, tampered_ok=True)  # verify and list report it
    assert edited.backups == ()
    assert list(edited.tampered) == [name]
    report = verify.verify(repo, KEY)
    assert any(p.subject == name and "MAC" in p.message for p in report.problems)

    put_manifest(repo, doc)  # no MAC: an older release's manifest, or a stripped one
    with pytest.raises(auth.LegacyFormat, match=name) as exc:  # not "no complete backup"
        catalog.load_catalog(repo, KEY)
    assert "backup now" in exc.value.hint
    old = catalog.load_catalog(repo, KEY, tampered_ok=True)
    assert old.backups == () and "older format" in old.unreadable["b"]
    assert [b.id for b in catalog.load_catalog(repo, None).backups] == ["b"]


def test_parts_swapped_between_names_are_refused_before_restore(tmp_path: Path) -> None:
    repo, doc = signed_backup(tmp_path)
    put_manifest(repo, auth.sign_manifest(KEY, "backups/b/manifest.json", doc))
    cat = catalog.load_catalog(repo, KEY)
    [backup] = cat.backups
    verify.authenticate_restore(cat, backup, [])
    first, second = (tmp_path / "repo" / p.key for p in backup.parts[1:3])
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(auth.AuthError, match=backup.parts[1].key) as exc:
        verify.authenticate_restore(catalog.load_catalog(repo, KEY), backup, [])
    assert "moved here" in exc.value.message
    problems = verify.verify(repo, KEY).problems
    assert {p.subject for p in problems} >= {backup.parts[1].key, backup.parts[2].key}


@pytest.mark.parametrize("key", [None, KEY], ids=["no-key", "key"])
def test_verify_says_what_it_can_and_cannot_detect(tmp_path: Path, key: bytes | None) -> None:
    from stellarbase.commands.backup import BackupContext, backup_verify
    from stellarbase.paths import HostPaths

    ctx = BackupContext(HostPaths(tmp_path), config=None)  # type: ignore[arg-type]  # verify reads only the repository and the key
    ctx.__dict__.update(repo=FileRepository(tmp_path / "repo"), key=key)
    result = backup_verify(ctx)
    text = "\n".join(result.messages)
    assert result.data["authenticated"] is (key is not None)
    if key is None:
        assert "authenticated with backup.encryption_key: NO" in text
        assert any("replacing objects" in d for d in result.data["does_not_detect"])
        assert "does not detect: a writer with bucket access replacing objects" in text
    else:
        assert "authenticated with backup.encryption_key: yes" in text
        assert any("swapped between names" in d for d in result.data["detects"])
    assert any("damaged or truncated" in d for d in result.data["detects"])
