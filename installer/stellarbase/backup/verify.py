"""`backup verify`: read back every object, check every manifest and every WAL chain.

Also what restore runs before it touches anything: `authenticate_restore` checks, with a
key, every object the restore will read without downloading it (see `auth`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stellarbase.backup import auth, codec, walnames
from stellarbase.backup.archiver import SEGMENT_HEADER_LEN, ArchiveError, check_segment_header
from stellarbase.backup.catalog import (
    WAL_PREFIX,
    Catalog,
    Manifest,
    Part,
    continuity,
    load_catalog,
)
from stellarbase.backup.manifest import manifest_key
from stellarbase.backup.store import Repository, RepositoryError
from stellarbase.errors import StellarError

VERIFY_CONCURRENCY = 8
_READ = 1024 * 1024

# What `backup verify` can and cannot tell, said in its output and in the README.
DETECTS_ALWAYS = (
    "damaged or truncated objects (sha256 of every object, zstd frame checks)",
    "missing WAL segments and backup parts",
    "a WAL segment stored under another segment's name (its page header names its position)",
)
DETECTS_WITH_KEY = (
    "objects, WAL metadata and manifests altered by anyone without the key (MACs)",
    "objects moved or swapped between names or backups",
    "unencrypted objects planted by anyone without the key",
)
NOT_DETECTED_WITHOUT_KEY = (
    "a writer with bucket access replacing objects together with their metadata and "
    "manifests consistently",
    "edited WAL metadata (such as a segment's completion time, which --to-time uses)",
    "backup parts swapped between names when their manifests are edited to match",
)
NOT_DETECTED_WITH_KEY = (
    "objects or whole backups deleted, or the repository rolled back to an earlier "
    "authentic state (restore then reaches less far, and says how far)",
)


def coverage(key: bytes | None) -> dict[str, Any]:
    """What this repository's checks detect: for `backup verify`'s text and JSON."""
    return {
        "authenticated": key is not None,
        "detects": [*DETECTS_ALWAYS, *(DETECTS_WITH_KEY if key else ())],
        "does_not_detect": list(NOT_DETECTED_WITH_KEY if key else NOT_DETECTED_WITHOUT_KEY),
    }


@dataclass(frozen=True)
class Problem:
    subject: str  # the object key or segment name
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    repository: str
    objects: int
    bytes: int  # original bytes checked
    seconds: float
    problems: tuple[Problem, ...]
    authenticated: bool = False  # a key was set: MACs and sealed names were checked

    @property
    def messages(self) -> list[str]:
        return [str(p) for p in self.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_object(
    catalog: Catalog, key: str, part: Part | None = None, backup: Manifest | None = None
) -> tuple[int, list[Problem]]:
    """Download and decode one object; compare its sha256 and size with its metadata.

    A base backup part's checksum and size are known only once its upload has ended, so
    they live in the manifest rather than in the object's metadata; so does its codec,
    which a key requires to be the sealed one. With a key, a WAL object's metadata must
    pass its MAC and every object must be sealed to its own name.
    """
    backup_id = ""
    try:
        meta = dict(catalog.meta(key))
    except StellarError as exc:  # RepositoryError, AuthError
        return 0, [Problem(key, exc.message)]
    if part is not None and backup is not None:
        meta["sha256"], meta["size"] = part.sha256, str(part.raw_bytes)
        meta["codec"], backup_id = backup.codec, backup.id
    expected = meta.get("sha256")
    if not expected:
        return 0, [Problem(key, "no sha256 in the object's metadata")]
    problems: list[Problem] = []
    if catalog.system_identifier and meta.get("sysid", catalog.system_identifier) != (
        catalog.system_identifier
    ):
        problems.append(
            Problem(key, f"system identifier {meta.get('sysid')} is not the repository's")
        )
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        with codec.decoding_reader(
            catalog.repo.open_read(key),
            meta.get("codec", ""),
            catalog.key,
            name=key,
            backup_id=backup_id,
        ) as reader:
            for chunk in iter(lambda: reader.read(_READ), b""):
                digest.update(chunk)
                if len(head) < SEGMENT_HEADER_LEN:
                    head += chunk[: SEGMENT_HEADER_LEN - len(head)]
                size += len(chunk)
    except StellarError as exc:  # RepositoryError, CodecError
        return size, [*problems, Problem(key, f"cannot be read back: {exc.message}")]
    if digest.hexdigest() != expected:
        problems.append(Problem(key, "checksum mismatch: the stored bytes were altered"))
    elif meta.get("size") not in (None, str(size)):
        problems.append(Problem(key, f"size {size} is not the recorded {meta.get('size')}"))
    elif key.startswith(WAL_PREFIX) and walnames.is_segment(key[len(WAL_PREFIX) :]):
        sysid = catalog.system_identifier or meta.get("sysid", "")
        try:
            check_segment_header(key[len(WAL_PREFIX) :], head, size, sysid)
        except ArchiveError as exc:
            problems.append(Problem(key, f"not the segment its name says: {exc.message}"))
    return size, problems


def check_manifest(catalog: Catalog, backup: Manifest) -> list[Problem]:
    subject = manifest_key(backup.id)
    problems: list[Problem] = []
    present = {i.key: i for i in catalog.backup_objects.get(backup.id, ())}
    if backup.system_identifier != catalog.system_identifier:
        problems.append(
            Problem(
                subject, f"system identifier {backup.system_identifier} is not the repository's"
            )
        )
    size = backup.wal_segment_size
    # The last segment a backup needs holds the byte before its stop LSN.
    last_byte = max(backup.stop_lsn - 1, backup.start_lsn)
    for name, lsn in ((backup.start_wal, backup.start_lsn), (backup.stop_wal, last_byte)):
        if walnames.segment_of(lsn, backup.timeline, size).name(size) != name:
            problems.append(
                Problem(subject, f"{name} does not hold LSN {walnames.format_lsn(lsn)}")
            )
    for part in backup.parts:
        key = part.key
        info = present.get(key)
        if info is None:
            problems.append(Problem(key, "listed in the manifest but missing"))
            continue
        if info.size != part.stored_bytes:
            problems.append(
                Problem(key, f"{info.size} bytes stored, the manifest says {part.stored_bytes}")
            )
        if catalog.key is not None:
            continue  # the manifest is authenticated; the part's own metadata is not
        try:
            meta = catalog.meta(key)
        except RepositoryError as exc:
            problems.append(Problem(key, exc.message))
            continue
        if meta.get("sha256", part.sha256) != part.sha256:
            problems.append(Problem(key, "metadata sha256 differs from the manifest's"))
    return problems


def check_continuity(catalog: Catalog, backup: Manifest) -> list[Problem]:
    chain = continuity(catalog, backup)
    name = catalog.segment_name(chain.end)
    if not chain.restorable:
        return [Problem(name, f"missing: backup {backup.id} cannot be restored without it")]
    if chain.gap:
        last = catalog.segment_name(chain.path[-1])
        return [Problem(name, f"missing: backup {backup.id} restores only up to {last}")]
    return []


def verify(
    repo: Repository, key: bytes | None, concurrency: int = VERIFY_CONCURRENCY
) -> VerifyReport:
    """Read back every object, check every manifest and every backup's WAL chain."""
    started = time.monotonic()
    catalog = load_catalog(repo, key, tampered_ok=True)
    problems = [Problem(name, why) for name, why in catalog.tampered.items()]
    problems += [Problem(manifest_key(i), why) for i, why in catalog.unreadable.items()]
    keys: list[tuple[str, Part | None, Manifest | None]] = [
        (WAL_PREFIX + n, None, None) for n in sorted(catalog.wal)
    ]
    keys += [(p.key, p, b) for b in catalog.backups for p in b.parts]
    checked = 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for size, found in pool.map(lambda item: check_object(catalog, *item), keys):
            checked += size
            problems += found
    for backup in catalog.backups:
        problems += check_manifest(catalog, backup)
        try:
            problems += check_continuity(catalog, backup)
        except StellarError as exc:  # a history file not authentic: named by its message
            problems.append(Problem(manifest_key(backup.id), exc.message))
    return VerifyReport(
        repository=repo.description,
        objects=len(keys),
        bytes=checked,
        seconds=time.monotonic() - started,
        problems=tuple(_unique(problems)),
        authenticated=key is not None,
    )


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


