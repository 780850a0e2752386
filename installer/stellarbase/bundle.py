"""Release bundles: check a tarball's signature and checksums before anything uses it.

A bundle `stellarbase-<version>-linux-<arch>.tar.gz` holds one directory
`stellarbase-<version>/` of plain files: the binary `stellarbase`, `release.json`,
`README.md`, `LICENSE`, `SHA256SUMS` (`sha256sum` lines for every other file) and
`SHA256SUMS.sig` (base64 of the raw 64-byte ed25519 signature of `SHA256SUMS`).
`packaging/make_bundle.py` builds it.

The tarball is plain ustar: its headers are read 512 bytes at a time and checked (entry
types, sizes, count) before tarfile parses them, so no header can make it read more than
one block at once; pax and GNU extension headers are refused. The files are unpacked under
/var/tmp (disk, not a tmpfs /tmp) unless TMPDIR says otherwise, within MAX_TOTAL_BYTES.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stellarbase import release_key
from stellarbase.errors import ExitCode, StellarError

BINARY = "stellarbase"
RELEASE = "release.json"
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
FORMAT = 1  # release.json "bundle_format"; a reader refuses formats it does not know

MAX_MEMBERS = 32
MAX_FILE_BYTES = 512 << 20
MAX_TOTAL_BYTES = 640 << 20
_BLOCK = 512
# Entry types of a bundle: regular files and the one directory. The extension headers
# (pax "x"/"g", GNU "L"/"K") carry payloads that tarfile reads whole: they are refused.
_PLAIN_TYPES = (b"0", b"\0", b"5")
_EXTENSION_TYPES = (b"x", b"g", b"L", b"K")
_CHUNK = 1 << 20
_SUM_LINE = re.compile(r"([0-9a-f]{64})  ([A-Za-z0-9._-]+)")
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+[A-Za-z0-9.+-]*")


@dataclass(frozen=True)
class Release:
    """What release.json says about the release in the bundle."""

    version: str
    # The schema after this release's migrations: older releases whose newest migration is
    # below schema_min cannot run against it (see stellarbase.migrate, "compatible-from").
    schema_min: int
    schema_max: int  # the newest migration it carries
    upgrade_from: str  # oldest installed version it can upgrade
    built_at: str
    # Older releases this one withdraws (release.json "revoked"): never installed again here.
    revoked: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose files passed every check, unpacked in a private directory."""

    source: Path
    workdir: Path
    release: Release
    # The STELLARBASE_RELEASE_PUBKEY file and key fingerprints it was verified with, if any
    key_override: dict[str, Any] | None = None

    @property
    def binary(self) -> Path:
        return self.workdir / BINARY

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VerifiedBundle:
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()


_DAMAGED = "copy the bundle again; compare its size with the published one"


def refuse(path: Path, message: str, hint: str) -> StellarError:
    return StellarError(f"bundle {path}: {message}", hint=hint, code=ExitCode.BUNDLE)


def verify_bundle(path: Path, keys: list[Ed25519PublicKey] | None = None) -> VerifiedBundle:
    """Unpack into a private temp dir and check signature, checksums and release.json.

    Nothing outside that directory is written; it is removed again when a check fails.
    """
    trusted = release_key.trusted_keys() if keys is None else keys
    override = release_key.override_in_use() if keys is None else None
    workdir = Path(tempfile.mkdtemp(prefix="stellarbase-bundle-", dir=unpack_root()))
    try:
        scan_headers(path)
        top, files = unpack(path, workdir)
        check_signature(path, files, trusted)
        check_sums(path, files)
        release = parse_release(path, files)
        if top != f"stellarbase-{release.version}":
            raise refuse(
                path,
                f"directory {top}/ does not match release.json version {release.version}",
                "rebuild the bundle with packaging/make_bundle.py",
            )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return VerifiedBundle(path, workdir, release, override)


def unpack_root() -> str | None:
    """/var/tmp: on disk, unlike a tmpfs /tmp that a 640 MiB bundle would eat memory from.
    An explicit TMPDIR (or tempfile.tempdir) wins."""
    if tempfile.tempdir is not None or os.environ.get("TMPDIR"):
        return None
    return "/var/tmp" if os.path.isdir("/var/tmp") else None


