"""What makes a repository authentic when `backup.encryption_key` is set.

Two subkeys are derived from the configured key with HKDF-SHA256: one seals objects
(AES-256-GCM, see `codec`), the other MACs what is stored beside them: each WAL object's
metadata and each backup's manifest. The object's name (its key relative to the
repository's prefix, so a repository moved to another bucket or prefix still restores)
and its backup id are part of every MAC and of every sealed chunk's associated data, so
an authentic object, metadata or manifest cannot be moved to another name.

Who uses it: `archiver` and `basebackup` seal, `catalog` checks WAL metadata and
manifests as it reads them, `verify` reports failures, `restore` refuses them.
Without a key nothing here applies: checksums catch damage, nothing catches a writer
with bucket access who replaces objects together with their checksums.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stellarbase.errors import ExitCode, StellarError

MAC = "mac"  # the field holding the MAC, in object metadata and in a manifest
_OBJECT_INFO = b"stellarbase repository 2: object encryption"
_MAC_INFO = b"stellarbase repository 2: metadata and manifest MAC"
_LEN = struct.Struct(">H")

NEW_BACKUP_HINT = (
    "run `stellarbase backup now` to take a new full backup with this release; "
    "`stellarbase backup expire` removes the older ones when retention allows"
)
TAMPER_HINT = (
    "someone with write access to the store altered or moved it, or backup.encryption_key "
    "is not the key that wrote it; restore from a repository you trust"
)


class AuthError(StellarError):
    """A stored object, its metadata or a manifest that is not authentic (message names it)."""

    def __init__(self, name: str, why: str, hint: str = TAMPER_HINT) -> None:
        super().__init__(f"{name}: {why}", hint=hint, code=ExitCode.BACKUP)
        self.name = name


class LegacyFormat(AuthError):
    """Written before objects were authenticated: refused while a key is set, not tampered."""


LEGACY_WHY = (
    "written by an older format (or without backup.encryption_key): it is not "
    "authenticated, so it is refused while a key is set"
)


def legacy(name: str) -> LegacyFormat:
    return LegacyFormat(name, LEGACY_WHY, hint=NEW_BACKUP_HINT)


def plaintext(name: str, codec: str) -> LegacyFormat:
    return LegacyFormat(
        name,
        f"stored as {codec!r}, not encrypted, although backup.encryption_key is set: refused, "
        "as anyone with write access to the store could have written it",
        hint="if it was written before the key was set, " + NEW_BACKUP_HINT,
    )


@functools.lru_cache(maxsize=8)
def _subkey(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def object_key(key: bytes) -> bytes:
    """The AES-256-GCM key that seals objects."""
    return _subkey(key, _OBJECT_INFO)


def _mac_key(key: bytes) -> bytes:
    return _subkey(key, _MAC_INFO)


def binding(name: str, backup_id: str = "") -> bytes:
    """What ties bytes to one place in the repository: the object's key and its backup."""
    out = b"stellarbase object"
    for field in (name, backup_id):
        raw = field.encode()
        out += _LEN.pack(len(raw)) + raw
    return out


def _mac(key: bytes, kind: str, name: str, backup_id: str, body: bytes) -> str:
    message = kind.encode() + b"\0" + binding(name, backup_id) + body
    return hmac.new(_mac_key(key), message, hashlib.sha256).hexdigest()


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in doc.items() if k != MAC}, sort_keys=True, separators=(",", ":")
    ).encode()


def seal_meta(key: bytes, name: str, meta: Mapping[str, str]) -> dict[str, str]:
    """`meta` with its MAC added (every field, bound to the object's name)."""
    plain = {k: v for k, v in meta.items() if k != MAC}
    return {**plain, MAC: _mac(key, "meta", name, "", _canonical(plain))}


def check_meta(key: bytes, name: str, meta: Mapping[str, str]) -> None:
    """Raise AuthError (naming `name`) unless `meta` carries its valid MAC."""
    given = meta.get(MAC)
    if given is None:
        raise legacy(name)
    if not hmac.compare_digest(given, _mac(key, "meta", name, "", _canonical(meta))):
        raise AuthError(name, "its metadata does not match its MAC: altered, or moved here")


def sign_manifest(key: bytes, name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest `doc` with its MAC added, bound to its key and backup id."""
    plain = {k: v for k, v in doc.items() if k != MAC}
    return {**plain, MAC: _mac(key, "manifest", name, str(plain.get("id", "")), _canonical(plain))}


def check_manifest(key: bytes, name: str, doc: Mapping[str, Any]) -> None:
    """Raise AuthError (naming `name`) unless the manifest carries its valid MAC."""
    given = doc.get(MAC)
    if given is None:
        raise legacy(name)
    expected = _mac(key, "manifest", name, str(doc.get("id", "")), _canonical(doc))
    if not isinstance(given, str) or not hmac.compare_digest(given, expected):
        raise AuthError(name, "the manifest does not match its MAC: altered, or moved here")