# --------------------------------------------------------------------------- before restore

RESTORE_CONCURRENCY = 16


def _read_head(catalog: Catalog, key: str) -> bytes:
    with catalog.repo.open_read(key) as raw:
        head = b""
        while len(head) < codec.HEADER_LEN:
            piece = raw.read(codec.HEADER_LEN - len(head))
            if not piece:
                break
            head += piece
    return head


def _check_stored_part(catalog: Catalog, part: Part) -> None:
    if not part.header:
        raise auth.legacy(part.key)
    if _read_head(catalog, part.key).hex() != part.header:
        raise auth.AuthError(
            part.key, "its bytes are not the ones its manifest recorded: moved here"
        )


def _check_stored_wal(catalog: Catalog, name: str) -> None:
    key = WAL_PREFIX + name
    meta = catalog.meta(key)  # the codec and the MAC
    info = catalog.wal.get(name)
    if info is not None and str(info.size) != meta.get("stored"):
        raise auth.AuthError(
            key,
            f"{info.size} bytes stored, its authenticated metadata says {meta.get('stored')}: "
            "another object's bytes were put here",
        )
    if _read_head(catalog, key).hex() != meta.get("header"):
        raise auth.AuthError(
            key, "its bytes are not the ones its metadata was sealed with: moved here"
        )


def authenticate_restore(catalog: Catalog, backup: Manifest, wal: Iterable[str]) -> None:
    """With a key: refuse (AuthError, naming the object) anything the restore would read
    that is not authentic, before anything is written.

    Every manifest passed its MAC as the catalog was loaded; every part's first bytes must be
    the sealed header the manifest records, and every WAL file of `wal` (and every
    timeline history) must have authentic metadata, the stored size and the sealed
    header that metadata records. A HEAD and a 12-byte read per object: the bodies are
    authenticated again, chunk by chunk, as they are decoded.
    """
    if catalog.key is None:
        return
    names = sorted({*wal, *(n for n in catalog.wal if walnames.is_history(n))})
    checks = [lambda p=p: _check_stored_part(catalog, p) for p in backup.parts]
    checks += [lambda n=n: _check_stored_wal(catalog, n) for n in names]
    with ThreadPoolExecutor(max_workers=RESTORE_CONCURRENCY) as pool:
        futures = [pool.submit(check) for check in checks]
    errors = [e for f in futures if (e := f.exception()) is not None]
    if errors:
        raise errors[0]
