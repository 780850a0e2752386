"""The public keys that release bundles are signed with, and the override for re-signers."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from stellarbase.errors import ExitCode, StellarError

log = structlog.get_logger()

# Ed25519 keys (SubjectPublicKeyInfo PEM) whose signature on a bundle's SHA256SUMS is
# trusted. The matching private keys are kept off the repository; a key rotation adds the
# new key here one release before bundles are signed with it.
RELEASE_PUBLIC_KEYS: tuple[str, ...] = (
    """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA0IZIXVlR3IuFspEQSwK6gOQp3kUNZYjMcGZkguCFyMY=
-----END PUBLIC KEY-----
""",
)

# A PEM file whose keys replace the built-in ones: for tests that sign with a throwaway
# key pair, and for organisations that re-sign bundles with their own key. Whoever can set
# root's environment or write that file chooses what root installs: it must be root's own
# file (not writable by others), and every use is logged, audited and shown by `status`.
OVERRIDE_ENV = "STELLARBASE_RELEASE_PUBKEY"

_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def trusted_keys(env: Mapping[str, str] | None = None) -> list[Ed25519PublicKey]:
    """The built-in release keys, or those of the file named by the override variable."""
    env = os.environ if env is None else env
    override = env.get(OVERRIDE_ENV)
    if not override:
        return [parse_key(pem, "the built-in release key") for pem in RELEASE_PUBLIC_KEYS]
    keys = _override_keys(Path(override))
    log.warning(
        "release keys overridden: bundles are verified against the keys of this file only",
        variable=OVERRIDE_ENV,
        file=override,
        keys=[fingerprint(k) for k in keys],
    )
    return keys


def _override_keys(path: Path) -> list[Ed25519PublicKey]:
    try:
        _refuse_foreign_file(path)
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise StellarError(
            f"{OVERRIDE_ENV}={path}: cannot read the release key file: {exc}",
            hint=f"point {OVERRIDE_ENV} at a PEM ed25519 public key, or unset it",
            code=ExitCode.BUNDLE,
        ) from exc
    blocks = _PEM_BLOCK.findall(text)
    if not blocks:
        raise StellarError(
            f"{OVERRIDE_ENV}={path}: no PEM public key in the file",
            hint="the file should hold '-----BEGIN PUBLIC KEY-----' blocks of ed25519 keys",
            code=ExitCode.BUNDLE,
        )
    return [parse_key(block, str(path)) for block in blocks]


def override_in_use(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The override's file and key fingerprints, for the audit log and `status`; or None."""
    env = os.environ if env is None else env
    override = env.get(OVERRIDE_ENV)
    if not override:
        return None
    try:
        keys = [fingerprint(k) for k in _override_keys(Path(override))]
    except StellarError:
        keys = []  # unreadable: the bundle check says why
    return {"file": str(Path(override)), "keys": keys}


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA256 of the raw public key, as `openssl pkey -pubin -outform DER | tail -c32` hashes."""
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:32]


def _refuse_foreign_file(path: Path) -> None:
    """For root, the key file must be root's and writable by root only: anyone else who
    could write it would choose what root installs."""
    if os.geteuid() != 0:
        return
    found = path.stat()
    if found.st_uid != 0 or found.st_mode & 0o022:
        raise StellarError(
            f"{OVERRIDE_ENV}={path}: the key file is owned by uid {found.st_uid} with mode "
            f"{found.st_mode & 0o777:o}: another user could change which bundles root trusts",
            hint=f"chown root:root {path} && chmod 644 {path}",
            code=ExitCode.BUNDLE,
        )


def parse_key(pem: str, origin: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem.encode("ascii"))
    except ValueError as exc:
        raise StellarError(
            f"{origin}: not a PEM public key: {exc}",
            hint="export the key with `openssl pkey -pubout`",
            code=ExitCode.BUNDLE,
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise StellarError(
            f"{origin}: release keys are ed25519, this one is {type(key).__name__}",
            hint="make the key pair with `openssl genpkey -algorithm ed25519`",
            code=ExitCode.BUNDLE,
        )
    return key
