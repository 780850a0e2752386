"""`backups/<id>/manifest.json`: what one complete base backup holds, read and checked.

With a key, a manifest is authenticated as it is read (see `auth`): one that fails its MAC
raises AuthError, one of an older format LegacyFormat. Who uses it: `catalog` (which
re-exports these names), `basebackup` (the format it writes), `verify`, `restore`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from stellarbase.backup import auth, codec, walnames
from stellarbase.backup.store import Repository

BACKUPS_PREFIX = "backups/"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 3  # formats 1 and 2 are still read without a key
ID_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Part:
    """One object of a base backup: a tar of whole files, encoded; its checksum is of the tar."""

    key: str
    sha256: str
    raw_bytes: int
    stored_bytes: int
    header: str = ""  # hex of the sealed object's first bytes (format 3, with a key)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Part:
        return cls(
            key=str(doc["key"]),
            sha256=str(doc["sha256"]),
            raw_bytes=int(doc["raw_bytes"]),
            stored_bytes=int(doc["stored_bytes"]),
            header=str(doc.get("header", "")),
        )


@dataclass(frozen=True)
class Manifest:
    """`backups/<id>/manifest.json`: a complete base backup.

    Format 2 lists the parts the tar stream was cut into, each with its own checksum;
    format 1 (one object, `base.tar.zst`, checksum at the top level) reads as one part.
    Format 3 adds each part's sealed header and, with a key, the manifest's MAC.
    """

    id: str
    label: str
    system_identifier: str
    pg_version: int
    wal_segment_size: int
    timeline: int
    start_lsn: int
    stop_lsn: int
    start_wal: str
    stop_wal: str
    start_time: datetime
    stop_time: datetime
    raw_bytes: int
    stored_bytes: int
    codec: str
    parts: tuple[Part, ...]

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        """Raises ValueError (or KeyError/TypeError) on a malformed manifest."""
        version = doc.get("format")
        if version not in (1, 2, MANIFEST_FORMAT):
            raise ValueError(f"unknown manifest format {version!r}")
        backup_id = str(doc["id"])
        if version == 1:
            parts: tuple[Part, ...] = (
                Part(
                    f"{BACKUPS_PREFIX}{backup_id}/base.tar.zst",
                    str(doc["sha256"]),
                    int(doc["raw_bytes"]),
                    int(doc["stored_bytes"]),
                ),
            )
        else:
            parts = tuple(Part.from_json(p) for p in doc["parts"])
        if not parts:
            raise ValueError("a manifest without parts")
        return cls(
            id=backup_id,
            label=str(doc.get("label", "")),
            system_identifier=str(doc["system_identifier"]),
            pg_version=int(doc["pg_version"]),
            wal_segment_size=int(doc["wal_segment_size"]),
            timeline=int(doc["timeline"]),
            start_lsn=walnames.parse_lsn(str(doc["start_lsn"])),
            stop_lsn=walnames.parse_lsn(str(doc["stop_lsn"])),
            start_wal=str(doc["start_wal"]),
            stop_wal=str(doc["stop_wal"]),
            start_time=_parse_time(str(doc["start_time"])),
            stop_time=_parse_time(str(doc["stop_time"])),
            raw_bytes=int(doc["raw_bytes"]),
            stored_bytes=int(doc["stored_bytes"]),
            codec=str(doc["codec"]),
            parts=parts,
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest as `take_backup` writes it (the current format; the MAC is added
        over exactly these fields, so their names, values and order stay as they are)."""
        return {
            "format": MANIFEST_FORMAT,
            "id": self.id,
            "label": self.label,
            "system_identifier": self.system_identifier,
            "pg_version": self.pg_version,
            "wal_segment_size": self.wal_segment_size,
            "timeline": self.timeline,
            "start_lsn": walnames.format_lsn(self.start_lsn),
            "stop_lsn": walnames.format_lsn(self.stop_lsn),
            "start_wal": self.start_wal,
            "stop_wal": self.stop_wal,
            "start_time": _format_time(self.start_time),
            "stop_time": _format_time(self.stop_time),
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "codec": self.codec,
            "parts": [dataclasses.asdict(p) for p in self.parts],
        }

    @property
    def objects(self) -> tuple[str, ...]:
        """The keys of the backup's data objects (not the manifest)."""
        return tuple(p.key for p in self.parts)


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"time without a zone: {text!r}")
    return value.astimezone(UTC)


def manifest_key(backup_id: str) -> str:
    return f"{BACKUPS_PREFIX}{backup_id}/{MANIFEST}"


def id_time(backup_id: str) -> datetime | None:
    """The UTC start time a backup id spells, or None for a name that is not an id."""
    try:
        return datetime.strptime(backup_id, ID_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def read_manifest(repo: Repository, key: bytes | None, backup_id: str) -> Manifest:
    """`backups/<id>/manifest.json`, authenticated when `key` is set.

    Raises AuthError (tampered, or of an older format), ValueError, KeyError or TypeError.
    """
    name = manifest_key(backup_id)
    doc = json.loads(repo.get(name))
    if not isinstance(doc, dict):
        raise TypeError("a manifest is a JSON object")
    if key is not None:
        auth.check_manifest(key, name, doc)
        if doc.get("format") != MANIFEST_FORMAT or doc.get("codec") != codec.ZSTD_AES:
            raise auth.AuthError(name, "an authenticated manifest of an unexpected format")
    manifest = Manifest.from_json(doc)
    if manifest.id != backup_id:
        raise ValueError(f"it names backup {manifest.id}, its directory {backup_id}")
    if any(not p.key.startswith(f"{BACKUPS_PREFIX}{backup_id}/") for p in manifest.parts):
        raise ValueError("it lists a part outside its own directory")
    return manifest