def scan_headers(path: Path) -> None:
    """Walk the tar headers with bounded reads before tarfile sees them (see the module doc)."""
    unsafe = "use the bundle as published; this one was not made by make_bundle.py"
    try:
        with gzip.open(path, "rb") as stream:
            _scan_stream(path, stream, unsafe)
    except StellarError:
        raise
    except FileNotFoundError as exc:
        raise refuse(path, "no such file", "give the path of the .tar.gz bundle") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise refuse(path, f"truncated or not a tar.gz: {exc}", _DAMAGED) from exc
    except OSError as exc:
        raise refuse(path, f"cannot read: {exc}", _DAMAGED) from exc


def _scan_stream(path: Path, stream: gzip.GzipFile, unsafe: str) -> None:
    total = 0
    for count in range(1, MAX_MEMBERS + 2):
        header = _read_exactly(path, stream, _BLOCK)
        if header == bytes(_BLOCK):
            return  # the end-of-archive marker
        if count > MAX_MEMBERS:
            raise refuse(path, f"more than {MAX_MEMBERS} entries", unsafe)
        kind = header[156:157]
        if kind in _EXTENSION_TYPES:
            raise refuse(
                path,
                f"entry {count} is a pax or GNU extension header: bundles are plain ustar",
                unsafe,
            )
        size = _octal(path, header[124:136])
        if kind not in _PLAIN_TYPES:
            continue  # no data to skip for links and devices; unpack names and refuses them
        if size > MAX_FILE_BYTES or total + size > MAX_TOTAL_BYTES:
            raise refuse(path, f"entry {count} is too large ({size} bytes)", unsafe)
        total += size
        left = -(-size // _BLOCK) * _BLOCK
        while left:
            left -= len(_read_exactly(path, stream, min(left, _CHUNK)))
    raise refuse(path, f"more than {MAX_MEMBERS} entries", unsafe)


def _read_exactly(path: Path, stream: gzip.GzipFile, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise refuse(path, "truncated or not a tar.gz: the tarball ends inside an entry", _DAMAGED)
    return data


def _octal(path: Path, field: bytes) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not re.fullmatch(rb"[0-7]{1,11}", text):
        raise refuse(path, "truncated or not a tar.gz: a header's size is not octal", _DAMAGED)
    return int(text, 8)


def unpack(path: Path, workdir: Path) -> tuple[str, dict[str, Path]]:
    """Copy the bundle's plain files into workdir; anything else in the tarball refuses it."""
    try:
        with gzip.open(path, "rb") as stream:
            top, files = _unpack_stream(path, stream, workdir)
            _drain(path, stream)  # the gzip trailer (CRC, length) proves nothing is cut off
    except StellarError:
        raise
    except FileNotFoundError as exc:
        raise refuse(path, "no such file", "give the path of the .tar.gz bundle") from exc
    except (
        tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, OverflowError,
    ) as exc:  # fmt: skip
        # ValueError covers UnicodeDecodeError of a name and tarfile's own number parsing
        raise refuse(path, f"truncated or not a tar.gz: {exc}", _DAMAGED) from exc
    except OSError as exc:
        raise refuse(path, f"cannot read: {exc}", _DAMAGED) from exc
    return top, files


def _unpack_stream(path: Path, stream: gzip.GzipFile, workdir: Path) -> tuple[str, dict[str, Path]]:
    unsafe = "use the bundle as published; this one was not made by make_bundle.py"
    top = ""
    files: dict[str, Path] = {}
    total = 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for count, member in enumerate(tar, start=1):
            if count > MAX_MEMBERS:
                raise refuse(path, f"more than {MAX_MEMBERS} entries", unsafe)
            parts = _member_parts(path, member.name, unsafe)
            top = top or parts[0]
            if parts[0] != top or not top.startswith("stellarbase-"):
                raise refuse(path, f"entry {member.name!r} lies outside {top}/", unsafe)
            if len(parts) == 1 and member.isdir():
                continue
            if len(parts) != 2 or not member.isfile():
                raise refuse(path, f"entry {member.name!r} is not a plain file in {top}/", unsafe)
            name = parts[1]
            if name in files:
                raise refuse(path, f"entry {member.name!r} appears twice", unsafe)
            total += member.size
            if member.size > MAX_FILE_BYTES or total > MAX_TOTAL_BYTES:
                raise refuse(path, f"entry {member.name!r} is too large", unsafe)
            source = tar.extractfile(member)
            if source is None:
                raise refuse(path, f"entry {member.name!r} has no content", unsafe)
            target = workdir / name
            with source, target.open("xb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
            files[name] = target
    if not files:
        raise refuse(path, "the tarball holds no files", unsafe)
    return top, files


def _member_parts(path: Path, name: str, hint: str) -> tuple[str, ...]:
    pure = PurePosixPath(name)
    if pure.is_absolute() or "\\" in name:
        raise refuse(path, f"entry {name!r} has an absolute path", hint)
    parts = tuple(p for p in pure.parts if p != ".")
    if not parts or any(p == ".." for p in parts):
        raise refuse(path, f"entry {name!r} leaves the bundle directory", hint)
    return parts


def _drain(path: Path, stream: gzip.GzipFile) -> None:
    left = MAX_TOTAL_BYTES
    while chunk := stream.read(_CHUNK):
        left -= len(chunk)
        if left < 0:
            raise refuse(path, "the tarball is too large", "use the bundle as published")


def check_signature(path: Path, files: dict[str, Path], keys: list[Ed25519PublicKey]) -> None:
    if SUMS not in files:
        raise refuse(path, f"{SUMS} is missing", "use the bundle as published")
    if SIGNATURE not in files:
        raise refuse(
            path,
            f"unsigned: {SIGNATURE} is missing",
            "use the signed bundle as published; unsigned bundles are never installed",
        )
    try:
        signature = base64.b64decode(files[SIGNATURE].read_bytes().strip(), validate=True)
    except binascii.Error:
        signature = b""
    if len(signature) != 64:
        raise refuse(
            path,
            f"{SIGNATURE} is not the base64 of an ed25519 signature",
            "use the signed bundle as published",
        )
    sums = files[SUMS].read_bytes()
    for key in keys:
        try:
            key.verify(signature, sums)
        except InvalidSignature:
            continue
        return
    raise refuse(
        path,
        f"the signature of {SUMS} does not match any trusted release key",
        f"{SUMS} was changed or signed by another key; use the bundle as published, or set "
        f"{release_key.OVERRIDE_ENV} to the PEM public key of the key that re-signed it",
    )


def check_sums(path: Path, files: dict[str, Path]) -> None:
    """Every file but the sums and signature is listed once, and matches its digest."""
    hint = "copy the bundle again from the release; this one was altered"
    listed: dict[str, str] = {}
    for number, line in enumerate(files[SUMS].read_text(encoding="ascii").splitlines(), 1):
        match = _SUM_LINE.fullmatch(line)
        if not match or match[2] in (SUMS, SIGNATURE) or match[2] in listed:
            raise refuse(path, f"{SUMS} line {number} is not a valid entry", hint)
        listed[match[2]] = match[1]
    expected = set(files) - {SUMS, SIGNATURE}
    if unlisted := sorted(expected - set(listed)):
        raise refuse(path, f"files not listed in {SUMS}: {', '.join(unlisted)}", hint)
    if missing := sorted(set(listed) - expected):
        raise refuse(path, f"files listed in {SUMS} but missing: {', '.join(missing)}", hint)
    for name, digest in sorted(listed.items()):
        if sha256_file(files[name]) != digest:
            raise refuse(path, f"{name} does not match its checksum in {SUMS}", hint)
    for required in (BINARY, RELEASE):
        if required not in files:
            raise refuse(path, f"{required} is missing", hint)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_release(path: Path, files: dict[str, Path]) -> Release:
    hint = "the bundle was built by an incompatible make_bundle.py; use a matching stellarbase"
    try:
        data: Any = json.loads(files[RELEASE].read_text(encoding="utf-8"))
        if data["bundle_format"] != FORMAT:
            raise refuse(path, f"bundle format {data['bundle_format']!r} is not {FORMAT}", hint)
        release = Release(
            version=str(data["version"]),
            schema_min=_int(data["schema"]["min"]),
            schema_max=_int(data["schema"]["max"]),
            upgrade_from=str(data["upgrade_from"]),
            built_at=str(data["built_at"]),
            revoked=tuple(_revoked(data.get("revoked", []))),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse(path, f"{RELEASE} is malformed: {exc!r}", hint) from exc
    named = (release.version, release.upgrade_from, *release.revoked)
    valid_versions = all(_VERSION.fullmatch(v) for v in named)
    if not valid_versions or release.schema_min > release.schema_max:
        raise refuse(path, f"{RELEASE} holds an invalid version or schema range", hint)
    return release


def _revoked(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"revoked: expected a list of versions, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
